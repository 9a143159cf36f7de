"""Session credentials for the agent where no controller runs (benchmarks and sessiond tests).

:class:`SecretIssuer` answers the agent's two questions of the controllers (``fleet_map`` and
``new_session``, :class:`cloudlet.client.fleet.SessionIssuer`) from the fleet secret, exactly as a
controller's ``POST /v1/services/{name}/sessions`` does (``credentials.issue``, anchored at the
cloudlet asked); the map is the harness's own. The controller's API path (device credential,
HTTPS, the fleet map from the members) is tested against real controllers in tests/controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudlet.protocol import credentials


@dataclass
class SecretIssuer:
    secret: bytes
    cloudlets: dict[str, tuple[str, int]]  # name -> the service's session endpoint, as the device sees it
    device: str = ""
    issued: int = 0

    def map(self, service: str) -> dict[str, Any]:
        return {"service": service, "anchor": None, "unavailable": [],
                "cloudlets": [{"cloudlet": n, "host": h, "port": p, "api": n,
                               "probe": {"host": h, "port": p, "op": "ping"}}
                              for n, (h, p) in sorted(self.cloudlets.items())]}

    async def fleet_map(self, service: str) -> dict[str, Any]:
        return self.map(service)

    async def new_session(self, service: str, api: str) -> dict[str, Any]:
        cred = credentials.issue(self.secret, service, api, device=self.device)
        self.issued += 1
        host, port = self.cloudlets[api]
        return {"session": cred.token, "id": cred.session_id, "service": service, "cloudlet": api,
                "host": host, "port": port, "issued": cred.issued, "device": self.device or None,
                "map": self.map(service)}

    async def close(self) -> None:
        return None

"""The fleet map of a service: every cloudlet where it runs, how to reach it, how to probe it.

``GET /v1/services/{name}/map`` answers it to a device (with its own credential) and every session
reply carries it: the cloudlets of the fleet (``[fleet] members``, written by the roles from the
inventory) are asked for the service in parallel, with the fleet's controller token and a short
timeout, and the answers are cached for ``map_cache_seconds``. A cloudlet that is down or does not
run the service is left out (and listed under ``unavailable``). A cloudlet added to or removed from
the inventory enters or leaves the map with the next rollout; devices change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import aiohttp

from cloudlet.common.logs import event
from cloudlet.controller.config import ControllerConfig, FleetMember

log = logging.getLogger(__name__)

PROBE = {"op": "ping", "how": "session protocol header with op 3 (PING): the sessiond answers OK at once, "
                              "without a session; the round trip is the nearness measure"}


def entry(cloudlet: str, host: str, port: int, api: str = "") -> dict[str, Any]:
    """One cloudlet of a map; ``api``: its controller's URL (where a device asks it for a session)."""
    out: dict[str, Any] = {"cloudlet": cloudlet, "host": host, "port": port,
                           "probe": {"host": host, "port": port, "op": "ping"}}
    if api:
        out["api"] = api
    return out


class FleetMap:
    def __init__(self, config: ControllerConfig, token: str) -> None:
        self.config = config
        self.token = token
        self._cache: dict[str, tuple[float, list[dict[str, Any]], list[str]]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        if config.fleet.ca_file:
            self._ssl = ssl.create_default_context(cafile=config.fleet.ca_file)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=self.config.fleet.map_timeout_seconds))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _member(self, member: FleetMember, service: str) -> dict[str, Any] | None:
        try:
            async with self._client().get(f"{member.api}/v1/services/{service}", ssl=self._ssl) as resp:
                if resp.status != 200:
                    return None
                svc = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            event(log, logging.DEBUG, "fleet member did not answer", member=member.name, error=str(exc) or type(exc).__name__)
            return None
        if not isinstance(svc, dict) or svc.get("state") != "running":
            return None
        try:
            return entry(member.name, str(svc["session_host"]), int(svc["session_port"]), member.api)
        except (KeyError, TypeError, ValueError):
            return None

    async def for_service(self, service: str, local: dict[str, Any] | None) -> dict[str, Any]:
        """The map of ``service``; ``local`` is this cloudlet's own entry (None if it does not run it)."""
        cfg = self.config
        now = time.monotonic()
        cached = self._cache.get(service)
        if cached is not None and now - cached[0] < cfg.fleet.map_cache_seconds:
            others, missing = cached[1], cached[2]
        else:
            members = [m for m in cfg.fleet.members if m.name != cfg.cloudlet]
            answers = await asyncio.gather(*(self._member(m, service) for m in members))
            others = [a for a in answers if a is not None]
            missing = sorted(m.name for m, a in zip(members, answers, strict=True) if a is None)
            self._cache[service] = (now, others, missing)
        cloudlets = ([local] if local is not None else []) + others
        return {
            "service": service,
            "cloudlets": sorted(cloudlets, key=lambda e: str(e["cloudlet"])),
            "anchor": cfg.cloudlet if local is not None else None,  # where a new session asked here lives
            "unavailable": missing,
            "probe": PROBE,
            "asked": cfg.cloudlet,
        }

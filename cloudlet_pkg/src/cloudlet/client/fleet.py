"""The device's side of the controller API: its profile, the fleet map, new sessions.

A device profile (written by the playbook cloudlet.fleet.devices, docs/devices.md) is TOML::

    [device]
    id = "phone-1"
    credential = "cd1.phone-1.<secret>"
    services = ["redis"]
    controllers = ["https://10.0.0.1:8700", "https://10.0.0.2:8700"]
    ca = "-----BEGIN CERTIFICATE----- ..."      # or ca_file = "/path/ca.crt"

:class:`FleetClient` asks any controller for the fleet map of a service, and a given cloudlet's
controller (its ``api`` in the map) for a new session, over HTTPS verified against the fleet CA,
with the device credential. The credential never appears in an error message or a log line.
"""

from __future__ import annotations

import asyncio
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp


class ProfileError(ValueError):
    """The device profile cannot be used (the message says which key)."""


class FleetError(ConnectionError):
    """No controller answered, or one refused (``status``, ``code`` from the API's error body)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class DeviceProfile:
    device: str
    credential: str
    controllers: tuple[str, ...]
    services: tuple[str, ...] = ()
    ca_pem: str = ""

    def __repr__(self) -> str:  # never the credential
        return f"DeviceProfile(device={self.device!r}, controllers={self.controllers!r}, services={self.services!r})"

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProfileError(f"device profile {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"device profile {path}: not TOML: {exc}") from None
        dev = data.get("device")
        if not isinstance(dev, dict):
            raise ProfileError(f"device profile {path}: no [device] table")

        def need(key: str, kind: type) -> Any:
            value = dev.get(key)
            if not isinstance(value, kind) or not value:
                raise ProfileError(f"device profile {path}: [device] {key} must be a non-empty {kind.__name__}")
            return value

        device = need("id", str)
        credential = need("credential", str)
        if not credential.startswith(f"cd1.{device}."):
            raise ProfileError(f"device profile {path}: [device] credential is not a credential of device {device!r}")
        controllers = need("controllers", list)
        if not all(isinstance(c, str) and c.startswith(("https://", "http://")) for c in controllers):
            raise ProfileError(f"device profile {path}: [device] controllers must be http(s):// URLs")
        services = dev.get("services", [])
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ProfileError(f"device profile {path}: [device] services must be a list of names")
        ca = dev.get("ca", "")
        if dev.get("ca_file"):
            try:
                ca = Path(str(dev["ca_file"])).read_text(encoding="ascii")
            except OSError as exc:
                raise ProfileError(f"device profile {path}: [device] ca_file: {exc.strerror or exc}") from None
        if not isinstance(ca, str):
            raise ProfileError(f"device profile {path}: [device] ca must be PEM text")
        return cls(device, credential, tuple(c.rstrip("/") for c in controllers), tuple(services), ca.strip())


class SessionIssuer(Protocol):
    """Where the agent gets the fleet map and new sessions (:class:`FleetClient`: the controllers)."""

    async def fleet_map(self, service: str) -> dict[str, Any]: ...

    async def new_session(self, service: str, api: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass
class FleetClient:
    profile: DeviceProfile
    timeout: float = 10.0
    _http: aiohttp.ClientSession | None = None
    _ssl: ssl.SSLContext | bool = field(default=True)

    def __post_init__(self) -> None:
        if self.profile.ca_pem:
            self._ssl = ssl.create_default_context(cadata=self.profile.ca_pem)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.profile.credential}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _call(self, api: str, method: str, path: str) -> Any:
        try:
            async with self._client().request(method, f"{api}{path}", ssl=self._ssl) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    err = body.get("error", {}) if isinstance(body, dict) else {}
                    raise FleetError(f"{api}: {method} {path}: {resp.status} {err.get('code', '')}: "
                                     f"{err.get('message', '')}".rstrip(": "), resp.status, str(err.get("code", "")))
                return body
        except aiohttp.ClientError as exc:
            raise FleetError(f"{api}: {type(exc).__name__}: {exc}") from None
        except (asyncio.TimeoutError, OSError) as exc:
            raise FleetError(f"{api}: {type(exc).__name__} {exc}".rstrip()) from None

    async def fleet_map(self, service: str) -> dict[str, Any]:
        """The fleet map of ``service`` from the first controller of the profile that answers."""
        errors = []
        for api in self.profile.controllers:
            try:
                data = await self._call(api, "GET", f"/v1/services/{service}/map")
            except FleetError as exc:
                if exc.status in (401, 403):
                    raise
                errors.append(str(exc))
                continue
            if isinstance(data, dict) and isinstance(data.get("cloudlets"), list):
                data["asked_api"] = api  # the controller that answered: the cloudlet ``asked``'s API
                return data
            errors.append(f"{api}: not a fleet map")
        raise FleetError("no controller of the profile answered: " + "; ".join(errors))

    async def new_session(self, service: str, api: str) -> dict[str, Any]:
        """A new session of ``service`` from the controller at ``api`` (anchored at its cloudlet)."""
        data = await self._call(api, "POST", f"/v1/services/{service}/sessions")
        if not isinstance(data, dict) or not isinstance(data.get("session"), str):
            raise FleetError(f"{api}: the session reply has no credential")
        return data


def endpoints(fleet_map: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """``{cloudlet: (host, port)}`` of a fleet map's session ports."""
    out = {}
    for entry in fleet_map.get("cloudlets", []):
        try:
            out[str(entry["cloudlet"])] = (str(entry["host"]), int(entry["port"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def controllers(fleet_map: dict[str, Any]) -> dict[str, str]:
    """``{cloudlet: api URL}`` of a fleet map's entries that name their controller (and the one asked)."""
    out = {str(e["cloudlet"]): str(e["api"]) for e in fleet_map.get("cloudlets", [])
           if isinstance(e, dict) and e.get("api") and e.get("cloudlet")}
    if fleet_map.get("asked") and fleet_map.get("asked_api"):
        out.setdefault(str(fleet_map["asked"]), str(fleet_map["asked_api"]))
    return out

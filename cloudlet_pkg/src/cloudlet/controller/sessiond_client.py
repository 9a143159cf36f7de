"""Client for the local sessiond's control API (HTTP/1.1 + JSON over a Unix socket).

Contract: docs/architecture.md ("sessiond control API") and docs/sessiond.md. The controller uses it
to register each service's session port and backend, to remove services, to end sessions and to
read what sessiond already serves when it reconciles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL


class SessiondError(Exception):
    """sessiond answered with an error (``status``, ``code`` from its error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"sessiond answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class SessiondUnavailable(Exception):
    """The control socket cannot be reached (sessiond down or not started yet)."""


@dataclass(frozen=True, slots=True)
class RegisteredService:
    name: str
    port: int
    listen: str
    backend: str
    sessions: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegisteredService:
        return cls(
            name=str(data["name"]),
            port=int(data["port"]),
            listen=str(data.get("listen", "")),
            backend=str(data.get("backend", "")),
            sessions=int(data.get("sessions", 0) or 0),
        )


class SessiondClient:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path), timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 204)) -> Any:
        url = URL(f"http://sessiond{path}", encoded=True)
        try:
            async with self._http().request(method, url, json=body) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise SessiondUnavailable(f"sessiond control socket {self.socket_path} unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise SessiondUnavailable(f"sessiond control socket {self.socket_path} timed out") from exc
        if status not in ok:
            code, message = "internal", data.decode(errors="replace")
            try:
                err = json.loads(data)["error"]
                code, message = str(err.get("code", code)), str(err.get("message", message))
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
            raise SessiondError(status, code, message)
        return json.loads(data) if data else None

    async def health(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/v1/health"))

    async def services(self) -> dict[str, RegisteredService]:
        data = await self._request("GET", "/v1/services")
        out = {}
        for item in (data or {}).get("services", []):
            svc = RegisteredService.from_json(item)
            out[svc.name] = svc
        return out

    async def put_service(self, name: str, backend: str, port: int, listen: str) -> RegisteredService:
        data = await self._request(
            "PUT", f"/v1/services/{quote(name, safe='')}", {"backend": backend, "port": port, "listen": listen}
        )
        return RegisteredService.from_json(data)

    async def delete_service(self, name: str) -> bool:
        """Remove ``name``; False if sessiond did not know it."""
        try:
            await self._request("DELETE", f"/v1/services/{quote(name, safe='')}")
        except SessiondError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete_session(self, credential_or_id: str) -> bool:
        """End a session; False if sessiond did not know it."""
        try:
            await self._request("DELETE", f"/v1/sessions/{quote(credential_or_id, safe='')}")
        except SessiondError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def put_device(self, device: str, expires: int, revoked: bool) -> None:
        """Tell sessiond a device's expiry and revocation (it refuses the device's sessions otherwise)."""
        await self._request("PUT", f"/v1/devices/{quote(device, safe='')}", {"expires": expires, "revoked": revoked})

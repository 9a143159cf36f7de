"""The sessiond control API (HTTP/1.1 + JSON on a Unix socket) and its metrics endpoint (docs/sessiond.md)."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from cloudlet._version import VERSION as __version__
from cloudlet.common.addresses import format_address
from cloudlet.common.jsonbody import loads_bounded
from cloudlet.protocol import credentials
from cloudlet.relay.devices import DeviceGate
from cloudlet.relay.interfaces import ServiceEntry
from cloudlet.relay.manager import SessionManager
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.errors import ApiError
from cloudlet.sessiond.reload import ReloadPlan, ReloadRefused

log = logging.getLogger(__name__)




class Controlled(Protocol):
    """What the API needs of the daemon (``cloudlet.sessiond.daemon.Sessiond`` implements it)."""

    config: SessiondConfig
    manager: SessionManager | None
    peer_address: tuple[str, int] | None
    metrics_address: tuple[str, int] | None
    handed_over: int  # sessions this process handed to the next one at its stop (sessiond/handoff.py)
    taken_back: int  # sessions it took back from the previous one at its start

    def service_json(self, entry: ServiceEntry) -> dict[str, Any]: ...

    async def put_service(self, name: str, backend: Any, port: Any = 0,
                          listen: Any = "0.0.0.0") -> tuple[ServiceEntry, bool]: ...

    async def delete_service(self, name: str) -> None: ...

    def put_device(self, device: str, expires: Any, revoked: Any) -> bool: ...

    def delete_device(self, device: str) -> bool: ...

    @property
    def devices(self) -> DeviceGate: ...

    def peers_status(self) -> list[dict[str, Any]]: ...

    async def reload_file(self) -> ReloadPlan: ...

    def begin_upgrade(self) -> int: ...

    def metrics_text(self) -> bytes: ...


DAEMON: web.AppKey[Controlled] = web.AppKey("daemon")


def build_control_app(daemon: Controlled) -> web.Application:
    app = web.Application(middlewares=[_error_middleware], client_max_size=64 * 1024)
    app[DAEMON] = daemon
    app.add_routes([
        web.get("/v1/health", _h_health),
        web.get("/v1/services", _h_services),
        web.get("/v1/services/{name}", _h_service_get),
        web.put("/v1/services/{name}", _h_service_put),
        web.delete("/v1/services/{name}", _h_service_delete),
        web.get("/v1/sessions", _h_sessions),
        web.delete("/v1/sessions/{key}", _h_session_delete),
        web.get("/v1/peers", _h_peers),
        web.post("/v1/reload", _h_reload),
        web.post("/v1/upgrade", _h_upgrade),
        web.get("/v1/devices", _h_devices),
        web.put("/v1/devices/{device}", _h_device_put),
        web.delete("/v1/devices/{device}", _h_device_delete),
        web.get("/metrics", _h_metrics),
    ])
    return app


def build_metrics_app(daemon: Controlled) -> web.Application:
    app = web.Application()
    app[DAEMON] = daemon
    app.add_routes([web.get("/metrics", _h_metrics)])
    return app


def _daemon(request: web.Request) -> tuple[Controlled, SessionManager]:
    daemon = request.app[DAEMON]
    assert daemon.manager is not None  # the API starts after the manager
    return daemon, daemon.manager


async def _h_health(request: web.Request) -> web.Response:
    d, m = _daemon(request)
    return web.json_response({
        "status": "ok", "cloudlet": d.config.cloudlet, "version": __version__, "pid": os.getpid(),
        "services": len(m.services),
        "sessions": m.live_count(), "handed_over": d.handed_over, "taken_back": d.taken_back,
        "peer_listen": format_address(d.peer_address), "metrics_listen": format_address(d.metrics_address),
    })


async def _h_services(request: web.Request) -> web.Response:
    d, m = _daemon(request)
    return web.json_response({"services": [d.service_json(e) for e in m.services.values()]})


async def _h_service_get(request: web.Request) -> web.Response:
    d, m = _daemon(request)
    entry = m.services.get(request.match_info["name"])
    if entry is None:
        raise ApiError(404, "not_found", f"no service {request.match_info['name']!r}")
    return web.json_response(d.service_json(entry))


async def _h_service_put(request: web.Request) -> web.Response:
    d, _ = _daemon(request)
    try:
        body = loads_bounded(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_request", f"body must be a JSON object: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    unknown = set(body) - {"backend", "port", "listen"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    if "backend" not in body:
        raise ApiError(400, "bad_request", "backend is required")
    entry, _ = await d.put_service(request.match_info["name"], body["backend"], body.get("port", 0),
                                   body.get("listen", "0.0.0.0"))
    return web.json_response(d.service_json(entry))


async def _h_service_delete(request: web.Request) -> web.Response:
    d, _ = _daemon(request)
    await d.delete_service(request.match_info["name"])
    return web.Response(status=204)


async def _h_sessions(request: web.Request) -> web.Response:
    _, m = _daemon(request)
    return web.json_response({"sessions": m.list_sessions(request.query.get("service"))})


async def _h_session_delete(request: web.Request) -> web.Response:
    _, m = _daemon(request)
    key = request.match_info["key"]
    if key.startswith(credentials.VERSION + "."):
        try:
            cred = credentials.parse(m.secret, key)
        except credentials.CredentialError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        if not m.end_credential(cred, "ended_by_api"):
            raise ApiError(404, "not_found", "no live session for this credential (it is now retired)")
    elif not m.end_id(key, "ended_by_api"):
        raise ApiError(404, "not_found", f"no live session {key!r}")
    return web.Response(status=204)


async def _h_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": [d.to_json() for d in request.app[DAEMON].devices.all()]})


async def _h_device_put(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    try:
        body = loads_bounded(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_request", f"body must be a JSON object: {exc}") from None
    if not isinstance(body, dict) or set(body) - {"expires", "revoked"} or "expires" not in body:
        raise ApiError(400, "bad_request", 'body must be {"expires": UNIX_SECONDS, "revoked": BOOL}')
    changed = d.put_device(request.match_info["device"], body["expires"], body.get("revoked", False))
    return web.json_response({"device": request.match_info["device"], "changed": changed})


async def _h_device_delete(request: web.Request) -> web.Response:
    if not request.app[DAEMON].delete_device(request.match_info["device"]):
        raise ApiError(404, "not_found", f"no device {request.match_info['device']!r}")
    return web.Response(status=204)


async def _h_peers(request: web.Request) -> web.Response:
    return web.json_response({"peers": request.app[DAEMON].peers_status()})


async def _h_reload(request: web.Request) -> web.Response:
    """Read the config file again and apply it in place; 400 bad_config / 409 restart_required apply nothing."""
    try:
        applied = await request.app[DAEMON].reload_file()
    except ReloadRefused as exc:
        status = 409 if exc.code == "restart_required" else 400
        return web.json_response({"error": {"code": exc.code, "message": exc.message, "keys": list(exc.keys)}},
                                 status=status)
    return web.json_response({"status": "reloaded", **applied.to_json()})


async def _h_upgrade(request: web.Request) -> web.Response:
    """Start the next process (the installed code) and hand everything to it once it is ready: 202."""
    successor = request.app[DAEMON].begin_upgrade()
    return web.json_response({"status": "upgrading", "pid": os.getpid(), "successor": successor}, status=202)


async def _h_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DAEMON].metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": {"code": exc.code, "message": exc.message}}, status=exc.status)
    except web.HTTPException as exc:
        code = {404: "not_found", 405: "bad_request", 413: "bad_request"}.get(exc.status, "bad_request")
        return web.json_response({"error": {"code": code, "message": exc.reason}}, status=exc.status if exc.status < 500 else 500)
    except Exception as exc:
        log.exception("control API error")
        return web.json_response({"error": {"code": "internal", "message": type(exc).__name__}}, status=500)

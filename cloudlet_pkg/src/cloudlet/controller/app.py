"""The controller's HTTP JSON API (aiohttp). Reference: docs/api.md.

Every request except ``GET /v1/health`` and ``GET /metrics`` needs ``Authorization: Bearer <token>``
with the token from ``token_file``. Errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloudlet._version import VERSION as __version__
from cloudlet.common.jsonbody import loads_bounded
from cloudlet.common.logs import Throttle, event
from cloudlet.common.names import InvalidName, check_name
from cloudlet.controller.config import ControllerConfig
from cloudlet.controller.devices import DeviceAuthError, DeviceRecord, DeviceRegistry, is_device_token
from cloudlet.controller.fleetmap import FleetMap
from cloudlet.controller.fleetmap import entry as fleet_entry
from cloudlet.controller.metrics import ControllerMetrics
from cloudlet.controller.runtime.base import (
    Instance,
    RuntimeFailure,
    ServiceSpec,
    SpecError,
)
from cloudlet.controller.service import ControllerError, ServiceManager
from cloudlet.controller.sessiond_client import SessiondError, SessiondUnavailable

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
PUBLIC = {("GET", "/v1/health"), ("GET", "/metrics")}
# what a device credential may do (canonical routes); everything else is the admin token's
DEVICE_ROUTES = {("POST", "/v1/services/{name}/sessions"), ("GET", "/v1/services/{name}/map"),
                 ("DELETE", "/v1/sessions/{credential}")}
DEVICE_KEY = "cloudlet.device"  # request key: the authenticated device's record
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MANAGER: web.AppKey[ServiceManager] = web.AppKey("manager", ServiceManager)
METRICS: web.AppKey[ControllerMetrics] = web.AppKey("metrics", ControllerMetrics)
TOKEN: web.AppKey[str] = web.AppKey("token", str)
CONFIG: web.AppKey[ControllerConfig] = web.AppKey("config", ControllerConfig)
DEVICES: web.AppKey[DeviceRegistry] = web.AppKey("devices", DeviceRegistry)
FLEET: web.AppKey[FleetMap] = web.AppKey("fleet", FleetMap)
AUTH_LOG: web.AppKey[Throttle] = web.AppKey("auth_log", Throttle)


def error_response(status: int, code: str, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="cloudlet"'} if status == 401 else None
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def service_json(inst: Instance, config: ControllerConfig, runtime: str) -> dict[str, Any]:
    spec = inst.spec.to_json()
    return {
        "name": inst.name,
        "image": spec["image"],
        "port": spec["port"],
        "env": spec["env"],
        "limits": spec["limits"],
        "state": inst.state,
        "session_port": inst.session_port,
        "session_host": config.session_host,
        "cloudlet": config.cloudlet,
        "runtime": runtime,
        "backend": inst.backend,
        "created": datetime.fromtimestamp(inst.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        device: DeviceRecord | None = None
        if (request.method, request.path) not in PUBLIC:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            given = given.strip()
            if scheme.lower() != "bearer" or not given:
                _refuse(request, 401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
            if is_device_token(given):
                try:
                    device = request.app[DEVICES].authenticate(given)
                except DeviceAuthError as exc:
                    _refuse(request, exc.status, exc.code, str(exc), exc.device)
                assert device is not None
                if (request.method, route) not in DEVICE_ROUTES:
                    _refuse(request, 403, "forbidden", "a device credential may create sessions of its services, read "
                            "their fleet map and end its own sessions; this needs the admin token", device.device)
                request[DEVICE_KEY] = device
            elif not hmac.compare_digest(given.encode(), request.app[TOKEN].encode()):
                _refuse(request, 401, "unauthorized", "wrong bearer token")
        for key, what in (("name", "service name"), ("device", "device id")):  # before any handler runs
            if key in request.match_info:
                try:
                    check_name(request.match_info[key], what)
                except InvalidName as exc:
                    raise ControllerError(400, "bad_request", str(exc)) from exc
        if device is not None and "name" in request.match_info and not device.allows(request.match_info["name"]):
            _refuse(request, 403, "out_of_scope",
                    f"device {device.device} may not use service {request.match_info['name']}", device.device)
        response = await handler(request)
        status = response.status
        return response
    except ControllerError as exc:
        status = exc.status
        return error_response(exc.status, exc.code, str(exc))
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 404:
            return error_response(404, "not_found", f"no such endpoint: {request.method} {request.path}")
        if exc.status == 405:
            return error_response(405, "bad_request", f"method {request.method} not allowed on {request.path}")
        if exc.status == 413:
            return error_response(413, "bad_request", f"request body larger than {MAX_BODY} bytes")
        return error_response(exc.status, "bad_request", exc.reason)
    except (SessiondUnavailable, SessiondError) as exc:
        status = 503
        return error_response(503, "sessiond_unavailable", f"local sessiond: {exc}")
    except RuntimeFailure as exc:
        status = exc.status
        return error_response(exc.status, exc.code, str(exc))
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception as exc:
        log.exception("request failed")
        return error_response(500, "internal", f"internal error: {type(exc).__name__}: {exc}")
    finally:
        metrics.requests.labels(request.method, route, str(status)).inc()


def _refuse(request: web.Request, status: int, code: str, message: str, device: str | None = None) -> NoReturn:
    """Refuse the request: counted by code, logged (with the device id, never a credential) once per interval."""
    request.app[METRICS].auth_refusals.labels(code).inc()
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    resource = request.match_info.route.resource
    request.app[AUTH_LOG].event(logging.WARNING, "API request refused", f"{code}:{device}", code=code, device=device,
                                method=request.method, route=resource.canonical if resource else "unmatched",
                                peer=peer[0] if isinstance(peer, tuple) else None)
    raise ControllerError(status, code, message)


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        raise ControllerError(400, "bad_request", "request body required (JSON object)")
    raw = await request.read()
    try:
        return loads_bounded(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControllerError(400, "bad_request", f"request body is not valid JSON: {exc}") from exc


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(manager.runtime.ping(), 5)
        checks["runtime"] = "ok"
    except (TimeoutError, RuntimeFailure) as exc:
        checks["runtime"] = f"error: {exc}"
    try:
        await asyncio.wait_for(manager.sessiond.health(), 5)
        checks["sessiond"] = "ok"
    except (TimeoutError, SessiondUnavailable, SessiondError) as exc:
        checks["sessiond"] = f"error: {exc}"
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({
        "status": "ok" if ok else "degraded",
        "cloudlet": manager.config.cloudlet,
        "version": __version__,
        "runtime": manager.runtime.name,
        "checks": checks,
        "last_reconcile": manager.last_reconcile,
        "last_reconcile_error": manager.last_reconcile_error,
        "runtime_events": manager.event_stream,
    })


async def list_services(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    items = [service_json(i, manager.config, manager.runtime.name) for i in await manager.list()]
    return web.json_response({"services": items})


async def get_service(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    inst = await manager.get(name)
    if inst is None:
        raise ControllerError(404, "not_found", f"no service {name} on cloudlet {manager.config.cloudlet}")
    return web.json_response(service_json(inst, manager.config, manager.runtime.name))


async def put_service(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    body = await _json_body(request)
    try:
        spec = ServiceSpec.from_request(name, body)
    except SpecError as exc:
        raise ControllerError(400, "bad_request", str(exc)) from exc
    result = await manager.create(spec)
    return web.json_response(
        service_json(result.instance, manager.config, manager.runtime.name), status=201 if result.created else 200
    )


async def delete_service(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    if not await manager.delete(name):
        raise ControllerError(404, "not_found", f"no service {name} on cloudlet {manager.config.cloudlet}")
    return web.Response(status=204)


def _device(request: web.Request) -> DeviceRecord | None:
    device: DeviceRecord | None = request.get(DEVICE_KEY)
    return device


async def create_session(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    device = _device(request)
    cred, inst = await manager.issue_session(request.match_info["name"], device.device if device else "")
    local = fleet_entry(manager.config.cloudlet, manager.config.session_host, inst.session_port,
                        str(request.url.origin()))
    return web.json_response(
        {
            "session": cred.token,
            "id": cred.session_id,
            "service": inst.name,
            "cloudlet": manager.config.cloudlet,
            "host": manager.config.session_host,
            "port": inst.session_port,
            "issued": cred.issued,
            "device": cred.device or None,
            "map": await request.app[FLEET].for_service(inst.name, local),
        },
        status=201,
    )


async def service_map(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    inst = await manager.get(name)
    local = (fleet_entry(manager.config.cloudlet, manager.config.session_host, inst.session_port,
                         str(request.url.origin()))
             if inst is not None and inst.state == "running" else None)
    fleet_map = await request.app[FLEET].for_service(name, local)
    if not fleet_map["cloudlets"]:
        raise ControllerError(404, "not_found", f"service {name} runs on no cloudlet of the fleet")
    return web.json_response(fleet_map)


async def delete_session(request: web.Request) -> web.Response:
    device = _device(request)
    await request.app[MANAGER].end_session(request.match_info["credential"], device.device if device else None)
    return web.Response(status=204)


async def list_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": [r.to_json() for r in request.app[DEVICES].all()]})


async def get_device(request: web.Request) -> web.Response:
    record = request.app[DEVICES].get(request.match_info["device"])
    if record is None:
        raise ControllerError(404, "not_found", f"no device {request.match_info['device']} on cloudlet "
                              f"{request.app[CONFIG].cloudlet}")
    return web.json_response(record.to_json())


async def put_device(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    device = request.match_info["device"]
    body = await _json_body(request)
    try:
        record = DeviceRecord.from_request(device, body)
    except ValueError as exc:
        raise ControllerError(400, "bad_request", str(exc)) from exc
    longest = time.time() + manager.config.device_lifetime_days_max * 86400
    if record.expires > longest:
        raise ControllerError(400, "bad_request", f"expires is more than device_lifetime_days_max "
                              f"({manager.config.device_lifetime_days_max}) days away")
    result = request.app[DEVICES].put(record)
    await manager.push_device(record)
    event(log, logging.INFO, "device registered", device=device, result=result, services=list(record.services),
          expires=record.expires)
    return web.json_response({"device": device, "result": result, "services": list(record.services),
                              "expires": record.expires}, status=201 if result == "created" else 200)


async def revoke_device(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    device = request.match_info["device"]
    record = request.app[DEVICES].revoke(device)
    if record is None:
        raise ControllerError(404, "not_found", f"no device {device} on cloudlet {manager.config.cloudlet}")
    await manager.push_device(record)
    event(log, logging.INFO, "device revoked", device=device)
    return web.Response(status=204)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def build_app(manager: ServiceManager, token: str, devices: DeviceRegistry, fleet: FleetMap) -> web.Application:
    if not token:
        raise ValueError("the API token must not be empty")
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[MANAGER] = manager
    app[METRICS] = manager.metrics
    app[TOKEN] = token
    app[CONFIG] = manager.config
    app[DEVICES] = devices
    app[FLEET] = fleet
    app[AUTH_LOG] = Throttle(log, 10.0)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/services", list_services)
    app.router.add_get("/v1/services/{name}", get_service)
    app.router.add_put("/v1/services/{name}", put_service)
    app.router.add_delete("/v1/services/{name}", delete_service)
    app.router.add_post("/v1/services/{name}/sessions", create_session)
    app.router.add_get("/v1/services/{name}/map", service_map)
    app.router.add_get("/v1/devices", list_devices)
    app.router.add_get("/v1/devices/{device}", get_device)
    app.router.add_put("/v1/devices/{device}", put_device)
    app.router.add_delete("/v1/devices/{device}", revoke_device)
    app.router.add_delete("/v1/sessions/{credential}", delete_session)
    app.router.add_get("/metrics", metrics_handler)
    return app


def started_event(config: ControllerConfig) -> None:
    event(log, logging.INFO, "controller listening", cloudlet=config.cloudlet, listen=config.listen,
          runtime=config.runtime, at=time.time())

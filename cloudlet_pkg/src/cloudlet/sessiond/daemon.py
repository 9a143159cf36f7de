"""One running session daemon: service ports, the peer endpoint, the control API, metrics, saved services.

Usable in-process (tests, benchmarks) as well as from ``cloudlet sessiond`` (``cloudlet.sessiond.main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloudlet.common.addresses import format_address, parse_hostport
from cloudlet.common.logs import event
from cloudlet.common.names import NAME_RULE, is_name
from cloudlet.protocol import credentials
from cloudlet.relay.connection import ServerConnection
from cloudlet.relay.interfaces import ServiceEntry
from cloudlet.relay.manager import SessionManager
from cloudlet.relay.metrics import SessiondMetrics
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.peers import make_connector

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _validate_backend(backend: Any) -> str:
    if not isinstance(backend, str):
        raise ApiError(400, "bad_request", "backend must be a string HOST:PORT")
    try:
        host, port = parse_hostport(backend, "backend")
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    if port == 0:
        raise ApiError(400, "bad_request", "backend port must not be 0")
    return backend


class Sessiond:
    """One running session daemon (usable in-process by tests and benchmarks)."""

    def __init__(self, config: SessiondConfig, connector: Any = None) -> None:
        self.config = config
        self._connector = connector
        self.metrics = SessiondMetrics()
        self.manager: SessionManager | None = None
        self.peer_server: asyncio.AbstractServer | None = None
        self._runners: list[web.AppRunner] = []
        self.peer_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._lock = asyncio.Lock()
        self.stopped = asyncio.Event()

    @property
    def services_file(self) -> Path:
        return Path(self.config.state_dir) / "services.json"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        secret = credentials.load_secret(cfg.secret_file)
        connector = self._connector or make_connector(cfg.peers, float(cfg.peer_connect_timeout_seconds))
        self._connector = connector
        hook = getattr(connector, "metrics", None)
        if hook is not None:
            hook(self.metrics.registry)
        self.manager = SessionManager(
            cloudlet=cfg.cloudlet, secret=secret, metrics=self.metrics,
            grace_seconds=float(cfg.grace_seconds), buffer_bytes=int(cfg.buffer_bytes),
            replay_bytes=int(cfg.replay_bytes),
            max_sessions=int(cfg.max_sessions), header_timeout=float(cfg.header_timeout_seconds),
            credential_lifetime=float(cfg.credential_lifetime_seconds),
            backend_connect_timeout=float(cfg.backend_connect_timeout_seconds), connector=connector,
            splice_threshold=None if int(cfg.splice_threshold_bytes) < 0 else int(cfg.splice_threshold_bytes),
        )
        start = getattr(connector, "start", None)
        if start is not None:
            await start()
        loop = asyncio.get_running_loop()
        host, port = parse_hostport(cfg.peer_listen, "peer_listen")
        m = self.manager
        self.peer_server = await loop.create_server(lambda: ServerConnection(m, None), host, port,
                                                    reuse_address=True, backlog=1024)
        self.peer_address = self.peer_server.sockets[0].getsockname()[:2]
        await self._start_control()
        if cfg.metrics_listen:
            await self._start_metrics()
        await self._restore_services()
        event(log, logging.INFO, "sessiond started", cloudlet=cfg.cloudlet, peer_listen=format_address(self.peer_address),
              control_socket=cfg.control_socket, metrics_listen=format_address(self.metrics_address),
              services=len(m.services), peers=sorted(cfg.peers),
              loop=type(asyncio.get_running_loop()).__module__.split(".")[0])

    async def stop(self) -> None:
        if self.manager is not None:
            for entry in list(self.manager.services.values()):
                if entry.server is not None:
                    entry.server.close()
            self.manager.end_all()
        if self.peer_server is not None:
            self.peer_server.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._connector is not None:
            await self._connector.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.control_socket)
        self.stopped.set()
        event(log, logging.INFO, "sessiond stopped", cloudlet=self.config.cloudlet)

    # -- services ----------------------------------------------------------------------------
    async def put_service(self, name: str, backend: Any, port: Any = 0, listen: Any = "0.0.0.0") -> tuple[ServiceEntry, bool]:
        """Add or change a service; returns ``(entry, changed)``. Raises ``ApiError``."""
        m = self.manager
        assert m is not None
        if not is_name(name):
            raise ApiError(400, "bad_request", f"invalid service name {name!r}: use {NAME_RULE}")
        backend = _validate_backend(backend)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ApiError(400, "bad_request", "port must be an integer 0..65535 (0 = any free port)")
        if not isinstance(listen, str) or not listen:
            raise ApiError(400, "bad_request", "listen must be an address string such as 0.0.0.0")
        async with self._lock:
            old = m.services.get(name)
            if old is not None and old.listen == listen and (port == 0 or port == old.port):
                changed = old.backend != backend
                old.backend = backend  # new sessions use the new backend; live ones keep theirs
                if changed:
                    self._save()
                    event(log, logging.INFO, "service backend changed", service=name, backend=backend)
                return old, changed
            entry = ServiceEntry(name, port, listen, backend)
            loop = asyncio.get_running_loop()
            try:
                entry.server = await loop.create_server(lambda: ServerConnection(m, entry), listen, port,
                                                        reuse_address=True, backlog=1024)
            except OSError as exc:
                raise ApiError(409, "port_unavailable", f"cannot listen on {listen}:{port}: {exc.strerror or exc}") from None
            entry.port = entry.server.sockets[0].getsockname()[1]
            m.services[name] = entry
            if old is not None:  # port or address changed: old listener goes, live sessions move to the new entry
                old.server.close()
                for s in m.sessions.values():
                    if s.service is old:
                        s.service = entry
                for f in m.forwards:
                    if f.service is old:
                        f.service = entry
            self._save()
            event(log, logging.INFO, "service listening", service=name, listen=listen, port=entry.port, backend=backend)
            return entry, True

    async def delete_service(self, name: str) -> None:
        m = self.manager
        assert m is not None
        async with self._lock:
            entry = m.services.pop(name, None)
            if entry is None:
                raise ApiError(404, "not_found", f"no service {name!r}")
            entry.server.close()
            m.end_service(entry)
            self._save()
            event(log, logging.INFO, "service removed", service=name)

    def _save(self) -> None:
        assert self.manager is not None
        path = self.services_file
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"services": [{"name": e.name, "port": e.port, "listen": e.listen, "backend": e.backend}
                             for e in self.manager.services.values()]}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    async def _restore_services(self) -> None:
        path = self.services_file
        if not path.exists():
            return
        try:
            items = json.loads(path.read_text())["services"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            event(log, logging.ERROR, "cannot read saved services; starting without them", path=str(path), error=str(exc))
            return
        for item in items:
            try:
                await self.put_service(item["name"], item["backend"], int(item["port"]), item.get("listen", "0.0.0.0"))
            except (ApiError, KeyError, TypeError, ValueError) as exc:
                event(log, logging.ERROR, "cannot restore service", service=item.get("name") if isinstance(item, dict) else None,
                      error=str(exc))

    def service_json(self, entry: ServiceEntry) -> dict[str, Any]:
        assert self.manager is not None
        return entry.to_json(self.manager.service_sessions(entry))

    # -- control API -------------------------------------------------------------------------
    async def _start_control(self) -> None:
        app = web.Application(middlewares=[_error_middleware], client_max_size=64 * 1024)
        app.add_routes([
            web.get("/v1/health", self._h_health),
            web.get("/v1/services", self._h_services),
            web.get("/v1/services/{name}", self._h_service_get),
            web.put("/v1/services/{name}", self._h_service_put),
            web.delete("/v1/services/{name}", self._h_service_delete),
            web.get("/v1/sessions", self._h_sessions),
            web.delete("/v1/sessions/{key}", self._h_session_delete),
            web.get("/v1/peers", self._h_peers),
            web.get("/metrics", self._h_metrics),
        ])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        path = Path(self.config.control_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        site = web.UnixSite(runner, str(path))
        await site.start()
        os.chmod(path, 0o660)
        self._runners.append(runner)

    async def _start_metrics(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._h_metrics)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_hostport(self.config.metrics_listen, "metrics_listen")
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        if server is not None and server.sockets:
            self.metrics_address = server.sockets[0].getsockname()[:2]
        self._runners.append(runner)

    async def _h_health(self, request: web.Request) -> web.Response:
        m = self.manager
        assert m is not None
        return web.json_response({
            "status": "ok", "cloudlet": self.config.cloudlet, "services": len(m.services), "sessions": m.live_count(),
            "peer_listen": format_address(self.peer_address), "metrics_listen": format_address(self.metrics_address),
        })

    async def _h_services(self, request: web.Request) -> web.Response:
        assert self.manager is not None
        return web.json_response({"services": [self.service_json(e) for e in self.manager.services.values()]})

    async def _h_service_get(self, request: web.Request) -> web.Response:
        assert self.manager is not None
        entry = self.manager.services.get(request.match_info["name"])
        if entry is None:
            raise ApiError(404, "not_found", f"no service {request.match_info['name']!r}")
        return web.json_response(self.service_json(entry))

    async def _h_service_put(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        unknown = set(body) - {"backend", "port", "listen"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
        if "backend" not in body:
            raise ApiError(400, "bad_request", "backend is required")
        entry, _ = await self.put_service(request.match_info["name"], body["backend"], body.get("port", 0),
                                          body.get("listen", "0.0.0.0"))
        return web.json_response(self.service_json(entry))

    async def _h_service_delete(self, request: web.Request) -> web.Response:
        await self.delete_service(request.match_info["name"])
        return web.Response(status=204)

    async def _h_sessions(self, request: web.Request) -> web.Response:
        assert self.manager is not None
        return web.json_response({"sessions": self.manager.list_sessions(request.query.get("service"))})

    async def _h_session_delete(self, request: web.Request) -> web.Response:
        m = self.manager
        assert m is not None
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

    async def _h_peers(self, request: web.Request) -> web.Response:
        status = getattr(self._connector, "status", None)
        return web.json_response({"peers": status() if status is not None else []})

    async def _h_metrics(self, request: web.Request) -> web.Response:
        assert self.manager is not None
        self.manager.collect()
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


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

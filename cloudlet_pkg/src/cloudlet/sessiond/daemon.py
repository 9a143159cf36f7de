"""One running session daemon: service ports, the peer endpoint, its control API and metrics endpoint, saved services.

Usable in-process (tests, benchmarks) as well as from ``cloudlet sessiond`` (``cloudlet.sessiond.main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from cloudlet.common import sdnotify
from cloudlet.common.addresses import format_address, parse_hostport
from cloudlet.common.admission import Admission
from cloudlet.common.config import ConfigError
from cloudlet.common.logs import event
from cloudlet.common.names import NAME_RULE, is_name
from cloudlet.protocol import credentials
from cloudlet.relay.connection import ServerConnection
from cloudlet.relay.devices import DeviceGate, DeviceState
from cloudlet.relay.interfaces import ServiceEntry
from cloudlet.relay.ledger import SessionLedger
from cloudlet.relay.manager import SessionManager
from cloudlet.relay.metrics import SessiondMetrics
from cloudlet.sessiond import handoff
from cloudlet.sessiond.errors import ApiError
from cloudlet.sessiond.config import SessiondConfig, check_files
from cloudlet.sessiond.ledger_file import FileJournal
from cloudlet.sessiond.peers import make_connector
from cloudlet.sessiond.reload import ReloadPlan, ReloadRefused, apply_limits, plan, refuse_restart_keys
from cloudlet.sessiond.store import DeviceStore, ServiceStore

if TYPE_CHECKING:
    from cloudlet.common.httpserver import HttpServer

log = logging.getLogger(__name__)


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

    def __init__(self, config: SessiondConfig, connector: Any = None, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # the file a reload reads again
        self.store = ServiceStore(Path(config.state_dir) / "services.json")
        self.device_store = DeviceStore(Path(config.state_dir) / "devices.json")
        self.devices = DeviceGate()
        self.journal = FileJournal(Path(config.state_dir) / "sessions.log")
        self.ledger: SessionLedger | None = None
        self._connector = connector
        self.metrics = SessiondMetrics()
        self.manager: SessionManager | None = None
        self.peer_server: asyncio.AbstractServer | None = None
        self._http: list[HttpServer] = []
        self.peer_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.inherited = handoff.Inherited()  # descriptors a previous process handed over (fd store)
        self.handed_over = 0
        self.taken_back = 0
        self._hold_accept = False  # while starting with handed-over sessions: listen, accept only once they are back
        self.successor_argv: list[str] | None = None  # how to start the next process (in-place upgrade)
        self.predecessor: handoff.Predecessor | None = None  # the process this one took over from
        self._successor: handoff.Successor | None = None
        self._upgrade_task: asyncio.Task[None] | None = None
        self._taking = False  # the successor said "take": no way back from here
        self.exit_status = 0  # what the process exits with (1: an upgrade lost the service)

    @property
    def services_file(self) -> Path:
        return self.store.path

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        predecessor = handoff.Predecessor.from_environment()
        secret = credentials.load_secret(cfg.secret_file)
        connector = self._connector or make_connector(cfg.peers, float(cfg.peer_connect_timeout_seconds))
        self._connector = connector
        hook = getattr(connector, "metrics", None)
        if hook is not None:
            hook(self.metrics.registry)
        start = getattr(connector, "start", None)
        if predecessor is not None:  # an in-place upgrade: everything comes over from the running process
            if start is not None:  # our own tunnels first, so what it forwarded heals through them at once
                await start()
                start = None
                await self._peers_up(5.0)
            self.predecessor = predecessor
            self.inherited = await asyncio.to_thread(predecessor.take)
        elif cfg.handoff:
            self.inherited = handoff.Inherited.from_environment()
        self.ledger = SessionLedger(int(cfg.session_record_limit), float(cfg.credential_lifetime_seconds))
        self.journal.open(self.ledger)  # ended (and started) sessions from before this start
        max_open, max_pending, per_source = cfg.admission_limits()
        self.manager = SessionManager(
            cloudlet=cfg.cloudlet, secret=secret, metrics=self.metrics,
            grace_seconds=float(cfg.grace_seconds), buffer_bytes=int(cfg.buffer_bytes),
            replay_bytes=int(cfg.replay_bytes),
            max_sessions=int(cfg.max_sessions), max_sessions_per_device=int(cfg.max_sessions_per_device),
            header_timeout=float(cfg.header_timeout_seconds),
            credential_lifetime=float(cfg.credential_lifetime_seconds),
            backend_connect_timeout=float(cfg.backend_connect_timeout_seconds), connector=connector,
            splice_threshold=None if int(cfg.splice_threshold_bytes) < 0 else int(cfg.splice_threshold_bytes),
            admission=Admission("sessiond service ports", max_open, max_pending, per_source),
            peer_admission=Admission("sessiond peer endpoint", max_open, max_pending, max_pending),
            held_budget=int(cfg.held_bytes_budget),
            ledger=self.ledger,
            devices=self.devices,
        )
        self.devices.load(self.device_store.load())
        self.metrics.watch_admission("service", self.manager.admission)
        self.metrics.watch_admission("peer", self.manager.peer_admission)
        if start is not None:
            await start()
        loop = asyncio.get_running_loop()
        host, port = parse_hostport(cfg.peer_listen, "peer_listen")
        m = self.manager
        self._hold_accept = bool(self.inherited.fds)
        peer_sock = self.inherited.take(handoff.LISTENER + "peer")
        if peer_sock is not None and peer_sock.getsockname()[1] == port:
            self.peer_server = await loop.create_server(lambda: ServerConnection(m, None), sock=peer_sock, backlog=1024,
                                                        start_serving=not self._hold_accept)
        else:
            if peer_sock is not None:
                peer_sock.close()
            self.peer_server = await loop.create_server(lambda: ServerConnection(m, None), host, port,
                                                        reuse_address=True, backlog=1024,
                                                        start_serving=not self._hold_accept)
        self.peer_address = self.peer_server.sockets[0].getsockname()[:2]
        await self._restore_services()
        if self.inherited.fds:
            self.taken_back = await handoff.take_back(m, self.inherited)
            self.inherited.close_rest()
        if self._hold_accept:  # an attach that waited in the backlog now finds its session
            self._hold_accept = False
            for server in [self.peer_server, *(e.server for e in m.services.values())]:
                if server is not None:
                    await server.start_serving()
        # the sessions relay again; the control API and metrics come next (the controller and
        # a health check retry until they answer; systemd hears READY=1 only after both)
        await self._start_control()
        if cfg.metrics_listen:
            await self._start_metrics()
        event(log, logging.INFO, "sessiond started", cloudlet=cfg.cloudlet, peer_listen=format_address(self.peer_address),
              control_socket=cfg.control_socket, metrics_listen=format_address(self.metrics_address),
              services=len(m.services), peers=sorted(cfg.peers),
              loop=type(asyncio.get_running_loop()).__module__.split(".")[0])

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        task = self._upgrade_task
        if task is not None and not task.done():
            if self._taking:  # the successor has it all (or is taking it): finish the upgrade, nothing else
                await task
                return
            task.cancel()  # before "take": the successor goes, this process stops as it would have
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._successor is not None:
                self._successor.abandon()
                self._successor = None
        if self.manager is not None and self.config.handoff and handoff.available():
            try:  # the listeners first: connections that arrive now wait in their backlog for the next process
                self.handed_over = await self._hand_over(handoff.store_fd)
            except OSError as exc:
                event(log, logging.ERROR, "hand-over to the next process failed; ending sessions", error=str(exc))
        await self._shutdown()

    async def _hand_over(self, sink: handoff.Sink) -> int:
        assert self.manager is not None
        # each listener stops accepting here once passed on: its copy keeps the socket, so what
        # arrives from now on waits in the backlog for the next process (not for end_all)
        handoff.store_listener("peer", self.peer_server, sink)
        if self.peer_server is not None:
            self.peer_server.close()
        for entry in self.manager.services.values():
            handoff.store_listener(entry.name, entry.server, sink)
            if entry.server is not None:
                entry.server.close()
        return await handoff.hand_over(self.manager, float(self.config.handoff_flush_seconds), sink)

    # -- in-place upgrade (sessiond/handoff.py, Successor) ------------------------------------------
    def begin_upgrade(self) -> int:
        """Start the next process now (the installed code); it takes over once it is ready. Its PID."""
        if self.successor_argv is None:
            raise ApiError(409, "not_supported", "this sessiond cannot start its successor (not run by cloudlet sessiond)")
        if os.getpid() == 1:
            raise ApiError(409, "not_supported", "sessiond is PID 1 here: its exit would end the container; restart it")
        if self._successor is not None:
            raise ApiError(409, "in_progress", f"an upgrade is already under way (successor pid {self._successor.pid})")
        try:
            self._successor = handoff.Successor(self.successor_argv)
        except OSError as exc:
            raise ApiError(500, "internal", f"cannot start the successor: {exc}") from None
        event(log, logging.INFO, "in-place upgrade: successor started", successor=self._successor.pid)
        self._upgrade_task = asyncio.get_running_loop().create_task(self._upgrade(self._successor))
        return self._successor.pid

    async def _upgrade(self, successor: handoff.Successor) -> None:
        if not await successor.wait_ready(60.0):
            code = successor.proc.poll()
            event(log, logging.ERROR, "in-place upgrade abandoned: the successor did not get ready; serving on",
                  successor=successor.pid, exit_status=code)
            successor.abandon()
            self._successor = None
            return
        self._taking = True
        started = time.monotonic()
        for server in self._http:  # its control socket and metrics port are the successor's now
            await server.close()
        self._http.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.control_socket)
        try:
            self.handed_over = await self._hand_over(successor.send)
        except OSError as exc:
            event(log, logging.ERROR, "in-place upgrade: hand-over failed; ending sessions", error=str(exc))
        await self._shutdown(final=False)
        with contextlib.suppress(OSError):
            successor.done()
        ok = await successor.wait_started(60.0)
        if ok or successor.proc.poll() is None:
            # it holds everything now: even a slow one is the unit's main process from here on (were
            # this process to exit as main, systemd would stop the unit and kill the successor)
            sdnotify.notify(f"MAINPID={successor.pid}")
            if ok:
                event(log, logging.INFO, "upgraded in place", successor=successor.pid, sessions=self.handed_over,
                      ms=round((time.monotonic() - started) * 1000, 1))
            else:
                event(log, logging.WARNING, "in-place upgrade: the successor has not said it serves within 60 s; "
                      "it is the main process all the same", successor=successor.pid)
        else:
            event(log, logging.ERROR, "in-place upgrade: the successor died while taking over; its sessions are "
                  "lost, exiting with failure so that the service manager restarts the daemon",
                  successor=successor.pid, exit_status=successor.proc.poll())
            self.exit_status = 1
        successor.close()
        self.stopped.set()

    async def _shutdown(self, final: bool = True) -> None:
        if self.manager is not None:
            for entry in list(self.manager.services.values()):
                if entry.server is not None:
                    entry.server.close()
            self.manager.end_all()
        if self.peer_server is not None:
            self.peer_server.close()
        for server in self._http:
            await server.close()
        self._http.clear()
        if self._connector is not None:
            await self._connector.close()
        self.journal.close()
        if final:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.control_socket)
            self.stopped.set()
        event(log, logging.INFO, "sessiond stopped", cloudlet=self.config.cloudlet)

    # -- reload (cloudlet.sessiond.reload) ------------------------------------------------------
    async def reload(self, new: SessiondConfig) -> ReloadPlan:
        """Apply ``new`` in place (peers, limits, log level) or raise ``ReloadRefused`` having applied nothing."""
        m = self.manager
        assert m is not None
        async with self._lock:
            try:
                p = plan(self.config, new)
                refuse_restart_keys(p)
                update = getattr(m.connector, "update", None)
                if update is None and (p.peers or "peer_connect_timeout_seconds" in p.changed):
                    raise ReloadRefused("restart_required", "this sessiond's peer connector cannot change in place")
                if update is not None:  # also when no peer changed: tunnels that are down retry at once
                    await update(new.peers, float(new.peer_connect_timeout_seconds))
                apply_limits(m, new, log_level="log_level" in p.changed)
            except ReloadRefused as exc:
                self.metrics.reloads.labels("refused").inc()
                event(log, logging.ERROR, "reload refused; the running config stays", reason=exc.code, error=exc.message)
                raise
            self.config = new
        self.metrics.reloads.labels("applied").inc()
        event(log, logging.INFO, "config reloaded", **p.to_json(), sessions=m.live_count())
        return p

    async def reload_file(self) -> ReloadPlan:
        """Read the config file again and :meth:`reload` it; a file that does not validate is refused."""
        if self.config_path is None:
            raise ReloadRefused("bad_config", "this sessiond was not started from a config file")
        try:
            new = SessiondConfig.load(self.config_path)
            problems = check_files(new, keys=False)
            if problems:
                raise ConfigError(self.config_path, problems)
        except ConfigError as exc:
            self.metrics.reloads.labels("refused").inc()
            event(log, logging.ERROR, "reload refused; the running config stays", reason="bad_config", error=str(exc))
            raise ReloadRefused("bad_config", f"bad config {exc}; nothing was applied") from None
        return await self.reload(new)

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
                inherited = self.inherited.take(handoff.LISTENER + name)
                if inherited is not None and port in (0, inherited.getsockname()[1]):
                    entry.server = await loop.create_server(lambda: ServerConnection(m, entry), sock=inherited,
                                                            backlog=1024, start_serving=not self._hold_accept)
                else:
                    if inherited is not None:
                        inherited.close()
                    entry.server = await loop.create_server(lambda: ServerConnection(m, entry), listen, port,
                                                            reuse_address=True, backlog=1024,
                                                            start_serving=not self._hold_accept)
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
        self.store.save(self.manager.services.values())

    async def _restore_services(self) -> None:
        for item in self.store.load():
            try:
                await self.put_service(item.name, item.backend, item.port, item.listen)
            except ApiError as exc:
                event(log, logging.ERROR, "cannot restore service", service=item.name, error=str(exc))

    def put_device(self, device: str, expires: Any, revoked: Any) -> bool:
        """The controller's word on one device; a revoked device's live sessions end here at once."""
        if not is_name(device):
            raise ApiError(400, "bad_request", f"invalid device id {device!r}: use {NAME_RULE}")
        if not isinstance(expires, int) or isinstance(expires, bool) or expires < 0:
            raise ApiError(400, "bad_request", "expires must be Unix seconds (an integer)")
        if not isinstance(revoked, bool):
            raise ApiError(400, "bad_request", "revoked must be true or false")
        changed = self.devices.put(DeviceState(device, expires, revoked))
        if changed:
            self.device_store.save(self.devices.all())
            event(log, logging.INFO, "device updated", device=device, expires=expires, revoked=revoked)
        if revoked and self.manager is not None:
            ended = self.manager.end_device(device, "device_revoked")
            if ended:
                event(log, logging.INFO, "revoked device's sessions ended", device=device, sessions=ended)
        return changed

    def delete_device(self, device: str) -> bool:
        found = self.devices.forget(device)
        if found:
            self.device_store.save(self.devices.all())
        return found

    def service_json(self, entry: ServiceEntry) -> dict[str, Any]:
        assert self.manager is not None
        return entry.to_json(self.manager.service_sessions(entry))

    # -- control API and metrics endpoint (cloudlet.sessiond.api) -------------------------------
    async def _start_control(self) -> None:
        # imported here: the HTTP stack (aiohttp, ~0.17 s) loads after the sessions relay again
        from cloudlet.common.httpserver import HttpServer
        from cloudlet.sessiond.api import build_control_app

        server = HttpServer(build_control_app(self), "sessiond control API")
        path = Path(self.config.control_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        await server.start_unix(str(path))
        self._http.append(server)

    async def _start_metrics(self) -> None:
        from cloudlet.common.httpserver import HttpServer
        from cloudlet.sessiond.api import build_metrics_app

        server = HttpServer(build_metrics_app(self), "sessiond metrics")
        host, port = parse_hostport(self.config.metrics_listen, "metrics_listen")
        self.metrics_address = await server.start_tcp(host, port)
        self._http.append(server)

    async def _peers_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.get("state") != "up" for p in self.peers_status()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def peers_status(self) -> list[dict[str, Any]]:
        status = getattr(self._connector, "status", None)
        return list(status()) if status is not None else []

    def metrics_text(self) -> bytes:
        assert self.manager is not None
        self.manager.collect()
        return bytes(generate_latest(self.metrics.registry))

"""The controller's logic: create, delete and reconcile services across runtime and sessiond.

The runtime's labels are the source of truth. Every create and delete holds a per-service lock; a
reconcile pass skips services with an operation in flight, registers running services that
sessiond does not know (or knows with an old backend or port), removes sessiond registrations
without a container, and starts containers that stopped (for example after a host reboot).

Passes run one at a time in one task: at start, every ``reconcile_interval_seconds``, and at once
(after ``event_debounce_seconds``, so a burst of events gives one pass) when the runtime's event
stream reports a change of one of this cloudlet's services.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from cloudlet.common.logs import event
from cloudlet.controller.config import ControllerConfig
from cloudlet.controller.devices import DeviceRecord, DeviceRegistry
from cloudlet.controller.metrics import ControllerMetrics
from cloudlet.controller.runtime.base import (
    LOST,
    RESYNC,
    Instance,
    Runtime,
    RuntimeEvent,
    RuntimeFailure,
    ServiceSpec,
)
from cloudlet.controller.sessiond_client import (
    SessiondClient,
    SessiondError,
    SessiondUnavailable,
)
from cloudlet.protocol import credentials

log = logging.getLogger(__name__)


class ControllerError(Exception):
    """An API-level error: HTTP ``status``, error ``code`` and a clear message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class CreateResult:
    instance: Instance
    created: bool  # False: an identical service already existed


class ServiceManager:
    def __init__(
        self,
        config: ControllerConfig,
        runtime: Runtime,
        sessiond: SessiondClient,
        secret: bytes,
        metrics: ControllerMetrics,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.sessiond = sessiond
        self.secret = secret
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._reserved_ports: set[int] = set()
        self._port_lock = asyncio.Lock()
        self._reconcile_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reconcile_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # set by runtime events: a pass is due
        self._wake_trigger = "event"
        self._restarted_at: dict[str, float] = {}  # monotonic time of each service's last restart
        self.event_stream = "off" if not config.runtime_events else "connecting"
        self.devices: DeviceRegistry | None = None  # set by the daemon
        self._devices_unsynced: set[str] = set()
        self.last_reconcile: float | None = None
        self.last_reconcile_error: str | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _release_lock(self, name: str) -> None:
        lock = self._locks.get(name)
        if lock is not None and not lock.locked():
            del self._locks[name]

    async def _runtime_call(self, coro: Any) -> Any:
        try:
            return await coro
        except RuntimeFailure as exc:
            raise ControllerError(exc.status, exc.code, str(exc)) from exc

    async def list(self) -> list[Instance]:
        instances: list[Instance] = await self._runtime_call(self.runtime.list())
        return sorted(instances, key=lambda i: i.name)

    async def get(self, name: str) -> Instance | None:
        inst: Instance | None = await self._runtime_call(self.runtime.get(name))
        return inst

    def _port_free(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.config.session_listen if self.config.session_listen != "::" else "0.0.0.0", port))
            except OSError:
                return False
        return True

    async def _allocate_port(self, used: set[int]) -> int:
        first, last = self.config.port_range
        try:
            registered = {s.port for s in (await self.sessiond.services()).values()}
        except (SessiondUnavailable, SessiondError) as exc:
            raise ControllerError(503, "sessiond_unavailable", f"local sessiond unavailable: {exc}") from exc
        taken = used | registered | self._reserved_ports
        for port in range(first, last + 1):
            if port not in taken and self._port_free(port):
                self._reserved_ports.add(port)
                return port
        raise ControllerError(
            503, "no_free_port", f"no free session port in port_range [{first}, {last}]"
        )

    async def _register(self, inst: Instance) -> None:
        if inst.backend is None:
            raise ControllerError(502, "service_failed", f"service {inst.name} has no backend address")
        await self.sessiond.put_service(inst.name, inst.backend, inst.session_port, self.config.session_listen)

    # -- operations ----------------------------------------------------------------------------

    async def create(self, spec: ServiceSpec) -> CreateResult:
        start = time.monotonic()
        lock = self._lock(spec.name)
        try:
            async with lock:
                result = await self._create_locked(spec)
        except ControllerError as exc:
            self.metrics.launches.labels(exc.code).inc()
            raise
        finally:
            self._release_lock(spec.name)
        self.metrics.launches.labels("created" if result.created else "unchanged").inc()
        if result.created:
            self.metrics.launch_seconds.observe(time.monotonic() - start)
        return result

    async def _create_locked(self, spec: ServiceSpec) -> CreateResult:
        instances = await self.list()
        existing = next((i for i in instances if i.name == spec.name), None)
        if existing is not None:
            if existing.spec != spec:
                raise ControllerError(
                    409, "conflict",
                    f"service {spec.name} exists with a different spec (image {existing.spec.image}, port "
                    f"{existing.spec.port}); delete it first",
                )
            if existing.state != "running":
                existing = await self._runtime_call(self.runtime.ensure_running(existing))
            try:
                await self._register(existing)
            except (SessiondUnavailable, SessiondError) as exc:
                raise ControllerError(503, "sessiond_unavailable", f"local sessiond: {exc}") from exc
            return CreateResult(existing, created=False)
        if len(instances) >= self.config.max_services:
            raise ControllerError(409, "limit", f"cloudlet already runs max_services={self.config.max_services}")
        async with self._port_lock:
            port = await self._allocate_port({i.session_port for i in instances})
        try:
            inst = await self._runtime_call(
                self.runtime.create(spec, port, self.config.ready_timeout_seconds)
            )
            try:
                await self._register(inst)
            except BaseException as exc:
                # never leave a container without its session port, nor a half registration
                await self._cleanup_after_failed_register(spec.name)
                if isinstance(exc, (SessiondUnavailable, SessiondError)):
                    raise ControllerError(
                        503, "sessiond_unavailable",
                        f"local sessiond refused or is unreachable ({exc}); the container was removed",
                    ) from exc
                raise
        finally:
            self._reserved_ports.discard(port)
        event(log, logging.INFO, "service created", service=spec.name, image=spec.image,
              session_port=port, backend=inst.backend)
        return CreateResult(inst, created=True)

    async def _cleanup_after_failed_register(self, name: str) -> None:
        try:
            await self.sessiond.delete_service(name)
        except (SessiondUnavailable, SessiondError):
            pass
        try:
            await self.runtime.delete(name)
        except RuntimeFailure as exc:
            event(log, logging.ERROR, "cleanup failed; reconcile will retry", service=name, error=str(exc))

    async def delete(self, name: str) -> bool:
        lock = self._lock(name)
        try:
            async with lock:
                try:
                    unregistered = await self.sessiond.delete_service(name)
                except (SessiondUnavailable, SessiondError) as exc:
                    event(log, logging.WARNING, "sessiond unreachable on delete; reconcile will unregister",
                          service=name, error=str(exc))
                    unregistered = False
                removed = await self._runtime_call(self.runtime.delete(name))
        finally:
            self._release_lock(name)
        if removed or unregistered:
            self.metrics.deletes.inc()
            event(log, logging.INFO, "service deleted", service=name)
        return removed or unregistered

    async def issue_session(self, name: str, device: str = "") -> tuple[credentials.Credential, Instance]:
        inst = await self.get(name)
        if inst is None:
            raise ControllerError(404, "not_found", f"no service {name} on cloudlet {self.config.cloudlet}")
        cred = credentials.issue(self.secret, name, self.config.cloudlet, device=device)
        self.metrics.sessions_issued.inc()
        return cred, inst

    async def end_session(self, token: str, device: str | None = None) -> None:
        """End a session; ``device``: the caller is that device, which may end its own sessions only."""
        try:
            cred = credentials.parse(self.secret, token)
        except credentials.CredentialError as exc:
            raise ControllerError(400, "bad_request", f"not a session credential of this fleet: {exc}") from exc
        if device is not None and cred.device != device:
            self.metrics.auth_refusals.labels("not_yours").inc()
            raise ControllerError(403, "not_yours", "a device may end its own sessions only")
        try:
            found = await self.sessiond.delete_session(cred.token)
        except (SessiondUnavailable, SessiondError) as exc:
            raise ControllerError(503, "sessiond_unavailable", f"local sessiond: {exc}") from exc
        if not found:
            raise ControllerError(404, "not_found", f"no live session {cred.session_id}")

    # -- devices -------------------------------------------------------------------------------

    async def push_device(self, record: DeviceRecord) -> None:
        """Tell the local sessiond (it refuses the device's sessions unless it knows the device)."""
        try:
            await self.sessiond.put_device(record.device, record.expires, record.revoked)
            self._devices_unsynced.discard(record.device)
        except (SessiondUnavailable, SessiondError) as exc:
            self._devices_unsynced.add(record.device)  # the next reconcile pass retries
            event(log, logging.WARNING, "device not pushed to sessiond yet; retried by reconcile",
                  device=record.device, error=str(exc))

    async def sync_devices(self, only_unsynced: bool = False) -> None:
        if self.devices is None:
            return
        for record in self.devices.all():
            if not only_unsynced or record.device in self._devices_unsynced:
                await self.push_device(record)

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, trigger: str = "interval") -> dict[str, int]:
        """One pass: make sessiond serve exactly the runtime's services. Returns repair counts.

        A service found stopped is started again at once, except on an ``event`` pass when this
        controller restarted it less than ``reconcile_interval_seconds`` ago: a crash-looping
        service is then unregistered (sessiond must not relay to a dead address) and left to the
        next interval pass, so it restarts at most about twice per interval.
        """
        async with self._reconcile_lock:
            if self._devices_unsynced:
                await self.sync_devices(only_unsynced=True)
            repairs = {"registered": 0, "unregistered": 0, "restarted": 0, "deferred": 0}
            instances = await self.runtime.list()
            registered = await self.sessiond.services()
            busy = {name for name, lock in self._locks.items() if lock.locked()}
            by_name = {i.name: i for i in instances}
            for gone in set(self._restarted_at) - set(by_name):
                del self._restarted_at[gone]
            for inst in instances:
                if inst.name in busy:
                    continue
                if inst.state != "running":
                    last = self._restarted_at.get(inst.name)
                    if (trigger == "event" and last is not None
                            and time.monotonic() - last < self.config.reconcile_interval_seconds):
                        repairs["deferred"] += 1
                        event(log, logging.WARNING, "service stopped again soon after a restart; "
                              "next start at the interval pass", service=inst.name,
                              interval=self.config.reconcile_interval_seconds)
                        if inst.name in registered:
                            await self.sessiond.delete_service(inst.name)
                            repairs["unregistered"] += 1
                        continue
                    try:
                        self._restarted_at[inst.name] = time.monotonic()
                        inst = await self.runtime.ensure_running(inst)
                        repairs["restarted"] += 1
                        event(log, logging.INFO, "stopped container started again", service=inst.name,
                              trigger=trigger, backend=inst.backend)
                    except RuntimeFailure as exc:
                        event(log, logging.WARNING, "service cannot be started", service=inst.name, error=str(exc))
                        if inst.name in registered:
                            # its old backend address may now lead anywhere: stop relaying until it runs
                            await self.sessiond.delete_service(inst.name)
                            repairs["unregistered"] += 1
                        continue
                reg = registered.get(inst.name)
                if reg is None or reg.backend != inst.backend or reg.port != inst.session_port:
                    await self._register(inst)
                    repairs["registered"] += 1
                    event(log, logging.INFO, "service registered with sessiond", service=inst.name,
                          session_port=inst.session_port, backend=inst.backend, trigger=trigger)
            for name in registered:
                if name not in by_name and name not in busy:
                    await self.sessiond.delete_service(name)
                    repairs["unregistered"] += 1
                    event(log, logging.INFO, "stale sessiond registration removed", service=name, trigger=trigger)
            for state in ("running", "starting", "failed"):
                self.metrics.services.labels(state).set(sum(1 for i in instances if i.state == state))
            for action, n in repairs.items():
                if n and action != "deferred":
                    self.metrics.repairs.labels(action).inc(n)
            return repairs

    async def _reconcile_pass(self, trigger: str) -> None:
        self.metrics.reconcile_passes.labels(trigger).inc()
        try:
            await self.reconcile(trigger)
            self.metrics.reconciles.labels("ok").inc()
            self.last_reconcile, self.last_reconcile_error = time.time(), None
        except asyncio.CancelledError:
            raise
        except (RuntimeFailure, SessiondUnavailable, SessiondError, ControllerError) as exc:
            self.metrics.reconciles.labels("error").inc()
            if self.last_reconcile_error != str(exc):
                event(log, logging.WARNING, "reconcile failed; will retry", error=str(exc), trigger=trigger)
            self.last_reconcile_error = str(exc)
        except Exception as exc:
            self.metrics.reconciles.labels("error").inc()
            self.last_reconcile_error = str(exc)
            log.exception("reconcile crashed; will retry")

    async def _next_trigger(self) -> str:
        """Wait for the interval to pass or for a runtime event (then the debounce), whichever first."""
        try:
            async with asyncio.timeout(self.config.reconcile_interval_seconds):
                await self._wake.wait()
        except TimeoutError:
            return "interval"
        await asyncio.sleep(self.config.event_debounce_seconds)
        return self._wake_trigger

    async def _reconcile_loop(self) -> None:
        trigger = "start"
        while True:
            # events from here on (during the pass, too) ask for another pass after this one
            self._wake.clear()
            self._wake_trigger = "resync"
            await self._reconcile_pass(trigger)
            trigger = await self._next_trigger()

    @property
    def reconcile_pending(self) -> bool:
        """True while a pass runs or one is due because of an event."""
        return self._wake.is_set() or self._reconcile_lock.locked()

    def on_runtime_event(self, ev: RuntimeEvent) -> None:
        """The runtime's ``watch`` callback: count and log the event, and ask for a pass at once."""
        if ev.action == LOST:
            self.event_stream = "disconnected"
            self.metrics.event_stream_up.set(0)
            return
        if ev.action == RESYNC:
            self.event_stream = "connected"
            self.metrics.event_stream_up.set(1)
            self.metrics.event_stream_connects.inc()
        else:
            self.metrics.runtime_events.labels(ev.action).inc()
            event(log, logging.INFO, "runtime event", service=ev.service, action=ev.action, ref=ev.ref)
            self._wake_trigger = "event"
        self._wake.set()

    async def _watch(self) -> None:
        try:
            await self.runtime.watch(self.on_runtime_event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("runtime event watcher crashed; only the periodic reconcile runs")
            self.event_stream = "failed"
            self.metrics.event_stream_up.set(0)
            return
        self.event_stream = "unsupported"  # this runtime has no event source
        event(log, logging.INFO, "runtime has no event stream; periodic reconcile only", runtime=self.runtime.name,
              interval=self.config.reconcile_interval_seconds)

    def start(self) -> None:
        if self._reconcile_task is None:
            self._reconcile_task = asyncio.create_task(self._reconcile_loop(), name="reconcile")
        if self._watch_task is None and self.config.runtime_events:
            self._watch_task = asyncio.create_task(self._watch(), name="runtime-events")

    async def stop(self) -> None:
        for task in (self._watch_task, self._reconcile_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._watch_task = self._reconcile_task = None

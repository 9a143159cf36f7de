"""The table of live sessions of one sessiond, its services, and the policy for starting and ending sessions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from cloudlet.common.admission import Admission, default_limits
from cloudlet.common.logs import Throttle, event
from cloudlet.protocol import credentials
from cloudlet.protocol.wire import Status
from cloudlet.relay.core import ATTACHED, CONNECTING, DETACHED, ENDED, Refused, SessionCore
from cloudlet.relay.devices import DeviceGate
from cloudlet.relay.interfaces import ClientSide, ServiceEntry
from cloudlet.relay.ledger import ENDED as ENDED_RECORD
from cloudlet.relay.ledger import STARTED as STARTED_RECORD
from cloudlet.relay.ledger import SessionLedger
from cloudlet.relay.metrics import SessiondMetrics
from cloudlet.relay.session import Session, UpstreamProtocol
from cloudlet.relay.splice import AVAILABLE as SPLICE_AVAILABLE

log = logging.getLogger(__name__)


class Forwarded(Protocol):
    """A forwarded connection, as the table sees it (``cloudlet.relay.forward.Forward``)."""

    id: str
    service: ServiceEntry
    bytes_up: int
    bytes_down: int
    counted_up: int
    counted_down: int

    def close(self) -> None: ...

    def to_json(self) -> dict[str, Any]: ...


class SessionManager:
    """The table of live sessions of one sessiond, and the policy for starting and ending them."""

    def __init__(
        self,
        *,
        cloudlet: str,
        secret: bytes,
        metrics: SessiondMetrics,
        grace_seconds: float = 30.0,
        buffer_bytes: int = 1 << 20,
        replay_bytes: int = 2 << 20,
        max_sessions: int = 100_000,
        max_sessions_per_device: int = 256,
        header_timeout: float = 5.0,
        credential_lifetime: float = 86400.0,
        backend_connect_timeout: float = 5.0,
        connector: Any = None,
        splice_threshold: int | None = 1 << 20,
        admission: Admission | None = None,
        peer_admission: Admission | None = None,
        held_budget: int = 256 << 20,
        ledger: SessionLedger | None = None,
        devices: DeviceGate | None = None,
    ) -> None:
        self.cloudlet = cloudlet
        self.secret = secret
        self.metrics = metrics
        self.grace_seconds = grace_seconds
        self.buffer_bytes = buffer_bytes
        self.replay_bytes = replay_bytes
        self.max_sessions = max_sessions
        self.max_sessions_per_device = max_sessions_per_device
        self.device_sessions: dict[str, int] = {}  # live sessions anchored here, by device
        self.header_timeout = header_timeout
        self.credential_lifetime = credential_lifetime
        self.backend_connect_timeout = backend_connect_timeout
        self.connector = connector
        self.splice_threshold = splice_threshold if SPLICE_AVAILABLE else None
        self.loop = asyncio.get_running_loop()
        self.services: dict[str, ServiceEntry] = {}
        self.sessions: dict[str, Session] = {}
        self.forwards: set[Forwarded] = set()
        self.ledger = ledger if ledger is not None else SessionLedger(max(100_000, 4 * max_sessions), credential_lifetime)
        max_open, max_pending, per_source = default_limits()
        # service ports and the peer endpoint are bounded apart: a flood on the first cannot evict
        # peers' channels (which all come from the local sshd, one source address)
        if admission is None:
            admission = Admission("sessiond service ports", max_open, max_pending, per_source)
        if peer_admission is None:
            peer_admission = Admission("sessiond peer endpoint", max_open, max_pending, max_pending)
        self.admission, self.peer_admission = admission, peer_admission
        self.refusal_log = Throttle(log, 10.0)
        self.devices = devices if devices is not None else DeviceGate()
        self.held_budget = held_budget  # backend bytes all detached sessions together may hold
        self.held_total = 0
        self.budget_paused: set[Session] = set()

    def admission_for(self, peer_endpoint: bool) -> Admission:
        return self.peer_admission if peer_endpoint else self.admission

    # -- credentials -------------------------------------------------------------------------
    def check(self, token: str, service: str | None) -> credentials.Credential:
        try:
            cred = credentials.parse(self.secret, token)
        except credentials.CredentialError as exc:
            raise Refused(Status.BAD_CREDENTIAL, str(exc)) from None
        if service is not None and cred.service != service:
            raise Refused(Status.WRONG_SERVICE, f"credential belongs to service {cred.service!r}, not {service!r}")
        if cred.device:
            why = self.devices.refusal(cred.device)
            if why is not None:
                raise Refused(Status.DEVICE_REFUSED, why)
        return cred

    def end_device(self, device: str, reason: str) -> int:
        """End every session this cloudlet holds or forwards for ``device`` (it was revoked)."""
        ended = [s for s in self.sessions.values() if s.device == device]
        for s in ended:
            s.end(reason)
        for f in [f for f in self.forwards if getattr(f, "device", "") == device]:
            f.close()
        return len(ended)

    def _add(self, s: Session) -> None:
        self.sessions[s.id] = s
        if s.device:
            self.device_sessions[s.device] = self.device_sessions.get(s.device, 0) + 1

    def _remove(self, s: Session) -> None:
        if self.sessions.get(s.id) is not s:
            return
        del self.sessions[s.id]
        if s.device:
            left = self.device_sessions.get(s.device, 1) - 1
            if left > 0:
                self.device_sessions[s.device] = left
            else:
                self.device_sessions.pop(s.device, None)

    def handed_over(self, s: Session) -> None:
        """``s`` went to the next process (sessiond/handoff.py): forget it here without ending it."""
        self.budget_paused.discard(s)
        self._remove(s)
        self.count_bytes(s)

    def taken_back(self, s: Session) -> None:
        """A session handed over by the previous process is ours again (detached, its backend connected)."""
        self._add(s)
        s.counted_up, s.counted_down = s.core.bytes_up, s.core.bytes_down  # counted by the previous process
        s.held_seen = 0
        s._run([])  # report its held bytes to the budget

    def live_count(self) -> int:
        return len(self.sessions) + len(self.forwards)

    # -- attach ------------------------------------------------------------------------------
    async def attach(self, conn: ClientSide, cred: credentials.Credential, service: ServiceEntry,
                     rest: bytes, via_peer: bool, after_fin: bool = False, down_received: int | None = None) -> None:
        """``down_received`` is None for mode 0 (raw), the client's count of backend bytes for mode 2."""
        if down_received is not None and rest:
            raise Refused(Status.BAD_HEADER, "mode 2: send nothing behind the header before the reply (it says where to resend from)")
        if cred.anchor != self.cloudlet:  # (connection.py refuses earlier, with the target to use)
            raise Refused(Status.WRONG_ANCHOR, f"this session is anchored at cloudlet {cred.anchor!r}, not {self.cloudlet!r}")
        s = self.sessions.get(cred.nonce)
        if s is None:
            known = self.ledger.lookup(cred.nonce)
            if known == ENDED_RECORD:
                raise Refused(Status.SESSION_ENDED, "this session has ended; ask the controller for a new one")
            if known == STARTED_RECORD:
                raise Refused(Status.SESSION_LOST, "this session started here before sessiond restarted and its state "
                              "is gone; ask the controller for a new one")
            if down_received:
                raise Refused(Status.REPLAY_UNAVAILABLE, f"the client has {down_received} bytes of a session this "
                              "cloudlet does not hold (was its sessiond restarted?)")
            if time.time() - cred.issued > self.credential_lifetime:
                raise Refused(Status.EXPIRED, "session credential expired")
            if self.ledger.too_old(cred.issued):
                raise Refused(Status.EXPIRED, "credential too old to start a session now (the record of older "
                              "sessions is full); ask the controller for a new one")
            if self.live_count() >= self.max_sessions:
                raise Refused(Status.TOO_MANY_SESSIONS, f"this cloudlet already holds {self.max_sessions} sessions")
            if cred.device and self.device_sessions.get(cred.device, 0) >= self.max_sessions_per_device:
                self.refusal_log.event(logging.WARNING, "device session limit reached", f"device-limit:{cred.device}",
                                       device=cred.device, limit=self.max_sessions_per_device)
                raise Refused(Status.TOO_MANY_SESSIONS, f"device {cred.device!r} already holds "
                              f"{self.max_sessions_per_device} sessions here (max_sessions_per_device)")
            core = SessionCore(cred.nonce, service.name, cred.issued, resumable=down_received is not None,
                               grace_seconds=self.grace_seconds, drain_seconds=self.header_timeout,
                               buffer_bytes=self.buffer_bytes, replay_bytes=self.replay_bytes)
            s = Session(core, service, self, device=cred.device)
            s.ready = self.loop.create_future()
            self._add(s)
            host, port = service.backend_hostport
            try:
                _, up = await asyncio.wait_for(
                    self.loop.create_connection(lambda: UpstreamProtocol(s), host, port), self.backend_connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self._remove(s)
                s.core.backend_unavailable()
                if not s.ready.done():
                    s.ready.set_exception(ConnectionError("backend unavailable"))
                    s.ready.exception()
                raise Refused(Status.BACKEND_UNAVAILABLE,
                              f"backend {service.backend} of service {service.name!r} unavailable: {exc or 'timeout'}") from None
            if s.state == ENDED:
                up.transport.close()  # type: ignore[union-attr]
                raise Refused(Status.SESSION_ENDED, "session ended while it was being set up")
            s.upstream = up
            self.ledger.started(cred.nonce, cred.issued)
            self.metrics.sessions_started.inc()
            s.ready.set_result(None)
            s.ready = None
        elif s.state == CONNECTING and s.ready is not None:
            try:
                await asyncio.shield(s.ready)
            except ConnectionError:
                raise Refused(Status.SESSION_ENDED, "session ended while it was being set up") from None
        if s.state == ENDED:
            raise Refused(Status.SESSION_ENDED, "this session has ended")
        if s.service is not service:
            raise Refused(Status.WRONG_SERVICE, "session belongs to another instance of this service")
        s.attach(conn, rest, via_peer, after_fin, down_received)
        if conn.lost:  # it went away while the backend connection was being made
            s.client_lost(conn)

    # -- ending ------------------------------------------------------------------------------
    def end_credential(self, cred: credentials.Credential, reason: str) -> bool:
        s = self.sessions.get(cred.nonce)
        if s is not None:
            s.end(reason)
            return True
        self.ledger.ended(cred.nonce, cred.issued)  # retired before it was ever used
        return False

    def end_id(self, session_id: str, reason: str) -> bool:
        s = self.sessions.get(session_id)
        if s is None:
            return False
        s.end(reason)
        return True

    def held_changed(self, s: Session, delta: int) -> None:
        """A session's held bytes changed: apply the budget (back-pressure, with hysteresis)."""
        self.held_total += delta
        if self.held_total >= self.held_budget and s.core.client is None and s not in self.budget_paused:
            if not self.budget_paused:
                self.metrics.held_budget_reached.inc()
                event(log, logging.WARNING, "held bytes budget spent: detached sessions' backends paused",
                      held=self.held_total, budget=self.held_budget)
            self.budget_paused.add(s)
            s.budget(True)
        elif self.budget_paused and self.held_total < self.held_budget * 0.9:
            waiting, self.budget_paused = self.budget_paused, set()
            for other in waiting:
                if other.state != ENDED:
                    other.budget(False)

    def session_ended(self, s: Session, reason: str) -> None:
        self.budget_paused.discard(s)
        self._remove(s)
        self.ledger.ended(s.id, s.core.issued)
        self.metrics.sessions_ended.labels(reason).inc()
        self.count_bytes(s)
        event(log, logging.INFO, "session ended", session=s.id, service=s.service.name, reason=reason,
              bytes_up=s.bytes_up, bytes_down=s.bytes_down)

    def forward_closed(self, f: Forwarded) -> None:
        """A forward ended (called by the forward itself)."""
        self.forwards.discard(f)
        self.count_bytes(f)
        hook = getattr(self.connector, "channel_closed", None)
        if hook is not None:
            hook(getattr(f, "peer", ""))

    def end_service(self, entry: ServiceEntry) -> None:
        for s in [s for s in self.sessions.values() if s.service is entry]:
            s.end("service_deleted")
        for f in [f for f in self.forwards if f.service is entry]:
            f.close()

    def end_all(self) -> None:
        for s in list(self.sessions.values()):
            s.end("shutdown")
        for f in list(self.forwards):
            f.close()

    # -- observation -------------------------------------------------------------------------
    def count_bytes(self, s: Any) -> None:
        up, down = s.bytes_up - s.counted_up, s.bytes_down - s.counted_down
        if up:
            self.metrics.bytes.labels("up").inc(up)
            s.counted_up = s.bytes_up
        if down:
            self.metrics.bytes.labels("down").inc(down)
            s.counted_down = s.bytes_down

    def collect(self) -> None:
        """Bring gauges and byte counters up to date (called before each scrape)."""
        states = {"attached": 0, "detached": 0, "forwarded": len(self.forwards)}
        buffered = 0
        for s in self.sessions.values():
            if s.state == ATTACHED:
                states["attached"] += 1
            elif s.state == DETACHED:
                states["detached"] += 1
            buffered += s.buffered
            self.count_bytes(s)
        for f in self.forwards:
            self.count_bytes(f)
        for k, v in states.items():
            self.metrics.sessions.labels(k).set(v)
        self.metrics.buffered.set(buffered)
        self.metrics.held_budget.set(self.held_budget)
        self.metrics.services.set(len(self.services))

    def service_sessions(self, entry: ServiceEntry) -> int:
        return sum(1 for s in self.sessions.values() if s.service is entry) + sum(
            1 for f in self.forwards if f.service is entry)

    def list_sessions(self, service: str | None = None) -> list[dict[str, Any]]:
        out = [s.to_json() for s in self.sessions.values() if service is None or s.service.name == service]
        out += [f.to_json() for f in self.forwards if service is None or f.service.name == service]
        return sorted(out, key=lambda d: d["since"])

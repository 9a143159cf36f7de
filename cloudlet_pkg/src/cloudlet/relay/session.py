"""A session at the anchor, carried out: the backend connection, the client connections, timers, splice.

:class:`Session` owns one :class:`~cloudlet.relay.core.SessionCore` (the decisions) and does what
its plans say: it writes replies and bytes, binds and closes connections, pauses and resumes
reading through their :class:`~cloudlet.relay.flow.ReadGate`, runs the grace and drain timers,
counts metrics and logs. It is the :class:`~cloudlet.relay.interfaces.ClientSink` of the attached
(and a draining) connection.

The byte hot path stays direct: client bytes go straight into the backend transport and backend
bytes into the attached connection, the core only counts them (and keeps mode 2's replay ring);
a busy mode 0 attachment moves to the splice relay (``cloudlet.relay.splice``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, cast

from cloudlet.common.logs import event
from cloudlet.protocol.wire import encode_reply
from cloudlet.relay import core as c
from cloudlet.relay.core import SessionCore
from cloudlet.relay.flow import SESSION, SPLICE, WRITE_HIGH, ReadGate
from cloudlet.relay.interfaces import ClientSide, ServiceEntry
from cloudlet.relay.metrics import SessiondMetrics
from cloudlet.relay.splice import SpliceRelay

log = logging.getLogger(__name__)

SPLICE_RETRY = 1 << 20  # a failed splice upgrade is tried again this many bytes later


class SessionHost(Protocol):
    """What a session needs of the table that holds it (``SessionManager`` implements it)."""

    loop: asyncio.AbstractEventLoop
    metrics: SessiondMetrics
    splice_threshold: int | None

    def session_ended(self, session: Session, reason: str) -> None: ...

    def count_bytes(self, s: Any) -> None: ...

    def held_changed(self, session: Session, delta: int) -> None: ...


class UpstreamProtocol(asyncio.Protocol):
    """The session's connection to the backend; lives as long as the session."""

    __slots__ = ("session", "transport", "gate")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # (uvloop's transports do not subclass asyncio's)
        self.transport = t
        self.gate = ReadGate(t)
        t.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self.session.backend_data(data)

    def eof_received(self) -> bool:
        self.session.backend_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.backend_gone()

    def pause_writing(self) -> None:
        self.session.backend_pressure(True)

    def resume_writing(self) -> None:
        self.session.backend_pressure(False)


class Session:
    """One session at the anchor (see the module docstring)."""

    __slots__ = ("core", "service", "host", "since", "upstream", "attached", "draining", "joining", "grace_timer",
                 "drain_timer", "splice", "ready", "splice_up", "splice_down", "counted_up", "counted_down", "held_seen", "device")

    def __init__(self, core: SessionCore, service: ServiceEntry, host: SessionHost, device: str = "") -> None:
        self.core = core
        self.device = device  # the device the session's credential was issued to ("" for none)
        self.service = service
        self.host = host
        self.since = time.time()
        self.upstream: UpstreamProtocol | None = None
        self.attached: ClientSide | None = None  # the connection of core.client
        self.draining: ClientSide | None = None  # the connection of core.draining
        self.joining: ClientSide | None = None  # the connection being attached (until its Bind)
        self.grace_timer: asyncio.TimerHandle | None = None
        self.drain_timer: asyncio.TimerHandle | None = None
        self.splice: SpliceRelay | None = None
        self.ready: asyncio.Future[None] | None = None  # set while the backend connection is being made
        self.splice_up: float = float("inf")  # byte counts at which to try the splice relay
        self.splice_down: float = float("inf")
        self.counted_up = 0  # bytes already added to the metrics
        self.counted_down = 0
        self.held_seen = 0  # held bytes last reported to the host (its budget)

    # -- read-only views -----------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.core.id

    @property
    def state(self) -> str:
        return self.core.state

    @property
    def bytes_up(self) -> int:
        return self.core.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.core.bytes_down

    @property
    def backend_eof(self) -> bool:
        return self.core.backend_eof

    @property
    def buffered(self) -> int:
        return self.core.buffered

    @property
    def resumable(self) -> bool:
        return self.core.resumable

    @property
    def client(self) -> ClientSide | None:
        return self.attached

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service.name, "device": self.device, "state": self.state,
                "since": round(self.since, 3), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "buffered": self.buffered}

    # -- from the manager ----------------------------------------------------------------------
    def attach(self, conn: ClientSide, rest: bytes, via_peer: bool, after_fin: bool = False,
               down_received: int | None = None) -> None:
        """Give the session to ``conn``; raises ``Refused`` (leaving everything as it was)."""
        self._leave_splice()
        plan = self.core.attach(conn.aid, rest=rest, via_peer=via_peer, after_fin=after_fin, down_received=down_received)
        self.joining = conn
        try:
            self._run(plan)
        finally:
            self.joining = None
        threshold = self.host.splice_threshold
        if threshold is not None and not self.core.resumable and self.core.state == c.ATTACHED:
            self.splice_up = self.core.bytes_up + threshold
            self.splice_down = self.core.bytes_down + threshold

    def end(self, reason: str) -> None:
        self._leave_splice()
        self._run(self.core.end(reason))

    # -- ClientSink: the bound connections' events ---------------------------------------------
    def client_data(self, conn: ClientSide, data: bytes) -> None:
        core = self.core
        if core.skipping:
            data = core.take_skip(conn.aid, data)
            if not data:
                return
        up = self.upstream
        assert up is not None and up.transport is not None
        up.transport.write(data)
        core.sent_up(len(data))
        if core.bytes_up > self.splice_up:
            self.try_splice()

    def client_fin(self, conn: ClientSide) -> None:
        self._client_gone(conn, fin=True)

    def client_lost(self, conn: ClientSide) -> None:
        self._client_gone(conn, fin=False)

    def client_write_paused(self, conn: ClientSide, paused: bool) -> None:
        self._run(self.core.client_write_pressure(conn.aid, paused))

    def _client_gone(self, conn: ClientSide, fin: bool) -> None:
        if conn is self.attached:
            self._leave_splice()
        self._run(self.core.client_gone(conn.aid, fin))
        self.host.count_bytes(self)

    # -- the backend's events ------------------------------------------------------------------
    def backend_data(self, data: bytes) -> None:
        conn = self.attached
        core = self.core
        if conn is not None:
            conn.write(data)
            core.sent_down(data)
            if core.bytes_down > self.splice_down:
                self.try_splice()
        else:
            self._run(core.hold(data))

    def backend_gone(self) -> None:
        self._leave_splice()
        self._run(self.core.backend_closed())

    def backend_pressure(self, paused: bool) -> None:
        self._run(self.core.backend_write_pressure(paused))

    # -- carrying out a plan -------------------------------------------------------------------
    def _run(self, plan: c.Plan) -> None:
        self._execute(plan)
        held = self.core.buffered
        if held != self.held_seen:
            delta, self.held_seen = held - self.held_seen, held
            self.host.held_changed(self, delta)

    def budget(self, paused: bool) -> None:
        self._run(self.core.budget(paused))

    def _execute(self, plan: c.Plan) -> None:
        released: dict[int, ClientSide] = {}
        for cmd in plan:
            if isinstance(cmd, c.Send):
                self._conn(cmd.aid, released).write(cmd.data)
            elif isinstance(cmd, c.SendUp):
                t = self.upstream.transport if self.upstream is not None else None
                if t is not None and not t.is_closing():
                    t.write(cmd.data)
            elif isinstance(cmd, c.Reply):
                self._conn(cmd.aid, released).write(encode_reply(cmd.status, cmd.message, cmd.flags, cmd.offsets))
            elif isinstance(cmd, c.Bind):
                conn = self._conn(cmd.aid, released)
                if self.attached is not None and self.attached.aid == self.core.draining:
                    self.draining = self.attached  # make-before-break: the old one drains
                self.attached = conn
                conn.bind(self)
            elif isinstance(cmd, c.Unbind):
                conn = self._conn(cmd.aid, released)
                released[cmd.aid] = conn
                conn.bind(None)
                conn.gate.resume(SESSION)
                if self.attached is conn:
                    self.attached = None
                elif self.draining is conn:
                    self.draining = None
            elif isinstance(cmd, c.ReadClient):
                self._conn(cmd.aid, released).gate.set(SESSION, not cmd.on)
            elif isinstance(cmd, c.ReadBackend):
                if self.upstream is not None and self.upstream.gate is not None:
                    self.upstream.gate.set(SESSION, not cmd.on)
            elif isinstance(cmd, c.HalfClose):
                self._conn(cmd.aid, released).write_eof()
            elif isinstance(cmd, c.Close):
                self._conn(cmd.aid, released).close()
            elif isinstance(cmd, c.Abort):
                self._conn(cmd.aid, released).abort()
            elif isinstance(cmd, c.StartTimer):
                self._cancel_timer(cmd.name)
                handle = self.host.loop.call_later(cmd.seconds, self._timer, cmd.name)
                if cmd.name == c.GRACE:
                    self.grace_timer = handle
                else:
                    self.drain_timer = handle
            elif isinstance(cmd, c.CancelTimer):
                self._cancel_timer(cmd.name)
            elif isinstance(cmd, c.CloseBackend):
                if self.upstream is not None and self.upstream.transport is not None:
                    self.upstream.transport.close()
            elif isinstance(cmd, c.Count):
                self._count(cmd.metric, cmd.n)
            elif isinstance(cmd, c.Log):
                if self.device:
                    event(log, cmd.level, cmd.msg, device=self.device, **cmd.fields)
                else:
                    event(log, cmd.level, cmd.msg, **cmd.fields)
            elif isinstance(cmd, c.Ended):
                self._cancel_timer(c.GRACE)
                self._cancel_timer(c.DRAIN)
                if self.ready is not None and not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"session ended: {cmd.reason}"))
                    self.ready.exception()  # mark retrieved
                self.host.session_ended(self, cmd.reason)

    def _conn(self, aid: int, released: dict[int, ClientSide]) -> ClientSide:
        for conn in (self.joining, self.attached, self.draining):
            if conn is not None and conn.aid == aid:
                return conn
        return released[aid]

    def _count(self, metric: str, n: int) -> None:
        m = self.host.metrics
        if metric == "resumes":
            m.resumes.inc(n)
        elif metric == "takeovers":
            m.takeovers.inc(n)
        elif metric == "replayed_bytes":
            m.replayed_bytes.inc(n)

    def _timer(self, name: str) -> None:
        if name == c.GRACE:
            self.grace_timer = None
            self._run(self.core.grace_expired())
        else:
            self.drain_timer = None
            self._run(self.core.drain_expired())

    def _cancel_timer(self, name: str) -> None:
        if name == c.GRACE:
            handle, self.grace_timer = self.grace_timer, None
        else:
            handle, self.drain_timer = self.drain_timer, None
        if handle is not None:
            handle.cancel()

    # -- splice fast path ----------------------------------------------------------------------
    def try_splice(self) -> None:
        """Upgrade a busy attachment to the splice relay when both transports are idle."""
        core = self.core
        self.splice_up = core.bytes_up + SPLICE_RETRY  # if not now, retry a MiB later
        self.splice_down = core.bytes_down + SPLICE_RETRY
        conn, up = self.attached, self.upstream
        if (conn is None or up is None or up.transport is None or up.gate is None or self.splice is not None
                or core.draining is not None or core.resumable):
            return
        ut = up.transport
        if (conn.is_closing() or ut.is_closing() or conn.write_buffer_size() or ut.get_write_buffer_size()
                or core.backend_write_paused or core.client_write_paused or not core.backend_reading):
            return
        cs, us = conn.socket(), ut.get_extra_info("socket")
        if cs is None or us is None:
            self.splice_up = self.splice_down = float("inf")
            return
        conn.gate.pause(SPLICE)
        up.gate.pause(SPLICE)
        try:
            relay = SpliceRelay(self.host.loop, cs, us, self._spliced, self._splice_eof, self._splice_failed)
        except OSError as exc:  # out of descriptors: stay on the Protocol path
            conn.gate.resume(SPLICE)
            up.gate.resume(SPLICE)
            event(log, logging.WARNING, "splice relay unavailable", session=self.id, error=str(exc))
            return
        self.splice = relay
        relay.start()
        self.host.metrics.splice_upgrades.inc()

    def _spliced(self, up: bool, n: int) -> None:
        if up:
            self.core.sent_up(n)
        else:
            self.core.moved_down(n)

    def _splice_eof(self, up: bool) -> None:
        conn = self.attached
        self._leave_splice()
        if up:  # the client half-closed: detach
            if conn is not None:
                self._client_gone(conn, fin=True)
        else:  # the backend closed
            self.backend_gone()

    def _splice_failed(self, client_side: bool) -> None:
        conn = self.attached
        self._leave_splice()
        if client_side:
            if conn is not None:
                conn.abort()  # connection_lost -> detach without FIN
        else:
            self.backend_gone()

    def _leave_splice(self) -> None:
        """Back to the Protocol path: what is in the pipes goes to the transports, in order."""
        relay = self.splice
        if relay is None:
            return
        self.splice = None
        to_upstream, to_client = relay.leave()
        up = self.upstream
        if up is not None and up.transport is not None and up.gate is not None:
            if to_upstream and not up.transport.is_closing():
                self.core.sent_up(len(to_upstream))
                up.transport.write(to_upstream)
            up.gate.resume(SPLICE)
        conn = self.attached
        if to_client:
            if conn is not None and not conn.is_closing():
                self.core.moved_down(len(to_client))
                conn.write(to_client)
            else:
                self._run(self.core.hold(to_client))
        if conn is not None:
            conn.gate.resume(SPLICE)

"""Sessions that outlive connections (the anchor side of the Session Service).

A :class:`Session` owns one upstream connection to the service's backend. Client connections come
and go: a half-close (FIN) detaches (the server flushes, closes its side and keeps the session for
the grace period, holding what the backend sends in a bounded buffer, then pausing the backend);
a new connection with the same credential resumes (buffered bytes first, in order, once); a new
connection while the old one is still attached takes over (the old one is aborted). END, grace
expiry, the backend closing or the service being deleted end the session.

Hot path: :class:`cloudlet.relay.ServerConnection` and :class:`UpstreamProtocol` are asyncio
Protocols writing straight into each other's transports, with flow control both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudlet.common.logs import event
from cloudlet.protocol.replay import ReplayRing
from cloudlet.protocol.wire import REPLY_RESUMED, REPLY_TOOK_OVER, Status, encode_reply
from cloudlet.relay.splice import SpliceRelay

if TYPE_CHECKING:
    from cloudlet.relay.connection import ServerConnection
    from cloudlet.relay.manager import ServiceEntry, SessionManager


log = logging.getLogger(__name__)


CONNECTING, ATTACHED, DETACHED, ENDED = "connecting", "attached", "detached", "ended"


WRITE_HIGH = 256 * 1024


class UpstreamProtocol(asyncio.Protocol):
    """The session's connection to the backend; lives as long as the session."""

    __slots__ = ("session", "transport")

    def __init__(self, session: "Session") -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        s = self.session
        c = s.client
        if c is not None:
            c.transport.write(data)
            s.bytes_down += len(data)
            if s.ring is not None:
                s.ring.append(data)
            elif s.bytes_down > s.splice_down:
                s.try_splice()
        else:
            s.hold(data)

    def eof_received(self) -> bool:
        self.session.backend_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.backend_closed()

    def pause_writing(self) -> None:
        s = self.session
        s.upstream_write_paused = True
        if s.client is not None:
            s.client.transport.pause_reading()

    def resume_writing(self) -> None:
        s = self.session
        s.upstream_write_paused = False
        if s.client is not None and s.draining is None and not s.client.transport.is_closing():
            s.client.transport.resume_reading()


@dataclass(slots=True, eq=False)
class Session:
    id: str
    service: ServiceEntry
    manager: "SessionManager"
    issued: int
    since: float = field(default_factory=time.time)
    state: str = CONNECTING
    client: "ServerConnection | None" = None
    upstream: UpstreamProtocol | None = None
    buffer: bytearray | None = None
    backend_eof: bool = False
    upstream_paused: bool = False
    upstream_write_paused: bool = False
    client_write_paused: bool = False
    grace: asyncio.TimerHandle | None = None
    ready: asyncio.Future[None] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    counted_up: int = 0
    counted_down: int = 0
    splice: SpliceRelay | None = None
    draining: "ServerConnection | None" = None  # the previous connection, until its FIN arrives
    drain_timer: asyncio.TimerHandle | None = None
    held_up: bytes = b""  # bytes that came behind the new connection's header while draining
    splice_up: float = float("inf")  # byte counts at which to try the splice relay
    splice_down: float = float("inf")
    ring: ReplayRing | None = None  # mode 2 (resumable): backend bytes written to clients, for replay

    # -- connection events -------------------------------------------------------------------
    @property
    def resumable(self) -> bool:
        return self.ring is not None

    def attach(self, conn: "ServerConnection", rest: bytes, via_peer: bool, after_fin: bool = False,
               down_received: int | None = None) -> None:
        """Give the session to ``conn`` (a new, resumed or taken-over attachment).

        ``after_fin``: the client has half-closed its previous connection and reads it to EOF, so
        if that connection is still attached here (its FIN is still on the way) it is *drained*
        rather than aborted: backend bytes go to ``conn`` from now on, the old connection is closed
        after its FIN (what it still carries goes upstream first), and ``conn`` is read only then.

        ``down_received`` (mode 2, resumable sessions): the backend bytes the client already has.
        Unless the old connection drains, the bytes it has not received are written again from
        the replay ring (or the attach is refused with ``REPLAY_UNAVAILABLE``, leaving everything
        as it was). The reply tells the client ``bytes_up`` (resend from there) and the stream
        offset this connection starts at; bytes it resends that the drained connection brought
        after all are skipped.
        """
        m = self.manager
        old = self.client
        drains = old is not None and old is not conn and after_fin and not old.lost
        replay = b""
        offsets: tuple[int, int] | None = None
        if self.ring is not None:
            if down_received is None:
                raise Refused(Status.UNSUPPORTED_MODE, "this session was started in mode 2 (resumable): attach in mode 2")
            if drains:
                offsets = (self.bytes_up, self.bytes_down)  # the old connection delivers up to here
            else:
                if down_received > self.bytes_down:
                    raise Refused(Status.REPLAY_UNAVAILABLE,
                                  f"the client claims {down_received} bytes; this session sent {self.bytes_down}")
                if down_received < self.bytes_down:
                    held = self.ring.since(down_received)
                    if held is None:
                        raise Refused(Status.REPLAY_UNAVAILABLE,
                                      f"the client has {down_received} of {self.bytes_down} bytes sent and the "
                                      f"missing ones are no longer held (replay_bytes = {m.replay_bytes})")
                    replay = held
                offsets = (self.bytes_up, down_received)
        elif down_received is not None:
            raise Refused(Status.UNSUPPORTED_MODE, "this session was started in mode 0 (raw): attach in mode 0")
        if self.splice is not None:
            self.splice.leave()
        if self.draining is not None:
            self._drain_done(self.draining, fin=False, abort=True)
        flags = 0
        resumed = self.state != CONNECTING
        old = self.client  # (the previous drain, if any, was cut short above)
        conn.up_start = self.bytes_up
        if old is not None and old is not conn and after_fin and not old.lost:
            self.draining = old  # old.session stays: its remaining bytes still go upstream
            if old.transport.can_write_eof():
                old.transport.write_eof()  # nothing more goes down the old path: let the client see EOF now
            self.drain_timer = m.loop.call_later(m.header_timeout, self._drain_expired)
            m.metrics.resumes.inc()
            event(log, logging.INFO, "session handed to a new connection; draining the old one",
                  session=self.id, service=self.service.name)
        elif old is not None and old is not conn:
            flags |= REPLY_TOOK_OVER
            old.session = None
            old.transport.abort()
            m.metrics.takeovers.inc()
            event(log, logging.INFO, "session taken over", session=self.id, service=self.service.name)
        if resumed:
            flags |= REPLY_RESUMED
            if old is None:
                m.metrics.resumes.inc()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        self.state = ATTACHED
        self.client = conn
        self.client_write_paused = False
        conn.session = self
        t = conn.transport
        t.write(encode_reply(Status.OK, "resumed" if resumed else "new session", flags, offsets))
        if replay:
            t.write(replay)  # already counted in bytes_down and held in the ring
            m.metrics.replayed_bytes.inc(len(replay))
        if self.buffer:
            self.bytes_down += len(self.buffer)
            t.write(bytes(self.buffer))
            if self.ring is not None:
                self.ring.append(self.buffer)
            self.buffer = None
        if self.backend_eof:
            t.close()  # backend already gone: deliver what was held, then EOF
            self.end("backend_closed")
            return
        if rest and self.draining is not None:
            self.held_up = rest
        elif rest:
            self.bytes_up += len(rest)
            self.upstream.transport.write(rest)  # type: ignore[union-attr]
        if m.splice_threshold is not None and self.ring is None:
            self.splice_up = self.bytes_up + m.splice_threshold
            self.splice_down = self.bytes_down + m.splice_threshold
        self._update_upstream_reading()
        if not self.upstream_write_paused and self.draining is None:
            t.resume_reading()
        event(log, logging.INFO, "session resumed" if resumed else "session attached",
              session=self.id, service=self.service.name, via_peer=via_peer, took_over=bool(flags & REPLY_TOOK_OVER))

    def client_gone(self, conn: "ServerConnection", fin: bool) -> None:
        """The attached connection half-closed (``fin``) or dropped: detach, keep the session."""
        if conn is self.draining:
            self._drain_done(conn, fin)
            return
        if self.client is not conn or self.state == ENDED:
            return
        if self.splice is not None:
            self.splice.leave()
        self.client = None
        conn.session = None
        self.client_write_paused = False
        if fin:
            conn.transport.close()  # flush what was already written, then our FIN
        self.state = DETACHED
        self.grace = self.manager.loop.call_later(self.manager.grace_seconds, self._grace_expired)
        self._update_upstream_reading()
        self.manager.count_bytes(self)
        event(log, logging.INFO, "session detached", session=self.id, service=self.service.name, fin=fin)

    def _drain_done(self, old: "ServerConnection", fin: bool, abort: bool = False) -> None:
        """The drained connection sent its FIN (or broke): close it, start reading the new one."""
        self.draining = None
        old.session = None
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if abort:
            old.transport.abort()
        elif fin:
            old.transport.close()  # flush what was written before the switch, then FIN
        c = self.client
        if self.ring is not None and c is not None:  # what the client resent and the old one brought anyway
            c.up_skip = max(0, self.bytes_up - c.up_start)
        if self.held_up:
            held, self.held_up = self.held_up, b""
            up = self.upstream
            if up is not None and up.transport is not None and not up.transport.is_closing():
                self.bytes_up += len(held)
                up.transport.write(held)
        c = self.client
        if c is not None and not self.upstream_write_paused and self.splice is None and not c.transport.is_closing():
            c.transport.resume_reading()

    def _drain_expired(self) -> None:
        self.drain_timer = None
        if self.draining is not None:
            event(log, logging.INFO, "old connection sent no FIN in time; aborted", session=self.id)
            self._drain_done(self.draining, fin=False, abort=True)

    def client_write_pressure(self, conn: "ServerConnection", paused: bool) -> None:
        if self.client is conn:
            self.client_write_paused = paused
            self._update_upstream_reading()

    # -- backend events ----------------------------------------------------------------------
    def hold(self, data: bytes) -> None:
        """Keep backend bytes for a detached client; pause the backend at the buffer limit."""
        if self.buffer is None:
            self.buffer = bytearray(data)
        else:
            self.buffer += data
        if len(self.buffer) >= self.manager.buffer_bytes:
            self._update_upstream_reading()

    def backend_closed(self) -> None:
        if self.backend_eof or self.state == ENDED:
            return
        if self.splice is not None:
            self.splice.leave()
        self.backend_eof = True
        if self.client is not None:
            self.client.transport.close()  # flush, then pass the close on
            self.end("backend_closed")
        else:
            event(log, logging.INFO, "backend closed while detached", session=self.id, buffered=len(self.buffer or b""))

    # -- ending ------------------------------------------------------------------------------
    def _grace_expired(self) -> None:
        self.grace = None
        if self.state == DETACHED:
            self.end("grace_expired")

    def end(self, reason: str) -> None:
        if self.state == ENDED:
            return
        if self.splice is not None:
            self.splice.leave()
        if self.draining is not None:
            self._drain_done(self.draining, fin=True)
        self.state = ENDED
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.client is not None:
            self.client.session = None
            self.client.transport.close()
            self.client = None
        self.buffer = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"session ended: {reason}"))
            self.ready.exception()  # mark retrieved
        self.manager.session_ended(self, reason)

    # -- splice fast path --------------------------------------------------------------------
    def try_splice(self) -> None:
        """Upgrade a busy attachment to the splice relay when both transports are idle."""
        self.splice_up = self.bytes_up + (1 << 20)  # if not now, retry a MiB later
        self.splice_down = self.bytes_down + (1 << 20)
        c, up = self.client, self.upstream
        if c is None or up is None or up.transport is None or self.splice is not None or self.draining is not None:
            return
        ct, ut = c.transport, up.transport
        if (ct.is_closing() or ut.is_closing() or ct.get_write_buffer_size() or ut.get_write_buffer_size()
                or self.upstream_write_paused or self.client_write_paused or self.upstream_paused):
            return
        cs, us = ct.get_extra_info("socket"), ut.get_extra_info("socket")
        if cs is None or us is None:
            self.splice_up = self.splice_down = float("inf")
            return
        ct.pause_reading()
        ut.pause_reading()
        try:
            relay = SpliceRelay(self, cs, us)
        except OSError as exc:  # out of descriptors: stay on the Protocol path
            ct.resume_reading()
            ut.resume_reading()
            event(log, logging.WARNING, "splice relay unavailable", session=self.id, error=str(exc))
            return
        self.splice = relay
        relay.start()
        self.manager.metrics.splice_upgrades.inc()

    # -- helpers -----------------------------------------------------------------------------
    def _update_upstream_reading(self) -> None:
        up = self.upstream
        if up is None or up.transport is None or up.transport.is_closing():
            return
        if self.client is not None:
            pause = self.client_write_paused
        else:
            pause = self.buffer is not None and len(self.buffer) >= self.manager.buffer_bytes
        if pause and not self.upstream_paused:
            up.transport.pause_reading()
            self.upstream_paused = True
        elif not pause and self.upstream_paused:
            up.transport.resume_reading()
            self.upstream_paused = False

    @property
    def buffered(self) -> int:
        return len(self.buffer) if self.buffer else 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service.name, "state": self.state, "since": round(self.since, 3),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "buffered": self.buffered}


class Refused(Exception):
    """A connection is refused with ``status`` (sent to the client as the reply)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

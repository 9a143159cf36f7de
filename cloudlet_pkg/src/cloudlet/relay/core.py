"""The session's decisions, with no I/O: events in, a plan of commands out.

:class:`SessionCore` is one session at the anchor: its state (connecting, attached, detached,
ended), its byte offsets in both directions, the backend bytes it holds for a detached client,
the replay ring of a resumable (mode 2) session, and which connection is attached or draining.
Connections are named by an opaque attachment id (``aid``); the core never touches a socket, a
timer or a metric. Each event method returns the list of :data:`Command` objects to carry out, in
order; :class:`cloudlet.relay.session.Session` carries them out. Refusals are raised as
:class:`Refused` before anything changes.

The byte hot path does not go through plans: the shell writes the bytes itself and tells the core
with :meth:`SessionCore.sent_up` / :meth:`SessionCore.sent_down` (counters, replay ring) or hands
them over with :meth:`SessionCore.hold` while no client is attached.

The state is serialisable (:meth:`SessionCore.to_state` / :meth:`SessionCore.from_state`): a new
sessiond process can take a session over with its offsets, held bytes and replay ring.

Transitions (docs/protocol.md has the wire side of each):

- ``attach`` on a new session: ``connecting`` -> ``attached``.
- ``attach`` while detached: resume; held bytes first, then the stream.
- ``attach`` while attached, no FIN (``after_fin`` false): takeover; the old connection is aborted.
- ``attach`` while attached with ``after_fin``: make-before-break; the old connection *drains*
  (backend bytes go to the new one at once, the old one's remaining bytes still go upstream, the
  new one is read only after the old one's FIN, a drain timeout or a later attach).
- mode 2: ``down_received`` below what was sent replays from the ring; above it, or below what the
  ring holds, is refused with ``REPLAY_UNAVAILABLE``; bytes the client resends that a drained
  connection delivered after all are skipped (``up_skip``).
- ``client_gone`` (FIN or loss) of the attached connection: ``detached`` with a grace timer.
- ``grace_expired`` while detached, ``backend_closed``, ``end``: ``ended``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cloudlet.protocol.replay import ReplayRing
from cloudlet.protocol.wire import REPLY_RESUMED, REPLY_TOOK_OVER, Status

CONNECTING, ATTACHED, DETACHED, ENDED = "connecting", "attached", "detached", "ended"
STATES = (CONNECTING, ATTACHED, DETACHED, ENDED)
GRACE, DRAIN = "grace", "drain"  # the core's two timers


class Refused(Exception):
    """A connection is refused with ``status`` (sent to the client as the reply)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Write the status reply (``offsets``: mode 2's ``(up_received, down_start)``)."""

    aid: int
    status: Status
    message: str
    flags: int = 0
    offsets: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to connection ``aid`` (already counted in ``bytes_down``)."""

    aid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SendUp:
    """Write ``data`` to the backend (already counted in ``bytes_up``)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Bind:
    """Connection ``aid`` now delivers its events to this session."""

    aid: int


@dataclass(frozen=True, slots=True)
class Unbind:
    """Connection ``aid`` no longer belongs to this session."""

    aid: int


@dataclass(frozen=True, slots=True)
class HalfClose:
    """Send FIN on connection ``aid`` (nothing more goes down it), keep reading it."""

    aid: int


@dataclass(frozen=True, slots=True)
class Close:
    """Flush what was written to ``aid``, then close it."""

    aid: int


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop connection ``aid`` at once (RST), whatever is unsent."""

    aid: int


@dataclass(frozen=True, slots=True)
class ReadClient:
    """Read from connection ``aid`` (``on``) or stop reading it."""

    aid: int
    on: bool


@dataclass(frozen=True, slots=True)
class ReadBackend:
    """Read from the backend (``on``) or stop reading it (back-pressure)."""

    on: bool


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call the core's ``<name>_expired`` after ``seconds`` (replaces a running one)."""

    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class CloseBackend:
    """Close the backend connection (after what was written to it)."""


@dataclass(frozen=True, slots=True)
class Count:
    """Add ``n`` to the counter ``metric`` (``resumes``, ``takeovers``, ``replayed_bytes``)."""

    metric: str
    n: int = 1


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    msg: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ended:
    """The session is over (``reason``): forget it, keep its tombstone."""

    reason: str


Command = (Reply | Send | SendUp | Bind | Unbind | HalfClose | Close | Abort | ReadClient | ReadBackend
           | StartTimer | CancelTimer | CloseBackend | Count | Log | Ended)
Plan = list[Command]


# -- the core ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class SessionCore:
    """One session's state and decisions (see the module docstring for the transitions)."""

    id: str
    service: str
    issued: int
    resumable: bool = False
    grace_seconds: float = 30.0
    drain_seconds: float = 5.0
    buffer_bytes: int = 1 << 20
    replay_bytes: int = 2 << 20
    state: str = CONNECTING
    client: int | None = None  # the attached connection
    draining: int | None = None  # the previous connection, until its FIN arrives
    bytes_up: int = 0  # client -> backend bytes written to the backend
    bytes_down: int = 0  # backend -> client bytes written to client connections
    held: bytearray | None = None  # backend bytes for a detached client
    held_up: bytes = b""  # bytes that came behind the new connection's header while the old one drains
    backend_eof: bool = False
    up_start: int = 0  # mode 2: bytes_up when the attached connection attached (told to the client)
    up_skip: int = 0  # mode 2: first bytes of the attached connection that a drained one already delivered
    draining_skip: int = 0  # the same for the draining connection (what was left of its own skip)
    client_write_paused: bool = False  # the attached connection's write buffer is full
    backend_write_paused: bool = False  # the backend's write buffer is full
    backend_reading: bool = True  # what the shell was last told (ReadBackend)
    budget_paused: bool = False  # the sessiond's budget for held bytes is spent: hold no more
    ring: ReplayRing | None = None  # mode 2: backend bytes written to clients, for replay

    def __post_init__(self) -> None:
        if self.resumable and self.ring is None:
            self.ring = ReplayRing(self.replay_bytes, self.bytes_down)

    # -- connection events ---------------------------------------------------------------------
    def attach(self, aid: int, *, rest: bytes = b"", via_peer: bool = False, after_fin: bool = False,
               down_received: int | None = None) -> Plan:
        """Give the session to connection ``aid`` (new, resumed, taken over, or make-before-break).

        ``down_received`` is None in mode 0; in mode 2 it is the client's count of backend bytes.
        Raises :class:`Refused` (and changes nothing) for a wrong mode or offsets it cannot serve.
        """
        if self.state == ENDED:
            raise Refused(Status.SESSION_ENDED, "this session has ended")
        old = self.client if self.client != aid else None
        drains = old is not None and after_fin
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
                                      f"missing ones are no longer held (replay_bytes = {self.replay_bytes})")
                    replay = held
                offsets = (self.bytes_up, down_received)
        elif down_received is not None:
            raise Refused(Status.UNSUPPORTED_MODE, "this session was started in mode 0 (raw): attach in mode 0")

        plan: Plan = []
        if self.draining is not None:  # a drain still running is cut short
            self._drain_done(plan, self.draining, fin=False, abort=True)
        flags = 0
        resumed = self.state != CONNECTING
        if drains:
            assert old is not None
            self.draining = old  # it stays bound: its remaining bytes still go upstream
            self.draining_skip = self.up_skip
            plan.append(HalfClose(old))  # nothing more goes down the old path: the client sees EOF now
            plan.append(StartTimer(DRAIN, self.drain_seconds))
            plan.append(Count("resumes"))
            plan.append(Log(logging.INFO, "session handed to a new connection; draining the old one",
                            {"session": self.id, "service": self.service}))
        elif old is not None:
            flags |= REPLY_TOOK_OVER
            plan += [Unbind(old), Abort(old), Count("takeovers"),
                     Log(logging.INFO, "session taken over", {"session": self.id, "service": self.service})]
        if resumed:
            flags |= REPLY_RESUMED
            if old is None:
                plan.append(Count("resumes"))
        if self.state == DETACHED:
            plan.append(CancelTimer(GRACE))
        self.state = ATTACHED
        self.client = aid
        self.client_write_paused = False
        self.up_start = self.bytes_up
        self.up_skip = 0
        plan.append(Bind(aid))
        plan.append(Reply(aid, Status.OK, "resumed" if resumed else "new session", flags, offsets))
        if replay:
            plan += [Send(aid, replay), Count("replayed_bytes", len(replay))]  # already counted and in the ring
        if self.held:
            data = bytes(self.held)
            self.held = None
            self.sent_down(data)
            plan.append(Send(aid, data))
        if self.backend_eof:
            plan.append(Close(aid))  # the backend is already gone: deliver what was held, then EOF
            self._end(plan, "backend_closed")
            return plan
        if rest and self.draining is not None:
            self.held_up = rest
        elif rest:
            self.bytes_up += len(rest)
            plan.append(SendUp(rest))
        self._update_backend_reading(plan)
        plan.append(ReadClient(aid, not self.backend_write_paused and self.draining is None))
        plan.append(Log(logging.INFO, "session resumed" if resumed else "session attached",
                        {"session": self.id, "service": self.service, "via_peer": via_peer,
                         "took_over": bool(flags & REPLY_TOOK_OVER)}))
        return plan

    def client_gone(self, aid: int, fin: bool) -> Plan:
        """Connection ``aid`` half-closed (``fin``) or dropped: detach and keep the session."""
        plan: Plan = []
        if aid == self.draining:
            self._drain_done(plan, aid, fin)
            return plan
        if self.client != aid or self.state == ENDED:
            return plan
        self.client = None
        self.client_write_paused = False
        plan.append(Unbind(aid))
        if fin:
            plan.append(Close(aid))  # flush what was already written, then our FIN
        self.state = DETACHED
        plan.append(StartTimer(GRACE, self.grace_seconds))
        self._update_backend_reading(plan)
        plan.append(Log(logging.INFO, "session detached", {"session": self.id, "service": self.service, "fin": fin}))
        return plan

    def drain_expired(self) -> Plan:
        plan: Plan = []
        if self.draining is not None:
            plan.append(Log(logging.INFO, "old connection sent no FIN in time; aborted", {"session": self.id}))
            self._drain_done(plan, self.draining, fin=False, abort=True)
        return plan

    def client_write_pressure(self, aid: int, paused: bool) -> Plan:
        """The write buffer of connection ``aid`` passed its high (``paused``) or low water mark."""
        plan: Plan = []
        if self.client == aid:
            self.client_write_paused = paused
            self._update_backend_reading(plan)
        return plan

    # -- backend events ------------------------------------------------------------------------
    def backend_write_pressure(self, paused: bool) -> Plan:
        """The backend's write buffer passed its high (``paused``) or low water mark."""
        self.backend_write_paused = paused
        plan: Plan = []
        if self.draining is not None:  # it still sends upstream: it is paused too
            plan.append(ReadClient(self.draining, not paused))
        c = self.client
        if c is not None and (paused or self.draining is None):
            plan.append(ReadClient(c, not paused))
        return plan

    def hold(self, data: bytes) -> Plan:
        """Backend bytes while no client is attached: keep them, pause the backend at the limit."""
        if self.held is None:
            self.held = bytearray(data)
        else:
            self.held += data
        plan: Plan = []
        if len(self.held) >= self.buffer_bytes:
            self._update_backend_reading(plan)
        return plan

    def backend_closed(self) -> Plan:
        plan: Plan = []
        if self.backend_eof or self.state == ENDED:
            return plan
        self.backend_eof = True
        if self.client is not None:
            plan.append(Close(self.client))  # flush, then pass the close on
            self._end(plan, "backend_closed")
        else:
            plan.append(Log(logging.INFO, "backend closed while detached",
                            {"session": self.id, "buffered": len(self.held or b"")}))
        return plan

    # -- the byte path (no plan: called per chunk) ---------------------------------------------
    def sent_up(self, n: int) -> None:
        self.bytes_up += n

    def sent_down(self, data: bytes | bytearray | memoryview) -> None:
        self.bytes_down += len(data)
        if self.ring is not None:
            self.ring.append(data)

    def moved_down(self, n: int) -> None:
        """``n`` backend bytes reached the client without passing the shell (splice: mode 0, no ring)."""
        assert self.ring is None
        self.bytes_down += n

    @property
    def skipping(self) -> bool:
        """True while some connection's first bytes are still to be dropped (check before take_skip)."""
        return bool(self.up_skip or self.draining_skip)

    def take_skip(self, aid: int, data: bytes) -> bytes:
        """``data`` from ``aid`` without the bytes a drained connection already delivered (mode 2)."""
        if aid == self.client:
            skip = self.up_skip
        elif aid == self.draining:
            skip = self.draining_skip
        else:
            return data
        if not skip:
            return data
        cut = min(skip, len(data))
        if aid == self.client:
            self.up_skip -= cut
        else:
            self.draining_skip -= cut
        return data[cut:]

    # -- ending --------------------------------------------------------------------------------
    def grace_expired(self) -> Plan:
        plan: Plan = []
        if self.state == DETACHED:
            self._end(plan, "grace_expired")
        return plan

    def end(self, reason: str) -> Plan:
        plan: Plan = []
        self._end(plan, reason)
        return plan

    def backend_unavailable(self) -> None:
        """The backend connection could not be made: the session never started."""
        self.state = ENDED

    # -- observation ---------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self.held) if self.held else 0

    @property
    def should_read_backend(self) -> bool:
        if self.client is not None:
            return not self.client_write_paused
        if self.budget_paused:
            return False
        return self.held is None or len(self.held) < self.buffer_bytes

    def budget(self, paused: bool) -> Plan:
        """The sessiond-wide budget for held bytes was spent (``paused``) or is available again."""
        self.budget_paused = paused
        plan: Plan = []
        self._update_backend_reading(plan)
        return plan

    # -- serialisation -------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything a new process needs to carry the session on (byte strings as ``bytes``)."""
        ring = self.ring
        return {
            "id": self.id, "service": self.service, "issued": self.issued, "resumable": self.resumable,
            "grace_seconds": self.grace_seconds, "drain_seconds": self.drain_seconds,
            "buffer_bytes": self.buffer_bytes, "replay_bytes": self.replay_bytes, "state": self.state,
            "client": self.client, "draining": self.draining, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "held": bytes(self.held) if self.held is not None else None, "held_up": self.held_up,
            "backend_eof": self.backend_eof, "up_start": self.up_start, "up_skip": self.up_skip,
            "draining_skip": self.draining_skip,
            "client_write_paused": self.client_write_paused, "backend_write_paused": self.backend_write_paused,
            "backend_reading": self.backend_reading, "budget_paused": self.budget_paused,
            "ring": None if ring is None else {"start": ring.start, "data": ring.since(ring.start) or b""},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SessionCore:
        data = dict(state)
        ring_state = data.pop("ring")
        held = data.pop("held")
        core = cls(**data, held=bytearray(held) if held is not None else None,
                   ring=ReplayRing(int(data["replay_bytes"]), int(ring_state["start"])) if ring_state else None)
        if ring_state and ring_state["data"]:
            core.ring.append(ring_state["data"])  # type: ignore[union-attr]
        if core.ring is not None and core.ring.end != core.bytes_down:
            raise ValueError(f"session {core.id}: replay ring ends at {core.ring.end}, bytes_down is {core.bytes_down}")
        return core

    # -- internals -----------------------------------------------------------------------------
    def _drain_done(self, plan: Plan, old: int, fin: bool, abort: bool = False) -> None:
        """The drained connection sent its FIN (or broke, or is cut short): close it, read the new one."""
        self.draining = None
        self.draining_skip = 0
        plan += [Unbind(old), CancelTimer(DRAIN)]
        if abort:
            plan.append(Abort(old))
        elif fin:
            plan.append(Close(old))  # flush what was written before the switch, then FIN
        if self.ring is not None and self.client is not None:  # what the client resent that the old one brought anyway
            self.up_skip = max(0, self.bytes_up - self.up_start)
        if self.held_up:
            held, self.held_up = self.held_up, b""
            if self.state != ENDED:
                self.bytes_up += len(held)
                plan.append(SendUp(held))
        if self.client is not None and not self.backend_write_paused and self.state != ENDED:
            plan.append(ReadClient(self.client, True))

    def _end(self, plan: Plan, reason: str) -> None:
        if self.state == ENDED:
            return
        if self.draining is not None:
            self._drain_done(plan, self.draining, fin=True)
        was = self.state
        self.state = ENDED
        if was == DETACHED:
            plan.append(CancelTimer(GRACE))
        plan.append(CloseBackend())
        if self.client is not None:
            plan += [Unbind(self.client), Close(self.client)]
            self.client = None
        self.held = None
        plan.append(Ended(reason))

    def _update_backend_reading(self, plan: Plan) -> None:
        if self.state == ENDED:
            return
        want = self.should_read_backend
        if want != self.backend_reading:
            self.backend_reading = want
            plan.append(ReadBackend(want))

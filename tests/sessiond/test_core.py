"""The pure session core: every transition as a table of events and the exact commands they give,
and random event sequences (hypothesis) against the core's invariants. No sockets here; the socket
tests (test_sessions, test_resumable, test_forwarding) check the same semantics end to end.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cloudlet.protocol.wire import REPLY_RESUMED, REPLY_TOOK_OVER, Status
from cloudlet.relay import core as c
from cloudlet.relay.core import Refused, SessionCore
from hypothesis import given, settings
from hypothesis import strategies as st


def make(resumable: bool = False, **kw: Any) -> SessionCore:
    return SessionCore("sid", "svc", 1000, resumable=resumable, grace_seconds=30, drain_seconds=5,
                       buffer_bytes=kw.pop("buffer_bytes", 100), replay_bytes=kw.pop("replay_bytes", 1000), **kw)


def kinds(plan: c.Plan) -> list[str]:
    """A plan without its log lines, as readable strings."""
    out = []
    for cmd in plan:
        if isinstance(cmd, c.Log):
            continue
        if isinstance(cmd, c.Reply):
            out.append(f"Reply({cmd.aid},{cmd.status.name},{cmd.flags},{cmd.offsets})")
        elif isinstance(cmd, (c.Send, c.SendUp)):
            aid = f"{cmd.aid}," if isinstance(cmd, c.Send) else ""
            out.append(f"{type(cmd).__name__}({aid}{cmd.data!r})")
        elif isinstance(cmd, c.StartTimer):
            out.append(f"StartTimer({cmd.name},{cmd.seconds:g})")
        elif isinstance(cmd, c.Count):
            out.append(f"Count({cmd.metric},{cmd.n})")
        else:
            fields = [str(getattr(cmd, f)) for f in cmd.__slots__]  # type: ignore[union-attr]
            out.append(f"{type(cmd).__name__}({','.join(fields)})")
    return out


NEW = "Reply(1,OK,0,None)"
RES = REPLY_RESUMED
TOOK = REPLY_RESUMED | REPLY_TOOK_OVER


def attached(resumable: bool = False, **kw: Any) -> SessionCore:
    core = make(resumable, **kw)
    core.attach(1, down_received=0 if resumable else None)
    return core


def draining() -> SessionCore:
    """Connection 2 attached after FIN while 1 drains."""
    core = attached()
    core.attach(2, after_fin=True)
    return core


# -- the table: (name, setup, event, expected commands, expected state afterwards) -----------------
CASES: list[tuple[str, Any, Any, list[str], dict[str, Any]]] = [
    ("new session", make, lambda k: k.attach(1),
     ["Bind(1)", NEW, "ReadClient(1,True)"], {"state": c.ATTACHED, "client": 1}),
    ("new session with bytes behind the header", make, lambda k: k.attach(1, rest=b"hi"),
     ["Bind(1)", NEW, "SendUp(b'hi')", "ReadClient(1,True)"], {"bytes_up": 2}),
    ("FIN detaches and starts the grace timer", attached, lambda k: k.client_gone(1, fin=True),
     ["Unbind(1)", "Close(1)", "StartTimer(grace,30)"], {"state": c.DETACHED, "client": None}),
    ("a lost connection detaches without a close", attached, lambda k: k.client_gone(1, fin=False),
     ["Unbind(1)", "StartTimer(grace,30)"], {"state": c.DETACHED}),
    ("a stranger's FIN changes nothing", attached, lambda k: k.client_gone(7, fin=True), [], {"client": 1}),
    ("resume delivers the held bytes first",
     lambda: _detached_with(b"abc"), lambda k: k.attach(2),
     ["Count(resumes,1)", "CancelTimer(grace)", "Bind(2)", f"Reply(2,OK,{RES},None)", "Send(2,b'abc')",
      "ReadClient(2,True)"], {"state": c.ATTACHED, "held": None, "bytes_down": 3}),
    ("held bytes at the limit pause the backend",
     lambda: _detached_with(b""), lambda k: k.hold(b"x" * 100), ["ReadBackend(False)"], {"backend_reading": False}),
    ("a resume reads the paused backend again",
     lambda: _detached_with(b"x" * 100), lambda k: k.attach(2),
     ["Count(resumes,1)", "CancelTimer(grace)", "Bind(2)", f"Reply(2,OK,{RES},None)", "Send(2,b'" + "x" * 100 + "')",
      "ReadBackend(True)", "ReadClient(2,True)"], {"backend_reading": True}),
    ("takeover without FIN aborts the old connection", attached, lambda k: k.attach(2),
     ["Unbind(1)", "Abort(1)", "Count(takeovers,1)", "Bind(2)", f"Reply(2,OK,{TOOK},None)", "ReadClient(2,True)"],
     {"client": 2, "draining": None}),
    ("make-before-break drains the old connection", attached, lambda k: k.attach(2, after_fin=True),
     ["HalfClose(1)", "StartTimer(drain,5)", "Count(resumes,1)", "Bind(2)", f"Reply(2,OK,{RES},None)",
      "ReadClient(2,False)"], {"client": 2, "draining": 1}),
    ("the old one's FIN ends the drain, the new one is read", draining, lambda k: k.client_gone(1, fin=True),
     ["Unbind(1)", "CancelTimer(drain)", "Close(1)", "ReadClient(2,True)"], {"draining": None, "client": 2}),
    ("bytes behind the new header wait for the drain",
     attached, lambda k: k.attach(2, after_fin=True, rest=b"new"),
     ["HalfClose(1)", "StartTimer(drain,5)", "Count(resumes,1)", "Bind(2)", f"Reply(2,OK,{RES},None)",
      "ReadClient(2,False)"], {"held_up": b"new", "bytes_up": 0}),
    ("and go upstream after it", lambda: _drain_with_rest(b"new"), lambda k: k.client_gone(1, fin=True),
     ["Unbind(1)", "CancelTimer(drain)", "Close(1)", "SendUp(b'new')", "ReadClient(2,True)"], {"bytes_up": 3, "held_up": b""}),
    ("a drain that times out aborts the old connection", draining, lambda k: k.drain_expired(),
     ["Unbind(1)", "CancelTimer(drain)", "Abort(1)", "ReadClient(2,True)"], {"draining": None}),
    ("takeover during a drain aborts both old connections", draining, lambda k: k.attach(3),
     ["Unbind(1)", "CancelTimer(drain)", "Abort(1)", "ReadClient(2,True)", "Unbind(2)", "Abort(2)",
      "Count(takeovers,1)", "Bind(3)", f"Reply(3,OK,{TOOK},None)", "ReadClient(3,True)"], {"client": 3, "draining": None}),
    ("END during a move closes both connections", draining, lambda k: k.end("ended_by_client"),
     ["Unbind(1)", "CancelTimer(drain)", "Close(1)", "ReadClient(2,True)", "CloseBackend()", "Unbind(2)", "Close(2)",
      "Ended(ended_by_client)"], {"state": c.ENDED, "client": None, "draining": None}),
    ("the backend closing while attached ends the session", attached, lambda k: k.backend_closed(),
     ["Close(1)", "CloseBackend()", "Unbind(1)", "Close(1)", "Ended(backend_closed)"], {"state": c.ENDED}),
    ("the backend closing while detached waits for the client", lambda: _detached_with(b"bye"),
     lambda k: k.backend_closed(), [], {"state": c.DETACHED, "backend_eof": True}),
    ("which gets the held bytes, then EOF", lambda: _closed_while_detached(b"bye"), lambda k: k.attach(2),
     ["Count(resumes,1)", "CancelTimer(grace)", "Bind(2)", f"Reply(2,OK,{RES},None)", "Send(2,b'bye')", "Close(2)",
      "CloseBackend()", "Unbind(2)", "Close(2)", "Ended(backend_closed)"], {"state": c.ENDED}),
    ("grace expiry ends a detached session", lambda: _detached_with(b""), lambda k: k.grace_expired(),
     ["CancelTimer(grace)", "CloseBackend()", "Ended(grace_expired)"], {"state": c.ENDED, "held": None}),
    ("a late grace timer leaves an attached session alone", attached, lambda k: k.grace_expired(), [], {"state": c.ATTACHED}),
    ("a spent held-bytes budget pauses a detached backend", lambda: _detached_with(b"x"), lambda k: k.budget(True),
     ["ReadBackend(False)"], {"budget_paused": True, "backend_reading": False}),
    ("the budget back: the backend is read again", lambda: _budget_paused(), lambda k: k.budget(False),
     ["ReadBackend(True)"], {"budget_paused": False}),
    ("the budget does not pause an attached session", attached, lambda k: k.budget(True), [], {"backend_reading": True}),
    ("a full client pauses the backend", attached, lambda k: k.client_write_pressure(1, True), ["ReadBackend(False)"],
     {"backend_reading": False}),
    ("a full backend pauses the client and a draining one", draining, lambda k: k.backend_write_pressure(True),
     ["ReadClient(1,False)", "ReadClient(2,False)"], {"backend_write_paused": True}),
    ("mode 2: a new session's reply carries offsets", lambda: make(True), lambda k: k.attach(1, down_received=0),
     ["Bind(1)", "Reply(1,OK,0,(0, 0))", "ReadClient(1,True)"], {"resumable": True}),
    ("mode 2: takeover replays what the client lacks", lambda: _mode2_sent(b"0123456789"),
     lambda k: k.attach(2, down_received=4),
     ["Unbind(1)", "Abort(1)", "Count(takeovers,1)", "Bind(2)", f"Reply(2,OK,{TOOK},(0, 4))", "Send(2,b'456789')",
      "Count(replayed_bytes,6)", "ReadClient(2,True)"], {"bytes_down": 10}),
    ("mode 2: make-before-break offsets are where the old one stops", lambda: _mode2_sent(b"0123456789", up=5),
     lambda k: k.attach(2, after_fin=True, down_received=3),
     ["HalfClose(1)", "StartTimer(drain,5)", "Count(resumes,1)", "Bind(2)", f"Reply(2,OK,{RES},(5, 10))",
      "ReadClient(2,False)"], {"up_start": 5}),
]


def _detached_with(data: bytes) -> SessionCore:
    core = attached()
    core.client_gone(1, fin=True)
    if data:
        core.hold(data)
    return core


def _budget_paused() -> SessionCore:
    core = _detached_with(b"x")
    core.budget(True)
    return core


def _closed_while_detached(data: bytes) -> SessionCore:
    core = _detached_with(data)
    core.backend_closed()
    return core


def _drain_with_rest(rest: bytes) -> SessionCore:
    core = attached()
    core.attach(2, after_fin=True, rest=rest)
    return core


def _mode2_sent(down: bytes, up: int = 0) -> SessionCore:
    core = attached(True)
    core.sent_down(down)
    core.sent_up(up)
    return core


@pytest.mark.parametrize(("name", "setup", "event", "expected", "after"), CASES, ids=[case[0] for case in CASES])
def test_transition(name: str, setup: Any, event: Any, expected: list[str], after: dict[str, Any]) -> None:
    core = setup()
    assert kinds(event(core)) == expected
    for field, value in after.items():
        assert getattr(core, field) == value, field


REFUSALS: list[tuple[str, Any, Any, Status, str]] = [
    ("mode 2 offsets beyond what was sent", lambda: _mode2_sent(b"abc"), lambda k: k.attach(2, down_received=4),
     Status.REPLAY_UNAVAILABLE, "claims 4 bytes; this session sent 3"),
    ("mode 2 bytes no longer held", lambda: _mode2_sent_big(), lambda k: k.attach(2, down_received=0),
     Status.REPLAY_UNAVAILABLE, "no longer held"),
    ("mode 0 attach to a mode 2 session", lambda: attached(True), lambda k: k.attach(2),
     Status.UNSUPPORTED_MODE, "attach in mode 2"),
    ("mode 2 attach to a mode 0 session", attached, lambda k: k.attach(2, down_received=0),
     Status.UNSUPPORTED_MODE, "attach in mode 0"),
    ("attach to an ended session", lambda: _ended(), lambda k: k.attach(2), Status.SESSION_ENDED, "ended"),
]


def _mode2_sent_big() -> SessionCore:
    core = attached(True, replay_bytes=10)
    for _ in range(4):
        core.sent_down(b"x" * 70_000)  # the ring keeps the last 10 bytes, in whole chunks: the last 70,000
    return core


def _ended() -> SessionCore:
    core = attached()
    core.end("test")
    return core


@pytest.mark.parametrize(("name", "setup", "event", "status", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal_changes_nothing(name: str, setup: Any, event: Any, status: Status, message: str) -> None:
    core = setup()
    before = core.to_state()
    with pytest.raises(Refused) as info:
        event(core)
    assert info.value.status == status and message in info.value.message
    assert core.to_state() == before


def test_new_connection_breaking_during_a_drain_detaches_and_the_drain_goes_on() -> None:
    core = draining()
    assert kinds(core.client_gone(2, fin=False)) == ["Unbind(2)", "StartTimer(grace,30)"]
    assert (core.state, core.client, core.draining) == (c.DETACHED, None, 1)
    core.sent_up(4)  # the old connection still delivers its last bytes upstream
    assert kinds(core.client_gone(1, fin=True)) == ["Unbind(1)", "CancelTimer(drain)", "Close(1)"]
    assert core.bytes_up == 4 and core.draining is None and core.state == c.DETACHED


def test_mode2_skip_drops_what_the_drained_connection_delivered() -> None:
    core = attached(True)
    core.attach(2, after_fin=True, down_received=0)  # up_start = 0
    core.sent_up(7)  # the old connection still delivers 7 bytes before its FIN
    core.client_gone(1, fin=True)
    assert core.up_skip == 7  # the client resends from 0: its first 7 bytes are duplicates
    assert core.take_skip(2, b"abcd") == b""
    assert core.take_skip(2, b"efghij") == b"hij"
    assert core.take_skip(2, b"more") == b"more" and not core.skipping


def test_state_survives_serialisation_with_its_replay_ring() -> None:
    core = attached(True)
    core.sent_down(b"0123456789")
    core.sent_up(3)
    core.client_gone(1, fin=False)
    core.hold(b"held")
    state = core.to_state()
    again = SessionCore.from_state(state)
    assert again.to_state() == state
    plan = again.attach(5, down_received=6)  # the replay comes from the restored ring
    assert "Send(5,b'6789')" in kinds(plan) and "Send(5,b'held')" in kinds(plan)
    bad = dict(state, bytes_down=99)
    with pytest.raises(ValueError, match="replay ring ends at 10"):
        SessionCore.from_state(bad)


def test_log_lines_name_the_session() -> None:
    core = make()
    logs = [cmd for cmd in core.attach(1) if isinstance(cmd, c.Log)]
    assert logs and logs[0].level == logging.INFO and logs[0].fields["session"] == "sid"


# -- random sequences of events against the invariants ---------------------------------------------
EVENTS = st.one_of(
    st.tuples(st.just("attach"), st.integers(1, 4), st.booleans(), st.binary(max_size=3)),
    st.tuples(st.just("gone"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("down"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("up"), st.integers(1, 30)),
    st.tuples(st.just("client_full"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("backend_full"), st.booleans()),
    st.tuples(st.just("backend_closed")),
    st.tuples(st.just("grace")),
    st.tuples(st.just("drain")),
    st.tuples(st.just("end")),
)


class Model:
    """What the shell would know from the plans: bound connections, timers, backend reading, ends."""

    def __init__(self) -> None:
        self.bound: set[int] = set()
        self.timers: set[str] = set()
        self.backend_reading = True
        self.ended = 0
        self.received: dict[int, bytearray] = {}

    def run(self, plan: c.Plan) -> None:
        for cmd in plan:
            if isinstance(cmd, c.Bind):
                assert cmd.aid not in self.bound
                self.bound.add(cmd.aid)
            elif isinstance(cmd, c.Unbind):
                assert cmd.aid in self.bound
                self.bound.discard(cmd.aid)
            elif isinstance(cmd, c.StartTimer):
                self.timers.add(cmd.name)
            elif isinstance(cmd, c.CancelTimer):
                self.timers.discard(cmd.name)
            elif isinstance(cmd, c.ReadBackend):
                assert cmd.on != self.backend_reading  # only changes are announced
                self.backend_reading = cmd.on
            elif isinstance(cmd, c.Ended):
                self.ended += 1


@settings(max_examples=400, deadline=None)
@given(resumable=st.booleans(), events=st.lists(EVENTS, max_size=40))
def test_random_event_sequences_keep_the_invariants(resumable: bool, events: list[tuple[Any, ...]]) -> None:
    core = make(resumable, buffer_bytes=50, replay_bytes=64)
    model = Model()
    for ev in events:
        kind = ev[0]
        try:
            if kind == "attach":
                _, aid, after_fin, rest = ev
                if aid in model.bound:
                    continue  # a bound connection's bytes go to its session: it sends no second header
                down = core.bytes_down if resumable else None
                plan = core.attach(aid, after_fin=after_fin, rest=b"" if resumable else rest, down_received=down)
            elif kind == "gone":
                plan = core.client_gone(ev[1], ev[2])
            elif kind == "down":
                if core.state == c.ENDED:
                    continue
                if core.client is not None:
                    core.sent_down(ev[1])
                    plan = []
                else:
                    plan = core.hold(ev[1])
            elif kind == "up":
                if core.client is None:
                    continue
                core.sent_up(ev[1])
                plan = []
            elif kind == "client_full":
                plan = core.client_write_pressure(ev[1], ev[2])
            elif kind == "backend_full":
                plan = core.backend_write_pressure(ev[1])
            elif kind == "backend_closed":
                plan = core.backend_closed()
            elif kind == "grace":
                plan = core.grace_expired() if c.GRACE in model.timers else []
                model.timers.discard(c.GRACE)
            elif kind == "drain":
                plan = core.drain_expired() if c.DRAIN in model.timers else []
                model.timers.discard(c.DRAIN)
            else:
                plan = core.end("test")
        except Refused as exc:
            assert exc.status in (Status.SESSION_ENDED, Status.REPLAY_UNAVAILABLE)
            continue
        model.run(plan)
        # the invariants
        assert core.state in c.STATES
        assert (core.state == c.ATTACHED) == (core.client is not None)
        if core.draining is not None:  # (the new connection may break while the old one drains: detached)
            assert core.state in (c.ATTACHED, c.DETACHED) and core.draining != core.client
        assert model.bound == {a for a in (core.client, core.draining) if a is not None}
        assert (c.GRACE in model.timers) == (core.state == c.DETACHED)
        assert (c.DRAIN in model.timers) == (core.draining is not None)
        assert model.ended == (1 if core.state == c.ENDED else 0)
        if core.state == c.ENDED:
            assert core.held is None and core.client is None and core.draining is None
        else:
            assert model.backend_reading == core.backend_reading == core.should_read_backend
        if core.ring is not None:
            assert core.ring.end == core.bytes_down
        assert SessionCore.from_state(core.to_state()).to_state() == core.to_state()

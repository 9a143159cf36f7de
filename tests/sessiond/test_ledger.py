"""Ended credentials stay ended: on every cloudlet and across restarts of the anchor.

Reproduces the findings: an ended credential started a new session on another cloudlet (local
target) and on the anchor after a sessiond restart; after an anchor crash a mode 0 client was
silently given a new backend connection. Credentials now name their anchor (only it starts their
session) and the anchor journals every session started and ended (state_dir/sessions.log).
"""

from __future__ import annotations

import signal

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from cloudlet.relay.ledger import ENDED, STARTED, SessionLedger
from support.sessiond import Backend, api, issue, start_sessiond_process


async def _echo_service(sp, backend: Backend) -> int:  # type: ignore[no-untyped-def]
    status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo", {"backend": backend.address, "listen": "127.0.0.1"})
    assert status == 200, svc
    return int(svc["port"])


async def _refused(port: int, cred: str, target: str = "") -> Status:
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", port, cred, target, timeout=5).open()
    return err.value.status


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_ended_and_lost_sessions_are_refused_after_a_restart(tmp_path, secret_file, echo_backend: Backend,
                                                                   how: str) -> None:
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    ended, live, unused = issue("echo"), issue("echo"), issue("echo")
    try:
        port = await _echo_service(sp, echo_backend)
        c = SessionClient("127.0.0.1", port, ended)
        await c.open()
        await c.end()
        held = SessionClient("127.0.0.1", port, live)
        await held.open()
        await held.send(b"x")
        assert await held.recv_exactly(1) == b"x"
        assert await _refused(port, ended) == Status.SESSION_ENDED
        if how == "kill -9":
            sp.proc.send_signal(signal.SIGKILL)
            sp.proc.wait(10)
        else:
            sp.stop()
        await held.close()
    finally:
        sp.stop()
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a")  # the same state_dir
    try:
        port = await _echo_service(sp, echo_backend)
        assert await _refused(port, ended) == Status.SESSION_ENDED
        # the session that was live: gone with the process (kill -9) or ended by the shutdown (SIGTERM);
        # either way its credential never silently gets a fresh backend
        assert await _refused(port, live) == (Status.SESSION_LOST if how == "kill -9" else Status.SESSION_ENDED)
        c = SessionClient("127.0.0.1", port, unused)  # a credential never used still starts its session
        reply = await c.open()
        assert reply.ok and not reply.resumed
        await c.close()
        assert (tmp_path / "a" / "state" / "sessions.log").read_text().count("\n") >= 3
    finally:
        sp.stop()


async def test_only_the_anchor_starts_a_session(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a")
    b = await make_sessiond("b")
    ea, _ = await a.put_service("svc", backend.address)
    eb, _ = await b.put_service("svc", backend.address)
    cred = issue("svc", anchor="a")
    c = SessionClient("127.0.0.1", ea.port, cred)
    await c.open()
    await c.end()
    for port in (ea.port, eb.port):  # the ended credential, with a local target, on every cloudlet
        assert await _refused(port, cred) == (Status.SESSION_ENDED if port == ea.port else Status.WRONG_ANCHOR)
    fresh = issue("svc", anchor="a")
    assert await _refused(eb.port, fresh) == Status.WRONG_ANCHOR  # not even a new one starts on b
    assert not b.manager.sessions


def test_ledger_is_bounded_and_never_lets_an_ended_credential_back() -> None:
    now = [10_000.0]
    ledger = SessionLedger(limit=3, lifetime=1000, clock=lambda: now[0])
    for i, issued in enumerate((9_100, 9_200, 9_300, 9_400)):
        ledger.started(f"n{i}", issued)
    assert len(ledger) == 3 and ledger.lookup("n0") is None
    assert ledger.too_old(9_100) and not ledger.too_old(9_101)  # n0 was forgotten: its era may not start
    ledger.ended("n1", 9_200)
    assert ledger.lookup("n1") == ENDED and ledger.lookup("n2") == STARTED
    again = SessionLedger(limit=3, lifetime=1000, clock=lambda: now[0])
    assert again.load([*ledger.dump(), "S n1 9200", "junk line here", "E bad notanumber"]) == 2
    assert again.lookup("n1") == ENDED  # an end is final, whatever comes after it
    assert again.too_old(9_100) and list(again.dump()) == list(ledger.dump())
    now[0] = 10_250.0  # n1 (issued 9_200) expires: it is refused EXPIRED before the ledger is asked
    again.started("n9", 10_200)
    assert again.lookup("n1") is None and len(again) <= 3

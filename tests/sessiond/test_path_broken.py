"""A broken path is not the end of a session: the client sees a reset, never the session's FIN.

Reproduces the finding: when a forwarding sessiond or a tunnel died, the device got an orderly FIN,
which the protocol uses for "the session is over", although the session lived on at the anchor.
Now every client connection resets unless sessiond closes it on purpose (SO_LINGER 0 until an
orderly close), and a forward ends with a FIN only after the anchor's own FIN. Real sessiond
processes, a tcp hop, kill -9 and SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from support.sessiond import Backend, api, issue, start_sessiond_process

pytestmark = pytest.mark.slow


async def _fleet(tmp_path, secret_file, backend: Backend):  # type: ignore[no-untyped-def]
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    b = await start_sessiond_process(tmp_path / "b", secret_file, "b", peers={"a": a.peer_listen})
    ports = {}
    for name, sp in (("a", a), ("b", b)):
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo", {"backend": backend.address, "listen": "127.0.0.1"})
        assert status == 200, svc
        ports[name] = int(svc["port"])
    return a, b, ports


async def _forwarded(ports: dict[str, int], cred: str) -> SessionClient:
    c = SessionClient("127.0.0.1", ports["b"], cred, "a", resumable=True)
    await c.open()
    await c.send(b"hello")
    assert await c.recv_exactly(5) == b"hello"
    return c


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
async def test_forwarder_going_away_resets_and_the_session_resumes_at_the_anchor(
        tmp_path, secret_file, echo_backend: Backend, stop: str) -> None:
    a, b, ports = await _fleet(tmp_path, secret_file, echo_backend)
    try:
        cred = issue("echo")
        c = await _forwarded(ports, cred)
        b.proc.send_signal(signal.SIGKILL if stop == "kill -9" else signal.SIGTERM)
        assert c.reader is not None
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(c.reader.read(65536), 10)
        # the session is alive at a: the client moves there (mode 2) and carries on, nothing lost
        await c.handover("127.0.0.1", ports["a"], target="", fin=False)
        await c.send(b"again")
        assert await c.recv_exactly(5) == b"again"
        await c.end()
    finally:
        b.stop()
        a.stop()


async def test_anchor_crash_resets_and_the_lost_session_is_refused_clearly(tmp_path, secret_file,
                                                                          echo_backend: Backend) -> None:
    a, b, ports = await _fleet(tmp_path, secret_file, echo_backend)
    try:
        cred = issue("echo")
        c = await _forwarded(ports, cred)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        assert c.reader is not None
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(c.reader.read(65536), 10)
        a2 = await start_sessiond_process(tmp_path / "a", secret_file, "a")  # back, same state_dir and port
        try:
            for mode0 in (False, True):  # neither mode silently gets a fresh backend
                with pytest.raises(SessionRefused) as err:
                    await SessionClient("127.0.0.1", ports["a"], cred, resumable=not mode0).open()
                assert err.value.status in (Status.SESSION_LOST, Status.REPLAY_UNAVAILABLE), err.value
                if mode0:
                    assert err.value.status == Status.SESSION_LOST and "ask the controller for a new one" in str(err.value)
        finally:
            a2.stop()
    finally:
        b.stop()
        a.stop()


async def test_the_anchors_end_still_arrives_as_a_fin_through_the_forwarder(tmp_path, secret_file,
                                                                           echo_backend: Backend) -> None:
    a, b, ports = await _fleet(tmp_path, secret_file, echo_backend)
    try:
        cred = issue("echo")
        c = await _forwarded(ports, cred)
        status, _ = await api(a.control_socket, "DELETE", f"/v1/sessions/{cred}")  # the session ends at its anchor
        assert status == 204
        assert c.reader is not None
        assert await asyncio.wait_for(c.reader.read(65536), 10) == b""  # an orderly FIN: the session is over
        with pytest.raises(SessionRefused) as err:
            await SessionClient("127.0.0.1", ports["b"], cred, "a", resumable=True).open()
        assert err.value.status == Status.SESSION_ENDED
    finally:
        b.stop()
        a.stop()

"""A sessiond restart hands its live sessions to the next process (the fd store, sessiond/handoff.py).

Real ``cloudlet sessiond`` subprocesses with the harness's :class:`FdStore` in place of systemd (the
same datagrams and ``$LISTEN_FDS``; molecule runs it under the real systemd), a real agent carrying a
byte-checked stream through the restart, an echo backend that counts its connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import cloudlet
import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from cloudlet_bench.harness.sessiond import FdStore
from support.agent import Stream, agent_for
from support.sessiond import Backend, issue, start_sessiond_process, wait_for


@pytest.fixture
async def echo() -> AsyncIterator[Backend]:
    b = await Backend(echo=True).start()
    yield b
    await b.stop()


async def test_a_clean_restart_of_the_anchor_keeps_the_session_byte_exact(tmp_path: Path, secret_file: Path,
                                                                          echo: Backend) -> None:
    store = FdStore(tmp_path)
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
    agent = None
    try:
        port = await a.put_service("svc", echo.address)
        agent, _ = agent_for({"a": port})
        await agent.start()
        r, w = await asyncio.open_connection(*agent.address)
        stream = Stream(r, w, total=80_000)
        producer = asyncio.create_task(stream.produce(0.002))
        for _ in range(2):
            await asyncio.sleep(0.3)
            a.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(a.proc.wait, 20)
            names = store.names()
            assert "cloudlet-state" in names and "listen-svc" in names, names
            assert sum(n.startswith("backend-") for n in names) == 1
            assert sum(n.startswith("client-") for n in names) == 1, [m.replace("\n", " ") for m in store.messages[-4:]]
            a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
            assert "sessions taken back from the previous process" in a.log()
            await wait_for(lambda: store.names() == [], what="the new process took everything out of the store")
        await producer
        await stream.consume()
        stream.check()  # nothing lost, nothing repeated, in order, through two restarts
        assert len(echo.conns) == 1  # the backend never saw a reconnect
        assert agent.heals == 0 and agent.status()["connections"] == 1  # the same connection throughout
        _, listed = await a.api("GET", "/v1/sessions")
        assert [s["state"] for s in listed["sessions"]] == ["attached"]
        _, health = await a.api("GET", "/v1/health")
        assert health["taken_back"] == 1 and health["version"] == cloudlet.__version__
    finally:
        if agent is not None:
            await agent.stop()
        a.stop()
        store.close()


async def test_after_kill_9_the_session_is_refused_clearly_not_silently_replaced(tmp_path: Path, secret_file: Path,
                                                                                 echo: Backend) -> None:
    store = FdStore(tmp_path)
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
    try:
        port = await a.put_service("svc", echo.address)
        cred = issue("svc")
        client = SessionClient("127.0.0.1", port, cred, resumable=True)
        await client.open()
        await client.send(b"before\n")
        assert await client.recv_exactly(7) == b"before\n"
        os.kill(a.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(a.proc.wait, 20)
        assert store.names() == []  # nothing was handed over
        a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
        client.drop()
        with pytest.raises(SessionRefused) as refused:
            await client.resume()
        assert refused.value.status in (Status.SESSION_LOST, Status.REPLAY_UNAVAILABLE)
        assert len(echo.conns) == 1  # and no fresh backend connection was made for it
    finally:
        a.stop()
        store.close()


async def test_a_mode_0_session_goes_on_over_the_same_connection(tmp_path: Path, secret_file: Path,
                                                                  echo: Backend) -> None:
    """Mode 0 has no offsets to resume at: the hand-over passes its connection itself."""
    store = FdStore(tmp_path)
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
    try:
        port = await a.put_service("svc", echo.address)
        raw = SessionClient("127.0.0.1", port, issue("svc"))
        await raw.open()
        await raw.send(b"one\n")
        assert await raw.recv_exactly(4) == b"one\n"
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(a.proc.wait, 20)
        await raw.send(b"two\n")  # while no process runs: it waits in the socket
        a = await start_sessiond_process(tmp_path / "a", secret_file, "a", fdstore=store, log_level="debug")
        assert await asyncio.wait_for(raw.recv_exactly(4), 20) == b"two\n"
        assert len(echo.conns) == 1
    finally:
        a.stop()
        store.close()


async def test_without_a_store_a_stop_ends_sessions_as_before(tmp_path: Path, secret_file: Path,
                                                               echo: Backend) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")  # not under systemd: no $NOTIFY_SOCKET
    try:
        port = await a.put_service("svc", echo.address)
        client = SessionClient("127.0.0.1", port, issue("svc"), resumable=True)
        await client.open()
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(a.proc.wait, 20)
        assert await asyncio.wait_for(client.recv(), 10) == b""  # the session is over: FIN, as before
        assert "handed over" not in a.log()
    finally:
        a.stop()


async def test_an_in_place_upgrade_hands_everything_to_a_successor_started_beforehand(
        tmp_path: Path, secret_file: Path, echo: Backend) -> None:
    """``POST /v1/upgrade`` (``cloudlet sessiond --upgrade``): the successor imports and reads its
    config while the old process serves, then takes the sessions over SCM_RIGHTS; no fd store needed."""
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a", log_level="debug")
    agent = None
    try:
        port = await a.put_service("svc", echo.address)
        agent, _ = agent_for({"a": port})
        await agent.start()
        r, w = await asyncio.open_connection(*agent.address)
        stream = Stream(r, w, total=80_000)
        producer = asyncio.create_task(stream.produce(0.002))
        pids = [a.pid]
        for _ in range(2):
            await asyncio.sleep(0.3)
            pids.append(await a.upgrade())
        assert len(set(pids)) == 3
        assert await asyncio.to_thread(a.proc.wait, 20) == 0  # the first process exited cleanly
        await producer
        await stream.consume()
        stream.check()  # nothing lost, nothing repeated, in order, through two upgrades
        assert len(echo.conns) == 1  # the backend never saw a reconnect
        assert agent.heals == 0 and agent.status()["connections"] == 1  # the same connection throughout
        _, health = await a.api("GET", "/v1/health")
        assert health["taken_back"] == 1 and health["pid"] == pids[-1]
        assert a.log().count("upgraded in place") == 2
        port_again = await a.put_service("svc", echo.address)
        assert port_again == port  # the same listener
    finally:
        if agent is not None:
            await agent.stop()
        a.stop()


async def test_a_successor_that_cannot_start_leaves_the_running_process_serving(
        tmp_path: Path, secret_file: Path, echo: Backend) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    try:
        port = await a.put_service("svc", echo.address)
        client = SessionClient("127.0.0.1", port, issue("svc"), resumable=True)
        await client.open()
        a.config_path.write_text(a.config_path.read_text().replace("[sessiond]", "[sessiond]\nbogus = 1"))
        status, body = await a.api("POST", "/v1/upgrade")
        assert status == 202
        await wait_for(lambda: "in-place upgrade abandoned" in a.log(), 30, "the abandoned upgrade")
        _, health = await a.api("GET", "/v1/health")
        assert health["pid"] == a.proc.pid  # still the first process
        await client.send(b"still here\n")
        assert await asyncio.wait_for(client.recv_exactly(11), 10) == b"still here\n"
        assert len(echo.conns) == 1
    finally:
        a.stop()

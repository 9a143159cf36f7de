"""Handover by forwarding: B and C relay to the anchor A over the hop; the path stays one hop."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status, encode_header, read_reply
from support.sessiond import Backend, fleet, issue, peer_addr, wait_for


async def test_handover_a_b_c_stays_one_hop_and_keeps_the_stream(make_sessiond, backend: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, backend)
    a, b, c = daemons["a"], daemons["b"], daemons["c"]
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"))
    await client.open()
    be = await backend.next_conn()
    be.writer.write(b"one")
    assert await client.recv_exactly(3) == b"one"

    reply = await client.handover("127.0.0.1", ports["b"], target="a")
    assert reply.ok and reply.resumed
    be.writer.write(b"two")
    assert await client.recv_exactly(3) == b"two"
    await client.send(b"up-via-b")
    assert await be.read_exactly(8) == b"up-via-b"
    assert [s["state"] for s in b.manager.list_sessions()] == ["forwarded"]
    assert b.manager.list_sessions()[0]["peer"] == "a"

    reply = await client.handover("127.0.0.1", ports["c"], target="a")  # names the anchor, not b
    assert reply.ok and reply.resumed
    be.writer.write(b"three")
    assert await client.recv_exactly(5) == b"three"
    await client.send(b"up-via-c")
    assert await be.read_exactly(8) == b"up-via-c"
    await wait_for(lambda: not b.manager.forwards, what="b to drop its forward")
    fwd = c.manager.list_sessions()
    assert [(s["state"], s["peer"]) for s in fwd] == [("forwarded", "a")]  # C -> A directly
    assert a.metrics.handovers.labels("in")._value.get() == 2  # type: ignore[attr-defined]
    assert b.metrics.handovers.labels("in")._value.get() == 0  # type: ignore[attr-defined]
    assert len(backend.conns) == 1
    assert [s["state"] for s in a.manager.list_sessions()] == ["attached"]

    # END through the forwarder ends the session at the anchor
    assert (await client.end()).ok
    assert await asyncio.wait_for(be.reader.read(10), 5) == b""
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", ports["b"], client.credential, "a").open()
    assert err.value.status == Status.SESSION_ENDED


async def test_fin_handover_through_forwarder_loses_and_duplicates_nothing(make_sessiond, backend: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, backend, ("a", "b"))
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"))
    await client.open()
    be = await backend.next_conn()
    stop = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            be.writer.write(struct.pack("!Q", i))
            i += 1
            if i % 50 == 0:
                await be.writer.drain()
                await asyncio.sleep(0.001)

    task = asyncio.create_task(produce())
    got = bytearray()
    for target_port, target in ((ports["b"], "a"), (ports["a"], ""), (ports["b"], "a")):
        got += await asyncio.wait_for(client.recv(), 5)
        await client.handover("127.0.0.1", target_port, target=target)
    stop.set()
    await task
    while True:
        try:
            got += await asyncio.wait_for(client.recv(), 0.5)
        except asyncio.TimeoutError:
            break
    n = len(got) // 8
    assert len(got) % 8 == 0
    assert list(struct.unpack(f"!{n}Q", bytes(got))) == list(range(n))


async def test_unknown_and_unavailable_peers_fail_fast(make_sessiond, backend: Backend) -> None:
    b = await make_sessiond("b", peers={"a": {"transport": "tcp", "address": "127.0.0.1:1"}})
    entry, _ = await b.put_service("svc", backend.address)
    for target, status in (("zz", Status.UNKNOWN_PEER), ("a", Status.PEER_UNAVAILABLE)):
        started = time.monotonic()
        with pytest.raises(SessionRefused) as err:
            await SessionClient("127.0.0.1", entry.port, issue("svc", anchor=target), target).open()
        assert err.value.status == status
        assert time.monotonic() - started < 5
    # only the credential's anchor may be the target, and only the anchor starts the session
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", entry.port, issue("svc", anchor="a"), "zz").open()
    assert err.value.status == Status.BAD_TARGET and "anchored at cloudlet 'a'" in str(err.value)
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", entry.port, issue("svc", anchor="a")).open()  # local target on b
    assert err.value.status == Status.WRONG_ANCHOR and "connect with target 'a'" in str(err.value)
    assert not b.manager.sessions  # b never started a session of a's


async def test_peer_endpoint_refuses_chains_and_checks_credentials(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a")
    await a.put_service("svc", backend.address)
    host, port = a.peer_address
    cases = [
        (issue("svc"), "c", Status.BAD_TARGET),  # no chains: the peer endpoint never forwards again
        ("v1.svc.1.AAAA.BBBB", "", Status.BAD_CREDENTIAL),
        (issue("nope"), "", Status.UNKNOWN_SERVICE),
    ]
    for cred, target, status in cases:
        r, w = await asyncio.open_connection(host, port)
        w.write(encode_header(cred, target))
        reply = await asyncio.wait_for(read_reply(r), 5)
        assert reply.status == status, (cred, target, reply)
        w.close()
    # the credential is checked on the forwarder before a peer channel is spent on it
    b = await make_sessiond("b", peers={"a": {"transport": "tcp", "address": peer_addr(a)}})
    entry, _ = await b.put_service("svc", backend.address)
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", entry.port, issue("other"), "a").open()
    assert err.value.status == Status.WRONG_SERVICE
    assert a.metrics.handovers.labels("in")._value.get() == 0  # type: ignore[attr-defined]


async def test_one_client_hands_over_the_other_sees_no_gap(make_sessiond) -> None:
    """Two clients of one service; a pushes timestamps every 1 ms; one moves A->B, the other's
    inter-arrival gaps stay within normal jitter."""
    conns: list[asyncio.StreamWriter] = []

    async def ticker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        try:
            while True:
                w.write(struct.pack("!d", time.monotonic()))
                await w.drain()
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            pass

    srv = await asyncio.start_server(ticker, "127.0.0.1", 0)
    be = Backend()
    be.server = srv
    daemons, ports = await fleet(make_sessiond, be, ("a", "b"))
    mover = SessionClient("127.0.0.1", ports["a"], issue("svc"))
    steady = SessionClient("127.0.0.1", ports["a"], issue("svc"))
    await mover.open()
    await steady.open()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        last = None
        buf = b""
        while not stop.is_set():
            buf += await steady.recv()
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            buf = buf[len(buf) // 8 * 8 :]

    async def drain_mover() -> None:
        while True:
            if not await mover.recv():
                await asyncio.sleep(0.001)

    w = asyncio.create_task(watch())
    m = asyncio.create_task(drain_mover())
    await asyncio.sleep(0.2)
    for i in range(6):
        m.cancel()
        await asyncio.gather(m, return_exceptions=True)
        await mover.handover("127.0.0.1", ports["b" if i % 2 == 0 else "a"], target="a" if i % 2 == 0 else "")
        m = asyncio.create_task(drain_mover())
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    stop.set()
    m.cancel()
    await asyncio.wait_for(asyncio.gather(w, return_exceptions=True), 5)
    assert len(gaps) > 100
    assert max(gaps) < 0.25, f"steady client stalled for {max(gaps) * 1000:.0f} ms"
    await mover.close()
    await steady.close()
    srv.close()


async def test_handover_between_real_sessiond_processes(tmp_path, secret_file, backend: Backend) -> None:
    """Two `cloudlet sessiond` processes with a tcp peer: a FIN move a -> b and back keeps one
    backend connection and every byte in order; a move without FIN is taken over by the anchor."""
    from support.sessiond import api, start_sessiond_process

    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    b = None
    try:
        _, health = await api(a.control_socket, "GET", "/v1/health")
        b = await start_sessiond_process(tmp_path / "b", secret_file, "b",
                                         peers={"a": {"transport": "tcp", "address": health["peer_listen"]}})
        ports = {}
        for name, sp in (("a", a), ("b", b)):
            status, svc = await api(sp.control_socket, "PUT", "/v1/services/svc", {"backend": backend.address, "listen": "127.0.0.1"})
            assert status == 200
            ports[name] = svc["port"]
        client = SessionClient("127.0.0.1", ports["a"], issue("svc"))
        await client.open()
        be = await backend.next_conn()
        be.writer.write(b"A1")
        assert await client.recv_exactly(2) == b"A1"
        await client.detach()
        be.writer.write(b"held")  # sent while the device is between cloudlets
        reply = await client.handover("127.0.0.1", ports["b"], target="a")
        assert reply.resumed
        assert await client.recv_exactly(4) == b"held"
        await client.send(b"via-b")
        assert await be.read_exactly(5) == b"via-b"
        _, sessions_b = await api(b.control_socket, "GET", "/v1/sessions")
        assert [s["state"] for s in sessions_b["sessions"]] == ["forwarded"]
        _, peers = await api(b.control_socket, "GET", "/v1/peers")
        assert peers["peers"][0]["name"] == "a" and peers["peers"][0]["state"] == "up"
        reply = await client.handover("127.0.0.1", ports["a"], target="", fin=False)  # no FIN: takeover
        assert reply.took_over
        be.writer.write(b"back-home")
        assert await client.recv_exactly(9) == b"back-home"
        assert len(backend.conns) == 1
        assert (await client.end()).ok
        assert await asyncio.wait_for(be.reader.read(10), 5) == b""
        await client.close()
    finally:
        if b is not None:
            b.stop()
        a.stop()


async def test_client_handover_by_name_and_resume_after_a_drop(make_sessiond, backend: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, backend, ("a", "b"))
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"), anchor="a",
                           cloudlets={n: ("127.0.0.1", p) for n, p in ports.items()})
    await client.open()
    be = await backend.next_conn()
    assert (await client.handover(to="b")).resumed
    assert client.target == "a" and client.port == ports["b"]
    be.writer.write(b"via-b")
    assert await client.recv_exactly(5) == b"via-b"
    client.drop()  # the link is gone without FIN; the device comes back on the same cloudlet
    reply = await client.resume()
    assert reply.ok and reply.took_over
    be.writer.write(b"again")
    assert await client.recv_exactly(5) == b"again"
    assert (await client.handover(to="a")).resumed and client.target == ""
    with pytest.raises(KeyError):
        await client.handover(to="zz")
    assert len(backend.conns) == 1
    await client.close()


async def test_silent_peer_is_refused_in_bounded_time(make_sessiond, backend: Backend) -> None:
    """A peer that accepts but never answers (hung sessiond) costs a bounded wait, then PEER_UNAVAILABLE."""
    silent_conns: list[asyncio.StreamWriter] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        silent_conns.append(w)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    b = await make_sessiond("b", header_timeout_seconds=0.5, backend_connect_timeout_seconds=0.5,
                            peers={"a": {"transport": "tcp", "address": "127.0.0.1:%d" % srv.sockets[0].getsockname()[1]}})
    entry, _ = await b.put_service("svc", backend.address)
    other = SessionClient("127.0.0.1", entry.port, issue("svc", anchor="b"))
    started = time.monotonic()
    pending = asyncio.create_task(SessionClient("127.0.0.1", entry.port, issue("svc"), "a").open())
    await other.open()  # the hung forward does not hold up local sessions
    with pytest.raises(SessionRefused) as err:
        await pending
    assert err.value.status == Status.PEER_UNAVAILABLE
    assert time.monotonic() - started < 5
    await other.close()
    for w in silent_conns:
        w.close()
    srv.close()


async def test_refused_handover_leaves_the_old_connection_working(make_sessiond, backend: Backend) -> None:
    """Make-before-break: the old connection is half-closed only once the new one has the session."""
    daemons, ports = await fleet(make_sessiond, backend, ("a", "b"))
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"))
    await client.open()
    be = await backend.next_conn()
    old_writer = client.writer
    with pytest.raises(SessionRefused) as err:
        await client.handover("127.0.0.1", ports["b"], target="zz")  # not this session's anchor
    assert err.value.status == Status.BAD_TARGET
    assert client.writer is old_writer and (client.host, client.port, client.target) == ("127.0.0.1", ports["a"], "")
    be.writer.write(b"still-here")
    assert await asyncio.wait_for(client.recv_exactly(10), 5) == b"still-here"
    await client.send(b"and-up")
    assert await be.read_exactly(6) == b"and-up"
    [s] = daemons["a"].manager.list_sessions()
    assert s["state"] == "attached" and daemons["a"].metrics.resumes._value.get() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("resumable", [False, True], ids=["mode0", "mode2"])
async def test_recv_runs_on_through_moves_both_ways_in_order(make_sessiond, echo_backend: Backend,
                                                             resumable: bool) -> None:
    """The application reads and writes in its own tasks while the client moves a -> b -> a ..."""
    daemons, ports = await fleet(make_sessiond, echo_backend, ("a", "b"))
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"), resumable=resumable)
    await client.open()
    total = 200_000
    got = bytearray()

    async def reader() -> None:
        while len(got) < total * 8:
            data = await client.recv()
            assert data, "recv returned EOF in the middle of a move"
            got.extend(data)

    async def writer() -> None:
        for i in range(0, total, 500):
            await client.send(struct.pack("!500Q", *range(i, i + 500)))
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    moves = 0
    while not tasks[1].done() or moves < 4:
        to = "b" if moves % 2 == 0 else "a"
        await client.handover("127.0.0.1", ports[to], target="a" if to == "b" else "")
        moves += 1
        await asyncio.sleep(0.005)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert list(struct.unpack(f"!{total}Q", bytes(got))) == list(range(total))  # echoed: up and down in order
    assert daemons["a"].metrics.resumes._value.get() == moves  # type: ignore[attr-defined]
    await client.close()

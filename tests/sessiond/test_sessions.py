"""Session semantics on one sessiond: resume after FIN, takeover, end, grace expiry, backend close,
bounded buffers with back-pressure, and isolation of other sessions."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from support.sessiond import Backend, issue, wait_for


@pytest.fixture(params=["protocol", "splice"])
def relay(request: pytest.FixtureRequest) -> dict:
    """Every semantic holds on the Protocol path and on the splice fast path (threshold 0)."""
    return {"splice_threshold_bytes": -1 if request.param == "protocol" else 0}


async def service(daemon, backend: Backend, name: str = "svc") -> int:  # type: ignore[no-untyped-def]
    entry, _ = await daemon.put_service(name, backend.address)
    return entry.port


async def test_new_session_relays_both_ways(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    reply = await c.open()
    assert reply.ok and not reply.resumed
    b = await backend.next_conn()
    await c.send(b"ping")
    assert await b.read_exactly(4) == b"ping"
    b.writer.write(b"pong")
    assert await c.recv_exactly(4) == b"pong"
    # data sent right behind the header (before the reply) is not lost either
    c2 = SessionClient("127.0.0.1", port, issue("svc"))
    r, w = await asyncio.open_connection("127.0.0.1", port)
    from cloudlet.protocol.wire import encode_header, read_reply

    w.write(encode_header(c2.credential) + b"early")
    assert (await read_reply(r)).ok
    b2 = await backend.next_conn()
    assert await b2.read_exactly(5) == b"early"
    w.close()
    await c.close()


async def test_resume_after_fin_gets_bytes_sent_while_away_exactly_once_in_order(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    stop = asyncio.Event()

    async def produce() -> None:  # numbered records, continuously, across the detach
        i = 0
        while not stop.is_set():
            b.writer.write(struct.pack("!I", i) * 64)
            await b.writer.drain()
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0.001)

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.05)
    await c.detach()
    await wait_for(lambda: a.manager.list_sessions()[0]["state"] == "detached", what="detached")
    await wait_for(lambda: a.manager.list_sessions()[0]["buffered"] > 10_000, what="bytes held while away")
    reply = await c.open()
    assert reply.ok and reply.resumed
    await asyncio.sleep(0.05)
    stop.set()
    await task
    received = bytearray()
    expected_records = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            received += await asyncio.wait_for(c.recv(), 0.3)
        except asyncio.TimeoutError:
            break
    assert len(received) % 256 == 0
    expected_records = len(received) // 256
    for i in range(expected_records):
        rec = received[i * 256 : (i + 1) * 256]
        assert rec == struct.pack("!I", i) * 64, f"record {i} out of order or duplicated"
    assert expected_records > 50
    assert a.metrics.resumes._value.get() == 1  # type: ignore[attr-defined]
    assert len(backend.conns) == 1  # the backend connection survived the detach
    upgrades = a.metrics.splice_upgrades._value.get()  # type: ignore[attr-defined]
    assert upgrades >= 1 if relay["splice_threshold_bytes"] == 0 else upgrades == 0
    await c.close()


async def test_takeover_when_old_connection_never_closed(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    cred = issue("svc")
    old = SessionClient("127.0.0.1", port, cred)
    await old.open()
    b = await backend.next_conn()
    old_reader = old.reader
    new = SessionClient("127.0.0.1", port, cred)  # old connection is still open: no FIN was sent
    reply = await new.open()
    assert reply.ok and reply.took_over and reply.resumed
    assert old_reader is not None
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        data = await asyncio.wait_for(old_reader.read(100), 5)
        if not data:
            raise ConnectionError("closed")
    b.writer.write(b"to-new")
    assert await new.recv_exactly(6) == b"to-new"
    await new.send(b"from-new")
    assert await b.read_exactly(8) == b"from-new"
    assert len(backend.conns) == 1
    assert a.metrics.takeovers._value.get() == 1  # type: ignore[attr-defined]
    await old.close()
    await new.close()


async def test_explicit_end_closes_backend_and_refuses_credential(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    reply = await c.end()
    assert reply.ok
    assert await asyncio.wait_for(b.reader.read(10), 5) == b""  # upstream closed
    with pytest.raises(SessionRefused) as err:
        await c.open()
    assert err.value.status == Status.SESSION_ENDED
    assert a.manager.list_sessions() == []


async def test_grace_expiry_ends_session_and_closes_upstream(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay, grace_seconds=0.3)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    await c.detach()
    started = time.monotonic()
    assert await asyncio.wait_for(b.reader.read(10), 10) == b""
    assert time.monotonic() - started >= 0.25
    with pytest.raises(SessionRefused) as err:
        await c.open()
    assert err.value.status == Status.SESSION_ENDED


async def test_backend_close_reaches_attached_client(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    b.writer.write(b"last words")
    b.writer.close()
    assert await c.recv_exactly(10) == b"last words"
    assert await asyncio.wait_for(c.recv(), 5) == b""
    await wait_for(lambda: not a.manager.sessions, what="session ended")


async def test_backend_close_while_detached_delivered_after_buffered_bytes(relay: dict, make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    await c.detach()
    await wait_for(lambda: a.manager.list_sessions()[0]["state"] == "detached", what="detached")
    b.writer.write(b"held-1 held-2")
    b.writer.close()
    await wait_for(lambda: next(iter(a.manager.sessions.values())).backend_eof, what="backend eof seen")
    reply = await c.open()
    assert reply.resumed
    assert await c.recv_exactly(13) == b"held-1 held-2"
    assert await asyncio.wait_for(c.recv(), 5) == b""
    with pytest.raises(SessionRefused) as err:
        await c.open()
    assert err.value.status == Status.SESSION_ENDED


async def test_detached_buffer_is_bounded_and_backend_is_paused(relay: dict, make_sessiond, backend: Backend) -> None:
    limit = 64 * 1024
    a = await make_sessiond("a", **relay, buffer_bytes=limit)
    port = await service(a, backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    b = await backend.next_conn()
    await c.detach()
    await wait_for(lambda: a.manager.list_sessions()[0]["state"] == "detached", what="detached")
    total = 40 * 1024 * 1024  # more than the kernel's socket buffers can absorb on the way
    chunk = bytes(range(256)) * 256
    sent = 0
    b.writer.transport.set_write_buffer_limits(high=1 << 30)
    while sent < total:  # the client never comes back: the backend must end up blocked, not us
        b.writer.write(chunk)
        sent += len(chunk)
    await asyncio.sleep(0.5)
    held = a.manager.list_sessions()[0]["buffered"]
    assert limit <= held <= limit + 512 * 1024, held
    assert b.writer.transport.get_write_buffer_size() > 0  # back-pressure reached the backend itself
    # ... and nothing was dropped: resuming gets everything in order
    await c.open()
    got = 0
    while got < total:
        data = await asyncio.wait_for(c.recv(1 << 20), 10)
        assert data, "unexpected EOF"
        assert data == (chunk * ((len(data) + got % len(chunk)) // len(chunk) + 2))[got % len(chunk) :][: len(data)]
        got += len(data)
    assert got == total
    if relay["splice_threshold_bytes"] == 0:
        assert a.metrics.splice_upgrades._value.get() >= 1  # type: ignore[attr-defined]
    await c.close()


async def test_other_sessions_never_paused(relay: dict, make_sessiond, echo_backend: Backend, backend: Backend) -> None:
    a = await make_sessiond("a", **relay, buffer_bytes=16 * 1024)
    port = await service(a, backend, "push")
    eport = await service(a, echo_backend, "echo")
    stalled = SessionClient("127.0.0.1", port, issue("push"))
    await stalled.open()
    b = await backend.next_conn()
    await stalled.detach()
    b.writer.write(b"x" * (4 * 1024 * 1024))  # fills the detached session's buffer
    takeover = SessionClient("127.0.0.1", port, issue("push"))
    await takeover.open()
    other = SessionClient("127.0.0.1", eport, issue("echo"))
    await other.open()
    for i in range(50):
        msg = f"msg-{i:04d}".encode()
        await other.send(msg)
        assert await asyncio.wait_for(other.recv_exactly(len(msg)), 5) == msg
    await other.close()
    await takeover.close()


async def test_bulk_both_ways_intact_and_detach_mid_stream(relay: dict, make_sessiond, echo_backend: Backend) -> None:
    """16 MiB through an echo backend while reading concurrently (the splice path upgrades here),
    then a detach in the middle of the stream: nothing lost, nothing duplicated, order kept."""
    a = await make_sessiond("a", **relay)
    port = await service(a, echo_backend)
    c = SessionClient("127.0.0.1", port, issue("svc"))
    await c.open()
    total = 16 * 1024 * 1024
    pattern = bytes(i % 251 for i in range(1 << 16))

    async def send() -> None:
        sent = 0
        while sent < total:
            await c.send(pattern)
            sent += len(pattern)

    sender = asyncio.create_task(send())
    got = bytearray()
    while len(got) < total // 2:
        got += await asyncio.wait_for(c.recv(), 10)
    await sender
    rest = await c.detach()  # mid-stream: the echo of the second half is partly in flight
    assert rest is not None
    await c.open()
    while len(got) < total:
        data = await asyncio.wait_for(c.recv(), 10)
        assert data, "EOF before all echoed bytes arrived"
        got += data
    assert len(got) == total
    assert bytes(got) == pattern * (total // len(pattern))
    if relay["splice_threshold_bytes"] == 0:
        assert a.metrics.splice_upgrades._value.get() >= 1  # type: ignore[attr-defined]
    await c.close()


async def test_after_fin_attach_overtaking_the_fin_drains_the_old_connection(relay: dict, make_sessiond, backend: Backend) -> None:
    """The new connection's ATTACH (flag AFTER_FIN) reaches the anchor before the old connection's
    FIN: the old one is drained, not aborted; upstream order holds (old's last bytes first)."""
    from cloudlet.protocol.wire import HEADER_AFTER_FIN, encode_header, read_reply

    a = await make_sessiond("a", **relay)
    port = await service(a, backend)
    cred = issue("svc")
    old = SessionClient("127.0.0.1", port, cred)
    await old.open()
    be = await backend.next_conn()
    be.writer.write(b"before-switch|")
    assert await old.recv_exactly(14) == b"before-switch|"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(encode_header(cred, flags=HEADER_AFTER_FIN) + b"new-up")  # the old FIN is not sent yet
    reply = await asyncio.wait_for(read_reply(r), 5)
    assert reply.ok and reply.resumed and not reply.took_over
    be.writer.write(b"after-switch")
    assert await asyncio.wait_for(r.readexactly(12), 5) == b"after-switch"  # downstream moved at once
    await asyncio.sleep(0.1)
    assert be.reader._buffer == b""  # type: ignore[attr-defined]  # new's bytes wait for old's FIN
    await old.send(b"old-last|")
    assert old.writer is not None
    old.writer.write_eof()
    assert await be.read_exactly(15) == b"old-last|new-up"
    assert await asyncio.wait_for(old.reader.read(10), 5) == b""  # type: ignore[union-attr]  # old closed cleanly
    w.write(b"+more")
    assert await be.read_exactly(5) == b"+more"
    assert a.metrics.takeovers._value.get() == 0  # type: ignore[attr-defined]
    w.close()
    await old.close()


async def test_after_fin_without_the_fin_falls_back_to_takeover(relay: dict, make_sessiond, backend: Backend) -> None:
    from cloudlet.protocol.wire import HEADER_AFTER_FIN, encode_header, read_reply

    a = await make_sessiond("a", **relay, header_timeout_seconds=0.5)
    port = await service(a, backend)
    cred = issue("svc")
    old = SessionClient("127.0.0.1", port, cred)
    await old.open()
    be = await backend.next_conn()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(encode_header(cred, flags=HEADER_AFTER_FIN) + b"waiting")
    assert (await asyncio.wait_for(read_reply(r), 5)).ok
    # the old connection never sends its FIN: after the header timeout it is aborted and the new one read
    assert await be.read_exactly(7, timeout=10) == b"waiting"
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        if not await asyncio.wait_for(old.reader.read(10), 5):  # type: ignore[union-attr]
            raise ConnectionError("closed")
    w.close()
    await old.close()

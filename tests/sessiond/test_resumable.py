"""Protocol mode 2 (resumable): byte offsets at attach make a move without FIN lose nothing."""

from __future__ import annotations

import asyncio
import struct

from cloudlet.client import SessionClient
from cloudlet.protocol.wire import HEADER_AFTER_FIN, Mode, Op, Status, encode_header, read_reply
from support.sessiond import Backend, fleet, issue, raw_connect, wait_for


def _session(daemon, cred: str):  # type: ignore[no-untyped-def]
    return daemon.manager.sessions[cred.split(".")[5]]


async def _mode2(port: int, cred: str, down_received: int, flags: int = 0):  # type: ignore[no-untyped-def]
    r, w = await raw_connect(port)
    w.write(encode_header(cred, "", Op.ATTACH, Mode.RESUMABLE, flags, down_received))
    return r, w, await asyncio.wait_for(read_reply(r), 5)


async def test_takeover_replays_what_the_abandoned_connection_never_delivered(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a")
    entry, _ = await a.put_service("svc", backend.address)
    cred = issue("svc")
    client = SessionClient("127.0.0.1", entry.port, cred, resumable=True)
    await client.open()
    be = await backend.next_conn()
    be.writer.write(b"first")
    assert await client.recv_exactly(5) == b"first"
    client.writer.transport.pause_reading()  # type: ignore[union-attr]  # the radio link goes: nothing more arrives
    be.writer.write(b"in-flight " * 100)
    await wait_for(lambda: _session(a, cred).bytes_down == 1005, what="the anchor to send on the old connection")
    reply = await client.resume()  # no FIN: a takeover
    assert reply.took_over and (reply.down_start, reply.up_received) == (5, 0)
    be.writer.write(b"after")
    assert await client.recv_exactly(1005) == b"in-flight " * 100 + b"after"
    assert a.metrics.replayed_bytes._value.get() == 1000  # type: ignore[attr-defined]
    await client.close()


async def test_raw_mode_loses_the_same_bytes(make_sessiond, backend: Backend) -> None:
    """The contrast the bench also shows: in mode 0 those bytes are gone."""
    a = await make_sessiond("a")
    entry, _ = await a.put_service("svc", backend.address)
    cred = issue("svc")
    client = SessionClient("127.0.0.1", entry.port, cred)
    await client.open()
    be = await backend.next_conn()
    client.writer.transport.pause_reading()  # type: ignore[union-attr]
    be.writer.write(b"in-flight " * 100)
    await wait_for(lambda: _session(a, cred).bytes_down == 1000, what="the anchor to send on the old connection")
    await client.resume()
    be.writer.write(b"after")
    assert await client.recv_exactly(5) == b"after"
    await client.close()


async def test_upstream_resend_is_deduplicated_after_a_drained_connection(make_sessiond, backend: Backend) -> None:
    """The reply tells where to resend from; bytes the old connection still brought are skipped."""
    a = await make_sessiond("a")
    entry, _ = await a.put_service("svc", backend.address)
    cred = issue("svc")
    r1, w1, reply = await _mode2(entry.port, cred, 0)
    assert reply.ok and (reply.up_received, reply.down_start) == (0, 0)
    be = await backend.next_conn()
    w1.write(b"0123456789")
    assert await be.read_exactly(10) == b"0123456789"
    r2, w2, reply = await _mode2(entry.port, cred, 0, HEADER_AFTER_FIN)  # make-before-break
    assert reply.ok and reply.resumed and not reply.took_over and reply.up_received == 10
    w1.write(b"ABCDE")  # still on the old connection, which drains until its FIN
    w1.write_eof()
    w2.write(b"ABCDEFGH")  # resent from offset 10, as the reply said
    assert await be.read_exactly(8) == b"ABCDEFGH"  # ABCDE once (from the old connection), then FGH
    w2.write(b"IJ")
    assert await be.read_exactly(2) == b"IJ"
    assert _session(a, cred).bytes_up == 20
    w1.close()
    w2.close()


async def test_replay_refusals_are_clear_and_harm_nothing(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", replay_bytes=64)
    entry, _ = await a.put_service("svc", backend.address)
    cred = issue("svc")
    # a count of bytes of a session this cloudlet does not hold (its sessiond restarted, say)
    _, w, reply = await _mode2(entry.port, cred, 10)
    assert reply.status == Status.REPLAY_UNAVAILABLE and "does not hold" in reply.message
    w.close()
    r1, w1, reply = await _mode2(entry.port, cred, 0)
    assert reply.ok
    be = await backend.next_conn()
    be.writer.write(b"x" * 300_000)  # the ring keeps 64 bytes (plus at most two 64 KiB chunks)
    assert len(await asyncio.wait_for(r1.readexactly(300_000), 5)) == 300_000
    # claims to have fewer bytes than the ring still holds: refused, the attached connection untouched
    _, w, reply = await _mode2(entry.port, cred, 100)
    assert reply.status == Status.REPLAY_UNAVAILABLE and "no longer held" in reply.message
    w.close()
    _, w, reply = await _mode2(entry.port, cred, 300_001)  # more than was ever sent
    assert reply.status == Status.REPLAY_UNAVAILABLE and "claims 300001 bytes" in reply.message
    w.close()
    # the wrong mode for this session, and data before the reply in mode 2
    r, w = await raw_connect(entry.port)
    w.write(encode_header(cred, ""))
    assert (await asyncio.wait_for(read_reply(r), 5)).status == Status.UNSUPPORTED_MODE
    w.close()
    r, w = await raw_connect(entry.port)
    w.write(encode_header(cred, "", Op.ATTACH, Mode.RESUMABLE, 0, 1000) + b"too early")
    assert (await asyncio.wait_for(read_reply(r), 5)).status == Status.BAD_HEADER
    w.close()
    be.writer.write(b"still")
    assert await asyncio.wait_for(r1.readexactly(5), 5) == b"still"
    assert _session(a, cred).client is not None and _session(a, cred).state == "attached"
    w1.close()


async def test_client_repairs_a_gap_left_by_a_broken_old_connection(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a")
    entry, _ = await a.put_service("svc", backend.address)
    cred = issue("svc")
    client = SessionClient("127.0.0.1", entry.port, cred, resumable=True)
    await client.open()
    be = await backend.next_conn()
    old = client.writer
    old.transport.pause_reading()  # type: ignore[union-attr]  # the bytes stay in the old socket
    be.writer.write(b"on-the-old-path")
    await wait_for(lambda: _session(a, cred).bytes_down == 15, what="the anchor to send on the old connection")
    await client.handover("127.0.0.1", entry.port)  # clean move: the old path should drain to EOF...
    old.transport.abort()  # type: ignore[union-attr]  # ...but it breaks first and its bytes are lost
    be.writer.write(b"+new")
    assert await asyncio.wait_for(client.recv_exactly(19), 10) == b"on-the-old-path+new"  # replayed after a gap
    assert client.down_offset == 19
    await client.close()


async def test_forwarded_no_fin_moves_lose_nothing_both_ways(make_sessiond, echo_backend: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, echo_backend, ("a", "b"))
    client = SessionClient("127.0.0.1", ports["a"], issue("svc"), resumable=True)
    await client.open()
    total = 100_000
    got = bytearray()

    async def reader() -> None:
        while len(got) < total * 8:
            data = await client.recv()
            assert data
            got.extend(data)

    async def writer() -> None:
        for i in range(0, total, 500):
            await client.send(struct.pack("!500Q", *range(i, i + 500)))
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    moves = 0
    while not tasks[1].done() or moves < 4:
        to = "b" if moves % 2 == 0 else "a"
        await client.handover("127.0.0.1", ports[to], target="a" if to == "b" else "", fin=False)
        moves += 1
        await asyncio.sleep(0.005)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert list(struct.unpack(f"!{total}Q", bytes(got))) == list(range(total))  # echoed, exactly once, in order
    assert daemons["a"].metrics.takeovers._value.get() == moves  # type: ignore[attr-defined]
    await client.close()

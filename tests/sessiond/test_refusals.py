"""Bad input gets a clear refusal on the wire and leaves other sessions untouched."""

from __future__ import annotations

import asyncio
import time

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol import credentials
from cloudlet.protocol.wire import HEADER_FIXED, MAGIC, Status, encode_header, read_reply
from support.sessiond import SECRET, Backend, issue


async def refused_with(port: int, payload: bytes, *, half_close: bool = False) -> Status:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    if half_close:
        w.write_eof()
    reply = await asyncio.wait_for(read_reply(r), 10)
    assert reply.message  # a clear message, not just a code
    assert await asyncio.wait_for(r.read(10), 5) == b""  # and the server closed
    w.close()
    return reply.status


async def test_bad_headers_and_credentials_are_refused_without_harming_others(make_sessiond, echo_backend: Backend) -> None:
    a = await make_sessiond("a", header_timeout_seconds=0.5, credential_lifetime_seconds=3600)
    entry, _ = await a.put_service("svc", echo_backend.address)
    port = entry.port
    victim = SessionClient("127.0.0.1", port, issue("svc"))
    await victim.open()
    fixed = lambda **kw: HEADER_FIXED.pack(MAGIC, kw.get("v", 1), kw.get("mode", 0), 1, 0, kw.get("cred", 10), 0)  # noqa: E731
    forged = credentials.issue(b"not-the-fleet-secret-at-all", "svc", "a").token
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {}, Status.BAD_HEADER),  # malformed
        (fixed(cred=5000), {}, Status.BAD_HEADER),  # oversized
        (fixed(v=7), {}, Status.UNSUPPORTED_VERSION),
        (fixed(mode=1), {}, Status.UNSUPPORTED_MODE),  # framed mode is reserved
        (fixed(cred=10) + b"abc", {"half_close": True}, Status.BAD_HEADER),  # truncated
        (encode_header(forged), {}, Status.BAD_CREDENTIAL),  # guessed / foreign
        (encode_header("v1.svc.1700000000.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA"), {}, Status.BAD_CREDENTIAL),
        (encode_header(issue("other")), {}, Status.WRONG_SERVICE),
        (encode_header(credentials.issue(SECRET, "svc", "a", time.time() - 7200).token), {}, Status.EXPIRED),
        (encode_header(issue("svc"), "Not A Name!"), {}, Status.BAD_TARGET),
    ]
    for payload, kw, status in cases:
        assert await refused_with(port, payload, **kw) == status, (payload[:30], status)
        await victim.send(b"still-here")
        assert await asyncio.wait_for(victim.recv_exactly(10), 5) == b"still-here"
    assert a.metrics.header_errors._value.get() == 6  # type: ignore[attr-defined]
    assert a.metrics.refusals.labels("EXPIRED")._value.get() == 1  # type: ignore[attr-defined]


async def test_slow_header_times_out_others_unaffected(make_sessiond, echo_backend: Backend) -> None:
    a = await make_sessiond("a", header_timeout_seconds=0.5)
    entry, _ = await a.put_service("svc", echo_backend.address)
    slow_r, slow_w = await asyncio.open_connection("127.0.0.1", entry.port)
    slow_w.write(encode_header(issue("svc"))[:7])  # part of a header, then silence
    c = SessionClient("127.0.0.1", entry.port, issue("svc"))
    await c.open()  # a slow client does not block others
    await c.send(b"hi")
    assert await c.recv_exactly(2) == b"hi"
    started = time.monotonic()
    reply = await asyncio.wait_for(read_reply(slow_r), 10)
    assert reply.status == Status.HEADER_TIMEOUT
    assert 0.3 < time.monotonic() - started < 5
    slow_w.close()


async def test_live_session_resumes_with_an_old_credential(make_sessiond, echo_backend: Backend) -> None:
    """EXPIRED applies to new sessions only: a live session outlasts its credential's lifetime."""
    a = await make_sessiond("a", credential_lifetime_seconds=1)
    entry, _ = await a.put_service("svc", echo_backend.address)
    c = SessionClient("127.0.0.1", entry.port, issue("svc"))
    await c.open()
    await c.detach()
    await asyncio.sleep(2.1)
    assert (await c.open()).resumed


async def test_backend_down_refused_and_max_sessions(make_sessiond, echo_backend: Backend) -> None:
    a = await make_sessiond("a", max_sessions=2)
    dead, _ = await a.put_service("dead", "127.0.0.1:1")
    with pytest.raises(SessionRefused) as err:
        await SessionClient("127.0.0.1", dead.port, issue("dead")).open()
    assert err.value.status == Status.BACKEND_UNAVAILABLE
    entry, _ = await a.put_service("svc", echo_backend.address)
    clients = [SessionClient("127.0.0.1", entry.port, issue("svc")) for _ in range(3)]
    await clients[0].open()
    await clients[1].open()
    with pytest.raises(SessionRefused) as err:
        await clients[2].open()
    assert err.value.status == Status.TOO_MANY_SESSIONS
    await clients[1].end()
    assert (await clients[2].open()).ok

"""The controller API under a flood of idle and slow connections, and hostile bodies (real processes).

Reproduces the findings: about 8,300 idle TCP connections without a token took /v1/health and the
whole API down and wrote a traceback per failed accept; nested JSON of depth 20,000 answered 500;
``limits: []`` was accepted. Bounded here: 1,200 idle connections, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path

import pytest
from support.controller import Stack, demo_body

pytestmark = [pytest.mark.podman, pytest.mark.slow]

LIMITS = ("max_connections = 300\nmax_pending_connections = 100\nmax_pending_per_source = 50\n"
          "header_timeout_seconds = 2\nkeepalive_timeout_seconds = 60\n")


@pytest.fixture
async def guarded(tmp_path: Path, podman_socket: str, demo_image: str, cloudlet_name: str):  # type: ignore[no-untyped-def]
    s = Stack(tmp_path, cloudlet_name, podman_socket, controller_extra=LIMITS)
    try:
        await s.start_sessiond()
        await s.start_controller()
        yield s
    finally:
        await s.close()


def _hostport(stack: Stack) -> tuple[str, int]:
    host, port = stack.controller_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _raw(stack: Stack, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(*_hostport(stack))
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


async def test_idle_flood_leaves_the_api_working(guarded: Stack) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    flood = []
    try:
        for _ in range(1200):  # idle: no request ever
            _, w = await asyncio.open_connection(*_hostport(guarded))
            flood.append(w)
        for _ in range(20):
            started = time.monotonic()
            status, body = await guarded.api("GET", "/v1/services")
            assert status == 200 and body == {"services": []}
            assert time.monotonic() - started < 1.0
        status, health = await guarded.api("GET", "/v1/health", token=None)
        assert status == 200 and health["status"] == "ok"  # type: ignore[index]
        await asyncio.sleep(0.3)  # a burst's excess over the pending bounds goes once it is 50 ms old
        status, metrics = await guarded.api("GET", "/metrics", token=None)
        samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in str(metrics).splitlines()
                   if line.startswith("cloudlet_connection")}
        evicted = sum(v for k, v in samples.items() if "evicted" in k)
        assert evicted >= 1100, samples
        assert samples['cloudlet_connections_pending{listener="api"}'] <= 50, samples
        log = (guarded.dir / "controller.log").read_text()
        assert "Traceback" not in log and "out of system resource" not in log
        assert 1 <= log.count("connection flood") <= 4
    finally:
        for w in flood:
            w.close()


async def test_beyond_max_connections_a_clear_503(guarded: Stack) -> None:
    held = []
    try:
        for _ in range(300):  # established: each made a request and keeps the connection alive
            reader, writer, head = await _raw(guarded, b"GET /v1/health HTTP/1.1\r\nHost: c\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            held.append(writer)
        reader, writer, head = await _raw(guarded, b"GET /v1/health HTTP/1.1\r\nHost: c\r\n\r\n")
        body = json.loads(await asyncio.wait_for(reader.read(), 10))
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert body["error"]["code"] == "overloaded" and "too many connections" in body["error"]["message"]
        writer.close()
        for w in held[:10]:  # room again: served
            w.close()
        await asyncio.sleep(0.3)
        status, _ = await guarded.api("GET", "/v1/services")
        assert status == 200
    finally:
        for w in held:
            w.close()


async def test_slow_request_head_is_cut_off(guarded: Stack) -> None:
    reader, writer = await asyncio.open_connection(*_hostport(guarded))
    writer.write(b"GET /v1/health HTTP/1.1\r\n")  # ...and the rest never comes
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)
    assert data == b"" and 1.5 < time.monotonic() - started < 6  # closed after header_timeout_seconds = 2
    writer.close()


async def test_hostile_bodies_are_clear_400s(stack: Stack, demo_image: str) -> None:
    deep = b"[" * 20000 + b"]" * 20000
    status, err = await stack.api("PUT", "/v1/services/deep", raw=deep)
    assert status == 400 and "nested deeper than 32" in err["error"]["message"]  # type: ignore[index]
    deep33 = json.dumps({"image": demo_image, "port": 7000, "env": {"A": "b"},
                         "limits": json.loads("[" * 33 + "]" * 33)}).encode()
    status, err = await stack.api("PUT", "/v1/services/deep", raw=deep33)
    assert status == 400 and "nested deeper" in err["error"]["message"]  # type: ignore[index]
    for field, value in (("limits", []), ("limits", ""), ("env", []), ("env", 0)):
        status, err = await stack.api("PUT", "/v1/services/bad", demo_body(demo_image, **{field: value}))
        assert status == 400 and field in err["error"]["message"], (field, value, err)  # type: ignore[index]
    status, listed = await stack.api("GET", "/v1/services")
    assert status == 200 and listed["services"] == []  # type: ignore[index]
    log = (stack.dir / "controller.log").read_text()
    assert "Traceback" not in log and "RecursionError" not in log

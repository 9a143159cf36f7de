"""A flood of connections that never send a session header, against a real sessiond process.

Reproduces the finding: thousands of header-less connections held open used to exhaust sessiond's
descriptors for the header timeout, and legitimate sessions on the same port were reset. Now the
header-less ("pending") connections are bounded, the oldest evicted first: legitimate sessions
opened during the flood attach, an established session keeps streaming, the flood is counted in
metrics and logged a few times, not once per connection. Bounded: 1,500 sockets, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time
import urllib.request

import pytest
from cloudlet.client import SessionClient
from support.sessiond import Backend, api, issue, start_sessiond_process

pytestmark = pytest.mark.slow

FLOOD = 1500
LIMITS = {"max_pending_connections": 300, "max_pending_per_source": 150, "header_timeout_seconds": 30}


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        pytest.skip(f"the flood needs {want} descriptors in the test process; the hard limit is {hard}")


async def _metrics(sp) -> str:  # type: ignore[no-untyped-def]
    _, health = await api(sp.control_socket, "GET", "/v1/health")
    url = "http://%s/metrics" % health["metrics_listen"]
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


async def test_header_less_flood_leaves_legitimate_sessions_working(tmp_path, secret_file, echo_backend: Backend) -> None:
    _raise_nofile(FLOOD + 500)
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a", **LIMITS)
    flood: list[asyncio.StreamWriter] = []
    try:
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo",
                                {"backend": echo_backend.address, "listen": "127.0.0.1"})
        assert status == 200
        port = svc["port"]
        # an established session, streaming through the flood
        steady = SessionClient("127.0.0.1", port, issue("echo"))
        await steady.open()
        stop = asyncio.Event()
        echoed = 0

        async def stream() -> None:
            nonlocal echoed
            while not stop.is_set():
                await steady.send(b"x" * 1000)
                got = 0
                while got < 1000:
                    data = await asyncio.wait_for(steady.recv(), 5)
                    assert data
                    got += len(data)
                echoed += got
                await asyncio.sleep(0.005)

        streamer = asyncio.create_task(stream())
        for _ in range(FLOOD):  # hold the connections open: no header, no FIN
            _, w = await asyncio.open_connection("127.0.0.1", port)
            flood.append(w)
        # new legitimate sessions, one by one, while the flood is held
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            c = SessionClient("127.0.0.1", port, issue("echo"), timeout=5)
            await c.open()
            await c.send(b"ping")
            assert await asyncio.wait_for(c.recv_exactly(4), 5) == b"ping"
            latencies.append(time.monotonic() - started)
            await c.close()
        before = echoed
        await asyncio.sleep(0.3)
        assert echoed > before, "the established session stalled during the flood"
        stop.set()
        await streamer
        assert max(latencies) < 2.0, latencies
        text = await _metrics(sp)
        evicted = (_sample(text, "cloudlet_connection_limit_total", listener="service", reason="evicted_source")
                   + _sample(text, "cloudlet_connection_limit_total", listener="service", reason="evicted_total"))
        assert evicted >= FLOOD - LIMITS["max_pending_per_source"], text[-2000:]
        assert _sample(text, "cloudlet_connections_pending", listener="service") <= LIMITS["max_pending_per_source"]
        # logged, but not once per connection
        flood_lines = [json.loads(x) for x in sp.log().splitlines() if "connection flood" in x]
        assert 1 <= len(flood_lines) <= 4, len(flood_lines)
        assert flood_lines[0]["level"] == "warning" and flood_lines[0]["max_pending"] == LIMITS["max_pending_connections"]
        await steady.close()
    finally:
        for w in flood:
            w.close()
        sp.stop()


async def test_flood_beyond_the_descriptor_limit_with_the_default_bounds(tmp_path, secret_file,
                                                                         echo_backend: Backend) -> None:
    """sessiond with 1,024 descriptors (a unit's LimitNOFILE) and no limits configured: 1,500
    header-less connections would exhaust it; the bounds derived from the limit keep it serving."""
    _raise_nofile(FLOOD + 500)
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a", nofile=1024)
    flood: list[asyncio.StreamWriter] = []
    try:
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo",
                                {"backend": echo_backend.address, "listen": "127.0.0.1"})
        assert status == 200
        for _ in range(FLOOD):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", svc["port"])
            except OSError:  # the listen backlog is full for a moment: the flood goes on
                continue
            flood.append(w)
        for _ in range(10):
            c = SessionClient("127.0.0.1", svc["port"], issue("echo"), timeout=5)
            await c.open()
            await c.send(b"ping")
            assert await asyncio.wait_for(c.recv_exactly(4), 5) == b"ping"
            await c.close()
        status, _ = await api(sp.control_socket, "GET", "/v1/health")  # the control API still answers
        assert status == 200
        assert "Too many open files" not in sp.log() and "Traceback" not in sp.log()
    finally:
        for w in flood:
            w.close()
        sp.stop()


async def test_refusals_are_logged_once_per_interval_with_a_count(tmp_path, secret_file, echo_backend: Backend) -> None:
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    try:
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo",
                                {"backend": echo_backend.address, "listen": "127.0.0.1"})
        assert status == 200
        for _ in range(200):  # forged credentials: each refused with BAD_CREDENTIAL
            c = SessionClient("127.0.0.1", svc["port"], issue("echo")[:-4] + "AAAA", timeout=5)
            with pytest.raises(Exception, match="BAD_CREDENTIAL"):
                await c.open()
        text = await _metrics(sp)
        assert _sample(text, "cloudlet_refusals_total", code="BAD_CREDENTIAL") == 200
        lines = [json.loads(x) for x in sp.log().splitlines() if '"connection refused"' in x]
        assert len(lines) == 1 and lines[0]["code"] == "BAD_CREDENTIAL", len(lines)
    finally:
        sp.stop()

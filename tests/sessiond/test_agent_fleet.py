"""The agent with a session per connection: many connections, moves by itself, heals broken paths.

Real sessiond daemons (in process, or subprocesses where one is killed), real sockets, the real
``redis-server`` and ``redis-benchmark``; link delays from the latency proxy of the bench harness.
Sessions come from :class:`SecretIssuer` (the fleet secret, as a controller issues them); the
controller's own path to the agent is in tests/controller/test_agent_profile.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloudlet.client import SessionRefused, attach, end_session
from cloudlet.client.nearness import NearnessConfig
from cloudlet.protocol.wire import Status
from cloudlet.relay.devices import DeviceState
from cloudlet.sessiond.peers import make_connector
from cloudlet_bench.harness.latency import LatencyProxy
from support.agent import Stream, agent_for
from support.sessiond import Backend, fleet, peer_addr, start_sessiond_process, wait_for

@pytest.fixture
async def echo() -> AsyncIterator[Backend]:
    b = await Backend(echo=True).start()
    yield b
    await b.stop()


async def test_each_connection_is_its_own_session_and_all_move_together(make_sessiond, echo: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, echo)
    agent, issuer = agent_for(ports)
    await agent.start()
    try:
        conns = [await asyncio.open_connection(*agent.address) for _ in range(5)]
        for i, (r, w) in enumerate(conns):
            w.write(b"hello %d\n" % i)
            assert await asyncio.wait_for(r.readline(), 10) == b"hello %d\n" % i
        assert issuer.issued == 5 + len(agent._spares)  # one session each (and a spare kept ready)
        assert len(daemons["a"].manager.list_sessions()) == 5 and len(echo.conns) == 5
        for to in ("b", "c", "a"):
            moved = await agent.switch(to)
            assert moved["moved"] == 5 and moved["failed"] == 0
            if to != "a":
                await wait_for(lambda to=to: len(daemons[to].manager.list_sessions()) == 5, what=f"{to} forwards all five")
            for i, (r, w) in enumerate(conns):
                w.write(b"at %s %d\n" % (to.encode(), i))
                assert await asyncio.wait_for(r.readline(), 10) == b"at %s %d\n" % (to.encode(), i)
        assert len(echo.conns) == 5  # nothing reconnected to the backend
        conns[0][1].close()  # the program closes one connection: its session ends, the others stay
        await wait_for(lambda: len(daemons["a"].manager.list_sessions()) == 4, what="the closed one's session ended")
        assert agent.status()["connections"] == 4
    finally:
        await agent.stop()


@pytest.mark.skipif(not shutil.which("redis-benchmark") or not shutil.which("redis-server"),
                    reason="redis-server/redis-benchmark not installed (Debian packages redis-server, redis-tools)")
async def test_redis_benchmark_runs_through_the_agent_while_it_moves(make_sessiond, tmp_path: Path) -> None:
    """An unmodified multi-connection client: every INCR of redis-benchmark counted exactly once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rport = s.getsockname()[1]
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        daemons = {n: await make_sessiond(n) for n in ("a", "b", "c")}
        for n, d in daemons.items():
            d.manager.connector = make_connector({o: {"transport": "tcp", "address": peer_addr(od)}
                                                  for o, od in daemons.items() if o != n}, 2.0)
        ports = {n: (await d.put_service("redis", f"127.0.0.1:{rport}"))[0].port for n, d in daemons.items()}
        agent, _ = agent_for(ports, service="redis")
        await agent.start()
        requests = 30_000
        bench = await asyncio.create_subprocess_exec(
            "redis-benchmark", "-h", "127.0.0.1", "-p", str(agent.address[1]), "-c", "16", "-n", str(requests),
            "-t", "incr", "-q", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        moves = 0
        route = [("b", True), ("c", False), ("a", True), ("b", False), ("a", False)]
        running = asyncio.ensure_future(bench.communicate())
        while not running.done() and moves < 40:
            await asyncio.sleep(0.15)
            to, fin = route[moves % len(route)]
            if agent.carriers:
                await agent.switch(to, fin)
                moves += 1
        out, _ = await asyncio.wait_for(running, 120)
        text = out.decode(errors="replace")
        assert bench.returncode == 0, text
        assert "error" not in text.lower(), text
        assert moves >= 3, f"the benchmark ended before the agent moved ({moves} moves): {text}"
        check = subprocess.run(["redis-cli", "-p", str(rport), "GET", "counter:__rand_int__"],
                               capture_output=True, text=True, timeout=10)
        assert check.stdout.strip() == str(requests), "an INCR was lost or executed twice"
        await agent.stop()
    finally:
        redis.terminate()
        redis.wait(10)


async def _proxied(ports: dict[str, int], delays: dict[str, float]) -> dict[str, LatencyProxy]:
    return {n: await LatencyProxy(("127.0.0.1", p), delay=delays[n]).start() for n, p in ports.items()}


FAST = NearnessConfig(interval_seconds=0.1, timeout_seconds=0.5, window=3, down_after=2, margin_ms=2.0,
                      margin_ratio=0.2, hold_seconds=0.3, min_dwell_seconds=0.5)


async def test_it_moves_to_the_nearer_cloudlet_by_itself_and_loses_nothing(make_sessiond, echo: Backend,
                                                                           caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="cloudlet")
    daemons, ports = await fleet(make_sessiond, echo, ("a", "b"))
    proxies = await _proxied(ports, {"a": 0.002, "b": 0.015})
    agent, _ = agent_for({n: p.address[1] for n, p in proxies.items()}, at="b", nearness=FAST)
    await agent.start()

    def logs() -> str:
        return "\n".join(str((int(r.relativeCreated), r.getMessage(), getattr(r, "fields", "")))
                         for r in caplog.records if r.name.startswith("cloudlet"))

    try:
        await wait_for(lambda: agent.switches == 1, timeout=5, what="a move to the nearer a")
        assert agent.current == "a" and agent.last_switch["reason"] == "nearer"
        r, w = await asyncio.open_connection(*agent.address)
        stream = Stream(r, w, total=60_000)
        producer = asyncio.create_task(stream.produce(0.005))
        await asyncio.sleep(0.3)
        changed = time.monotonic()
        proxies["a"].delay, proxies["b"].delay = 0.015, 0.002  # the device drives on: b is near now
        await wait_for(lambda: agent.switches == 2, timeout=5, what="a move to b")
        took = time.monotonic() - changed
        assert took < 2.0, f"switched {took:.2f} s after the change"
        assert agent.last_switch["to"] == "b" and agent.last_switch["reason"] == "nearer"
        assert agent.last_switch["fin"] is True and agent.last_switch["moved"] == 1
        assert not producer.done(), "the move should happen while the program streams"
        await producer
        await stream.consume()
        stream.check()
        assert len(echo.conns) == 1 and agent.heals == 0, logs()
        status = agent.status()
        assert status["nearness"]["b"]["rtt_ms"] < status["nearness"]["a"]["rtt_ms"]
        metrics = agent.metrics()
        assert 'cloudlet_agent_current{cloudlet="b"} 1' in metrics and 'cloudlet_agent_rtt_seconds{cloudlet="a"}' in metrics
        await asyncio.sleep(1.5)  # steady: no flapping
        assert agent.switches == 2, logs()
    finally:
        await agent.stop()
        for p in proxies.values():
            await p.close()


async def test_a_cloudlet_that_stops_answering_is_left_without_fin_and_nothing_is_lost(make_sessiond,
                                                                                        echo: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, echo, ("a", "b"))
    proxies = await _proxied(ports, {"a": 0.001, "b": 0.004})
    agent, _ = agent_for({n: p.address[1] for n, p in proxies.items()}, at="a", nearness=FAST)
    await agent.start()
    try:
        r, w = await asyncio.open_connection(*agent.address)
        stream = Stream(r, w)
        producer = asyncio.create_task(stream.produce(0.002))
        await asyncio.sleep(0.4)
        proxies["a"].cut()  # the radio link to a is gone: nothing passes, nobody is told
        await wait_for(lambda: agent.last_switch.get("to") == "b", timeout=5, what="a move away from the silent a")
        assert agent.last_switch == {**agent.last_switch, "reason": "current_down", "fin": False, "moved": 1}
        await producer
        await stream.consume()
        stream.check()
        assert len(echo.conns) == 1
    finally:
        await agent.stop()
        for p in proxies.values():
            p.restore()
            await p.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "restart"])
async def test_the_forwarders_sessiond_dies_and_the_programs_connection_stays(tmp_path: Path, secret_file: Path,
                                                                              echo: Backend, how: int) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    b = await start_sessiond_process(tmp_path / "b", secret_file, "b", peers={"a": a.peer_listen})
    try:
        ports = {d.name: await d.put_service("svc", echo.address) for d in (a, b)}
        agent, _ = agent_for(ports, at="a")  # the session is anchored at a; b will forward to it
        await agent.start()
        r, w = await asyncio.open_connection(*agent.address)
        await wait_for(lambda: bool(agent.carriers), what="the session")
        await agent.switch("b")
        stream = Stream(r, w, total=60_000)
        producer = asyncio.create_task(stream.produce(0.002))
        await asyncio.sleep(0.3)
        os.kill(b.proc.pid, how)
        await producer
        await stream.consume()
        stream.check()
        assert agent.heals == 1 and agent.status()["connections"] == 1
        assert next(iter(agent.carriers)).cloudlet == "a"
        assert len(echo.conns) == 1  # the anchor kept the one backend connection
    finally:
        await agent.stop()
        b.stop()
        a.stop()


async def test_the_tunnels_sshd_killed_mid_stream(tmp_path: Path, secret_file: Path, echo: Backend) -> None:
    from cloudlet_bench.harness.sshd import TunnelSshd, sshd_argv_available

    if os.geteuid() != 0 or sshd_argv_available():
        pytest.skip("needs root and openssh-server for a private sshd: " + "; ".join(sshd_argv_available()))
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    sshd = TunnelSshd(endpoint=a.peer_listen)
    sshd.start()
    b = await start_sessiond_process(tmp_path / "b", secret_file, "b", peers={"a": sshd.peer_table("a")})
    try:
        await b.wait_peers_up()
        ports = {d.name: await d.put_service("svc", echo.address) for d in (a, b)}
        agent, _ = agent_for(ports)
        await agent.start()
        r, w = await asyncio.open_connection(*agent.address)
        await wait_for(lambda: bool(agent.carriers), what="the session")
        await agent.switch("b")
        stream = Stream(r, w, total=60_000)
        producer = asyncio.create_task(stream.produce(0.002))
        await asyncio.sleep(0.3)
        sshd.kill()  # every tunnel to a breaks: b resets what it forwarded
        await producer
        await stream.consume()
        stream.check()
        assert agent.heals >= 1 and len(echo.conns) == 1
    finally:
        await agent.stop()
        b.stop()
        sshd.stop()
        sshd.cleanup()
        a.stop()


async def test_only_the_end_of_the_session_closes_the_program_and_the_next_connection_gets_a_new_one(
        make_sessiond, echo: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, echo, ("a", "b"))
    agent, issuer = agent_for(ports)
    await agent.start()
    try:
        r, w = await asyncio.open_connection(*agent.address)
        w.write(b"x\n")
        assert await asyncio.wait_for(r.readline(), 10) == b"x\n"
        carrier = next(iter(agent.carriers))
        await agent.switch("b")
        await end_session("127.0.0.1", ports["b"], carrier.client.credential, "a")  # ended at the anchor
        assert await asyncio.wait_for(r.read(), 10) == b""  # the program's connection closes: EOF
        with pytest.raises(SessionRefused) as refused:
            await attach("127.0.0.1", ports["a"], carrier.client.credential)
        assert refused.value.status == Status.SESSION_ENDED
        r2, w2 = await asyncio.open_connection(*agent.address)  # a reconnect: just another session
        w2.write(b"y\n")
        assert await asyncio.wait_for(r2.readline(), 10) == b"y\n"
        assert next(iter(agent.carriers)).client.credential != carrier.client.credential
        w2.close()
    finally:
        await agent.stop()


async def test_device_limits_are_enforced_and_logged(make_sessiond, echo: Backend, caplog) -> None:
    a = await make_sessiond("a", max_sessions_per_device=2)
    a.manager.devices.put(DeviceState("phone-1", int(time.time()) + 3600))
    entry, _ = await a.put_service("svc", echo.address)
    agent, _ = agent_for({"a": entry.port}, device="phone-1", max_connections=3)
    await agent.start()
    caplog.set_level(logging.INFO)
    try:
        conns = [await asyncio.open_connection(*agent.address) for _ in range(4)]
        alive = []
        for r, w in conns:
            w.write(b"ping\n")
            try:
                line = await asyncio.wait_for(r.readline(), 10)
            except ConnectionError:
                line = b""
            alive.append(line == b"ping\n")
        assert alive.count(True) == 2  # sessiond: two sessions for this device; the agent: three connections
        assert agent.connections_refused == 2
        lines = [f"{rec.getMessage()} {getattr(rec, 'fields', '')}" for rec in caplog.records]
        assert any("device session limit reached" in line and "phone-1" in line for line in lines), lines
        assert any("local connection refused" in line and "connection limit (3" in line for line in lines), lines
    finally:
        await agent.stop()


async def test_spare_credentials_are_renewed_and_a_live_session_outlives_its_credential(
        make_sessiond, echo: Backend) -> None:
    daemons, ports = await fleet(make_sessiond, echo, ("a", "b"))
    for d in daemons.values():
        d.manager.credential_lifetime = 2.0  # a credential may start a session for 2 s only
    agent, issuer = agent_for(ports, nearness=NearnessConfig(policy="pinned", interval_seconds=0.1),
                              credential_max_age=0.3)
    await agent.start()
    try:
        r, w = await asyncio.open_connection(*agent.address)
        w.write(b"a\n")
        assert await asyncio.wait_for(r.readline(), 10) == b"a\n"
        await asyncio.sleep(3.1)  # the session's credential is too old to start a session now
        await agent.switch("b", fin=False)  # ... but the live session moves on with it
        w.write(b"b\n")
        assert await asyncio.wait_for(r.readline(), 10) == b"b\n"
        assert agent.credentials_renewed >= 2  # the spare was renewed before it aged out
        r2, w2 = await asyncio.open_connection(*agent.address)  # and the next connection starts at once
        w2.write(b"c\n")
        assert await asyncio.wait_for(r2.readline(), 10) == b"c\n"
    finally:
        await agent.stop()


async def test_an_http_client_pool_keeps_its_connections_across_moves(make_sessiond) -> None:
    """aiohttp's client (keep-alive, a pool of 6) against an HTTP server behind the agent, moving."""
    import aiohttp
    from aiohttp import web

    peers: set[tuple[str, int]] = set()

    async def hello(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername")[:2])  # type: ignore[union-attr]
        return web.Response(text=f"n={request.query['n']}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    daemons = {n: await make_sessiond(n) for n in ("a", "b")}
    daemons["b"].manager.connector = make_connector({"a": {"transport": "tcp", "address": peer_addr(daemons["a"])}})
    ports = {n: (await d.put_service("web", f"127.0.0.1:{http_port}"))[0].port for n, d in daemons.items()}
    agent, issuer = agent_for(ports, service="web")
    await agent.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=6)) as http:
            async def get(n: int) -> str:
                async with http.get(f"http://127.0.0.1:{agent.address[1]}/?n={n}") as resp:
                    assert resp.status == 200
                    return await resp.text()

            async def mover() -> int:
                moves = 0
                for to, fin in [("b", True), ("a", False), ("b", False), ("a", True)] * 3:
                    await asyncio.sleep(0.05)
                    await agent.switch(to, fin)
                    moves += 1
                return moves

            moving = asyncio.create_task(mover())
            bodies = []
            for start in range(0, 600, 60):
                bodies += await asyncio.gather(*(get(n) for n in range(start, start + 60)))
                await asyncio.sleep(0.02)
            assert await moving == 12
        assert bodies == [f"n={n}" for n in range(600)]
        assert len(peers) <= 6  # the pool's keep-alive connections were never re-opened by a move
        assert issuer.issued - len(agent._spares) == len(peers)
    finally:
        await agent.stop()
        await runner.cleanup()

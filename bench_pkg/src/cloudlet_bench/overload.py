"""`cloudlet bench overload`: legitimate clients through a flood of idle and slow connections.

A private controller (with its podman API service and sessiond) for the API, and a sessiond of its
own for the sessions (an echo backend in this process, service ``echo``; the controller would
unregister a service it did not launch). Two phases, in one run:

1. **baseline**: ``--legit`` session opens (connect, header, reply, 1 KiB echoed, END) and as many
   API calls (``GET /v1/services`` with the token) with no flood;
2. **flood**: ``--hostile`` connections held against the session port and the controller API,
   half each: most send nothing, ``--slow`` of them drip a header (or an HTTP request head) one
   byte every 0.5 s. The attacker (a process of its own, as an attacker is not the client) reopens
   every connection the daemons reset, so the flood stays at its size; the same legitimate
   workload runs again meanwhile.

Reported: the flood's size, legitimate attempts and failures, their latency p50/p99 against the
baseline's, the daemons' peak RSS, and what the daemons' admission did (evictions, refusals).
Loopback only; everything it starts is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from cloudlet.client import SessionClient
from cloudlet_bench.harness.sessiond import Fleet, control, rss_kib
from cloudlet_bench.launch import BenchCloudlet

TARGETS = {"legit_failures": 0, "api_latency_ms_p99": 1000.0}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Flood:
    """``size`` connections held open against ``targets`` (host, port); reopened when reset."""

    def __init__(self, targets: list[tuple[str, int, bytes]], size: int, slow: float) -> None:
        self.targets = targets
        self.size = size
        self.slow = slow
        self.held = 0
        self.peak = 0
        self.opened = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    async def start(self, ramp: float = 3.0) -> None:
        per = max(1, self.size // 50)
        for i in range(self.size):
            host, port, drip = self.targets[i % len(self.targets)]
            slow = (i % 100) < self.slow * 100
            self.tasks.append(asyncio.create_task(self._hold(host, port, drip if slow else b"")))
            if i % per == per - 1:
                await asyncio.sleep(ramp / 50)

    async def _hold(self, host: str, port: int, drip: bytes) -> None:
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self.opened += 1
            self.held += 1
            self.peak = max(self.peak, self.held)
            try:
                i = 0
                while not self.stopping:
                    if drip:
                        writer.write(drip[i % len(drip): i % len(drip) + 1])
                        i += 1
                    try:
                        if await asyncio.wait_for(reader.read(4096), 0.5) == b"":
                            break  # closed by the daemon
                    except asyncio.TimeoutError:
                        continue
            except (ConnectionError, OSError):
                pass  # reset by the daemon (evicted): open another
            finally:
                self.held -= 1
                writer.close()
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _flood_process(targets: list[tuple[str, int, bytes]], size: int, slow: float, conn: Any) -> None:
    """The attacker, in a process of its own: start, report when held, stop on request, report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, size + 512), hard))

    async def main() -> None:
        flood = Flood(targets, size, slow)
        await flood.start()
        await asyncio.sleep(1.0)
        conn.send({"held": flood.held, "peak": flood.peak})
        while not await asyncio.to_thread(conn.poll, 0.2):
            pass
        conn.recv()
        peak, opened = flood.peak, flood.opened
        await flood.stop()
        conn.send({"peak": peak, "opened": opened})

    asyncio.run(main())


async def _echo_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _legit(cl: BenchCloudlet, fleet: Fleet, port: int, count: int, concurrency: int = 4) -> dict[str, Any]:
    """``count`` session opens and ``count`` API calls, ``concurrency`` at a time; latencies and failures."""
    session_ms: list[float] = []
    api_ms: list[float] = []
    failures: list[str] = []
    payload = b"l" * 1024
    sem = asyncio.Semaphore(concurrency)

    async def one_session() -> None:
        async with sem:
            started = time.perf_counter()
            try:
                c = SessionClient("127.0.0.1", port, fleet.credential("echo", "overload"), timeout=10)
                await c.open()
                await c.send(payload)
                if await asyncio.wait_for(c.recv_exactly(len(payload)), 10) != payload:
                    raise RuntimeError("echo mismatch")
                session_ms.append((time.perf_counter() - started) * 1000)
                await c.end()
            except Exception as exc:  # every kind of failure is what the benchmark counts
                failures.append(f"session: {type(exc).__name__}: {exc}")

    async def one_api() -> None:
        async with sem:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(cl.api("GET", "/v1/services"), 10)
                api_ms.append((time.perf_counter() - started) * 1000)
            except Exception as exc:
                failures.append(f"api: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(one_session() for _ in range(count)), *(one_api() for _ in range(count)))
    return {"session_ms": session_ms, "api_ms": api_ms, "failures": failures, "attempts": 2 * count}


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total = max(total, rss_kib(pid))
        except (OSError, RuntimeError):
            pass
    return round(total / 1024, 1)


async def _metric_sum(cl: BenchCloudlet, sock: str, name: str) -> float:
    total = 0.0
    for text in (await _controller_metrics(cl), await _sessiond_metrics(sock)):
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def _controller_metrics(cl: BenchCloudlet) -> str:
    async with aiohttp.ClientSession() as http, http.get(cl.url + "/metrics") as resp:
        return await resp.text()


async def _sessiond_metrics(sock: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:
        async with http.get("http://sessiond/metrics") as resp:
            return await resp.text()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[bench overload] {msg}", file=sys.stderr, flush=True)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.hostile + 512:
        raise SystemExit(f"--hostile {args.hostile} needs {args.hostile + 512} descriptors; the hard limit is {hard}")
    workdir = Path(tempfile.mkdtemp(prefix="cloudlet-bench-overload-"))
    unbounded: dict[str, Any] = {"max_connections": 1_000_000, "max_pending_connections": 1_000_000,
                 "max_pending_per_source": 1_000_000} if args.unbounded else {}
    cl = BenchCloudlet(workdir, args.podman_socket, controller_options=dict(unbounded), nofile=args.daemon_nofile)
    fleet = Fleet()
    echo = await _echo_server()
    attacker: multiprocessing.process.BaseProcess | None = None
    try:
        say("starting podman API service, sessiond and controller, and the sessions' sessiond")
        await cl.start()
        sd = await fleet.start("overload", None, "auto", nofile=args.daemon_nofile, **unbounded)
        sock = sd.control_socket
        status, svc = await control(sock, "PUT", "/v1/services/echo",
                                    {"backend": "127.0.0.1:%d" % echo.sockets[0].getsockname()[1], "listen": "127.0.0.1"})
        if status != 200:
            raise RuntimeError(f"cannot register the echo service: {svc}")
        port = int(svc["port"])
        say(f"baseline: {args.legit} sessions and {args.legit} API calls, no flood")
        base = await _legit(cl, fleet, port, args.legit)
        api_host, api_port = cl.url.removeprefix("http://").rsplit(":", 1)
        targets = [("127.0.0.1", port, b"CLSH\x01\x00\x01\x00\x00\x50\x00\x00" + b"v" * 80),
                   (api_host, int(api_port), b"GET /v1/services HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200)]
        say(f"flood: {args.hostile} idle and slow connections ({args.slow:.0%} slow), reopened when reset, "
            "from a process of its own")
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        attacker = ctx.Process(target=_flood_process, args=(targets, args.hostile, args.slow, theirs), daemon=True)
        attacker.start()
        if not await asyncio.to_thread(ours.poll, 120):
            raise RuntimeError("the flood did not start")
        held = ours.recv()
        pids = [sd.proc.pid] + [p.pid for p in cl.procs if "controller" in str(p.args) and p.poll() is None]
        rss: list[float] = []
        sampler_stop = asyncio.Event()

        async def sample() -> None:
            while not sampler_stop.is_set():
                rss.append(_rss_mib(pids))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        say(f"flood held at {held['held']} (peak {held['peak']}); the same workload again")
        under = await _legit(cl, fleet, port, args.legit)
        sampler_stop.set()
        await sampler
        ours.send("stop")
        if not await asyncio.to_thread(ours.poll, 60):
            raise RuntimeError("the flood did not stop")
        done = ours.recv()
        await asyncio.to_thread(attacker.join, 30)
        attacker = None
        held_peak, reopened = done["peak"], done["opened"] - args.hostile
        evicted = await _metric_sum(cl, sock, "cloudlet_connection_limit_total")
        result = {
            "hostile_connections": args.hostile,
            "hostile_held_peak": held_peak,
            "hostile_reopened": max(0, reopened),
            "slow_fraction": args.slow,
            "unbounded": args.unbounded,
            "daemon_nofile": args.daemon_nofile,
            "legit_attempts": under["attempts"],
            "legit_failures": len(under["failures"]),
            "legit_failure_samples": under["failures"][:5],
            "legit_latency_ms_p50": round(_pct(under["session_ms"], 50), 2),
            "legit_latency_ms_p99": round(_pct(under["session_ms"], 99), 2),
            "baseline_latency_ms_p50": round(_pct(base["session_ms"], 50), 2),
            "baseline_latency_ms_p99": round(_pct(base["session_ms"], 99), 2),
            "api_latency_ms_p50": round(_pct(under["api_ms"], 50), 2),
            "api_latency_ms_p99": round(_pct(under["api_ms"], 99), 2),
            "baseline_api_latency_ms_p50": round(_pct(base["api_ms"], 50), 2),
            "baseline_api_latency_ms_p99": round(_pct(base["api_ms"], 99), 2),
            "baseline_failures": len(base["failures"]),
            "rss_mib_max": max(rss) if rss else _rss_mib(pids),
            "connections_limited_total": evicted,
            "targets": TARGETS,
        }
        result["targets_met"] = {
            "legit_failures": result["legit_failures"] <= TARGETS["legit_failures"],
            "api_latency_ms_p99": result["api_latency_ms_p99"] < TARGETS["api_latency_ms_p99"],
        }
        return result
    finally:
        if attacker is not None and attacker.is_alive():
            attacker.terminate()
        echo.close()
        if args.keep_logs:
            print(f"[bench overload] logs kept: {fleet.dir} {workdir}", file=sys.stderr)
            for d in fleet.daemons:
                d.stop()
        else:
            fleet.stop()
        await cl.stop()


def _cmd(args: argparse.Namespace) -> int:
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"flood {result['hostile_connections']} (held peak {result['hostile_held_peak']}, "
              f"reopened {result['hostile_reopened']}): {result['legit_failures']} of {result['legit_attempts']} "
              f"legitimate attempts failed; session p99 {result['legit_latency_ms_p99']} ms "
              f"(baseline {result['baseline_latency_ms_p99']}), API p99 {result['api_latency_ms_p99']} ms "
              f"(baseline {result['baseline_api_latency_ms_p99']}); daemons' RSS max {result['rss_mib_max']} MiB")
    return 0 if all(result["targets_met"].values()) else 1


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "overload",
        help="legitimate sessions and API calls through a flood of idle and slow connections",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hostile", type=int, default=10000, help="connections in the flood (default 10000)")
    parser.add_argument("--slow", type=float, default=0.2, help="fraction of them that drip bytes (default 0.2)")
    parser.add_argument("--legit", type=int, default=200,
                        help="legitimate session opens, and as many API calls, per phase (default 200)")
    parser.add_argument("--podman-socket", default=None, help="use this podman API socket instead of a private one")
    parser.add_argument("--daemon-nofile", type=int, default=4096,
                        help="descriptor limit of the daemons (default 4096: below the flood each one sees, as the "
                             "finding's 8,192-descriptor daemons were below its 9,000 connections)")
    parser.add_argument("--unbounded", action="store_true",
                        help="the comparison: admission bounds set to 1,000,000 (as before they existed)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (their paths on stderr)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=_cmd)

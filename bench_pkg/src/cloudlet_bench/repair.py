"""Repair time after a container dies: the event path against the periodic reconcile.

``python -m cloudlet_bench.repair`` (module ``register`` also offers it as a ``cloudlet
bench`` subcommand). For each path it starts its own sessiond and controller (a cloudlet
``clbench-<random>``; the podman API service too, unless ``--podman-socket`` is given), launches the
demo service, then ``--runs`` times: ``podman kill`` its container and measure, from just before
the kill,

- ``running_ms``: until podman reports the container running again (a new ``StartedAt``) and
  sessiond's registration of the service names that container's current address;
- ``serving_ms``: until a new session through the session port gets the service's greeting;
- ``event_seen_ms`` (event path only): until the controller logged the ``died`` event.

Paths: ``event`` (``runtime_events = true``) and ``periodic`` (``runtime_events = false``), both with
``reconcile_interval_seconds = --interval`` (5 s by default, as in production). On the event path
the kills are one interval apart (a second death within one interval of a restart is left to the
interval pass by the crash-loop guard), and ``restarts_by_event`` counts the restarts whose log line
says ``trigger: event``; on the periodic path each kill comes at a random phase of the interval. Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from cloudlet.images import podman_env

from cloudlet_bench.launch import BenchCloudlet

API = "http://podman/v4.0.0/libpod"
POLL_SECONDS = 0.01


class RepairCloudlet(BenchCloudlet):
    """One cloudlet for one path: sessiond and controller processes (as ``bench launch``), and a demo service."""

    def __init__(self, workdir: Path, podman_socket: str, events: bool, interval: float) -> None:
        super().__init__(workdir, podman_socket,
                         {"runtime_events": events, "reconcile_interval_seconds": interval})
        self.podman_socket = podman_socket
        self.events = events
        self.interval = interval


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except (OSError, aiohttp.ClientError):
            pass
        await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


async def _greeting(host: str, port: int, credential: str) -> bool:
    from cloudlet.client import SessionRefused, attach

    try:
        reader, writer, _ = await attach(host, port, credential, timeout=2)
    except (OSError, SessionRefused, asyncio.TimeoutError):
        return False
    try:
        return bool(await asyncio.wait_for(reader.readline(), 2))
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


async def measure_path(cl: RepairCloudlet, image: str, runs: int, log: Any) -> dict[str, list[float]]:
    token = {"Authorization": f"Bearer {cl.token}"}
    container = f"cloudlet-{cl.name}-svc"
    out: dict[str, list[float]] = {"running_ms": [], "serving_ms": [], "event_seen_ms": [], "by_event": []}
    podman = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=cl.podman_socket))
    sessiond = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(cl.dir / "sessiond.sock")))
    api = aiohttp.ClientSession(headers=token, timeout=aiohttp.ClientTimeout(total=60))
    try:
        async with api.put(f"{cl.url}/v1/services/svc", json={"image": image, "port": 7000}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"launch answered {resp.status}: {await resp.text()}")

        async def inspect() -> dict[str, Any]:
            async with podman.get(f"{API}/containers/{container}/json") as resp:
                return dict(await resp.json())

        async def registered_backend() -> str | None:
            async with sessiond.get("http://sessiond/v1/services/svc") as resp:
                return str((await resp.json())["backend"]) if resp.status == 200 else None

        for i in range(runs):
            if cl.events:  # the stream is connected before any kill is measured
                await until(lambda: _health_events(api, cl.url), 30, "the events stream")
            else:  # kill at a random phase of the interval, as a real failure would come
                await asyncio.sleep(random.uniform(0, cl.interval))
            before = (await inspect())["State"]["StartedAt"]
            async with api.post(f"{cl.url}/v1/services/svc/sessions") as resp:
                sess = await resp.json()
            wall0, t0 = time.time(), time.perf_counter()
            kill = await asyncio.create_subprocess_exec("podman", "kill", container, env=podman_env(),
                                                        stdout=asyncio.subprocess.DEVNULL)
            await kill.wait()

            async def repaired(before: str = before) -> bool:
                info = await inspect()
                state = info.get("State") or {}
                if not state.get("Running") or state.get("StartedAt") == before:
                    return False
                nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
                ip = (nets.get(f"cloudlet-{cl.name}") or {}).get("IPAddress")
                return bool(ip) and await registered_backend() == f"{ip}:7000"

            await until(repaired, 60, f"run {i + 1}: container running and registered again")
            out["running_ms"].append((time.perf_counter() - t0) * 1000)
            await until(lambda s=sess: _greeting(s["host"], s["port"], s["session"]), 60,
                        f"run {i + 1}: a session to get the greeting")
            out["serving_ms"].append((time.perf_counter() - t0) * 1000)
            def died_seen(wall0: float = wall0) -> list[float]:
                return [r["ts"] for r in cl.log_records()
                        if r.get("msg") == "runtime event" and r.get("action") == "died" and r["ts"] >= wall0]

            seen = died_seen()
            deadline = time.perf_counter() + 5
            while cl.events and not seen and time.perf_counter() < deadline:  # under load the event may
                await asyncio.sleep(0.05)  # arrive after a periodic pass has already repaired the service
                seen = died_seen()
            if seen:
                out["event_seen_ms"].append((min(seen) - wall0) * 1000)
            log(f"{'event' if cl.events else 'periodic'} run {i + 1}/{runs}: running+registered "
                f"{out['running_ms'][-1]:.0f} ms, serving {out['serving_ms'][-1]:.0f} ms")
            restarts = [r for r in cl.log_records()
                        if r.get("msg") == "stopped container started again" and r["ts"] >= wall0]
            if restarts and restarts[0].get("trigger") == "event":
                out["by_event"].append(1.0)
            # the crash-loop guard leaves a second death within one interval of a restart to the
            # interval pass: the next kill waits until that window has passed
            if cl.events and i + 1 < runs:
                await asyncio.sleep(cl.interval + 0.5)
    finally:
        await podman.close()
        await sessiond.close()
        await api.close()
    return out


async def _health_events(api: aiohttp.ClientSession, url: str) -> bool:
    async with api.get(f"{url}/v1/health") as resp:
        return bool((await resp.json()).get("runtime_events") == "connected")


def _p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


async def run_bench(runs: int, image: str, interval: float, podman_socket: str | None, log: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "repair", "runs": runs, "image": image, "interval_seconds": interval}
    with tempfile.TemporaryDirectory(prefix="cloudlet-bench-repair-") as tmp:
        service: subprocess.Popen[bytes] | None = None
        sock = podman_socket or str(Path(tmp) / "podman.sock")
        if podman_socket is None:
            with open(Path(tmp) / "podman.log", "ab") as out:
                service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                           stdout=out, stderr=subprocess.STDOUT, env=podman_env())
            await until(lambda: asyncio.to_thread(os.path.exists, sock), 30, "podman system service")
        try:
            for path, events in (("event", True), ("periodic", False)):
                workdir = Path(tmp) / path
                workdir.mkdir()
                cl = RepairCloudlet(workdir, sock, events, interval)
                try:
                    await cl.start()
                    figures = await measure_path(cl, image, runs, log)
                finally:
                    await cl.stop()
                result[f"{path}_restarts_by_event"] = len(figures.pop("by_event"))
                for key, values in figures.items():
                    if values:
                        result[f"{path}_{key}_p50"] = _p50(values)
                        result[f"{path}_{key}_max"] = round(max(values), 1)
                        result[f"{path}_{key}"] = [round(v, 1) for v in values]
        finally:
            if service is not None:
                service.terminate()
                try:
                    await asyncio.to_thread(service.wait, 15)
                except subprocess.TimeoutExpired:
                    service.kill()
    return result


def _cmd(args: argparse.Namespace) -> int:
    from cloudlet.images import DEMO_IMAGE, BuildError, build_demo

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"== {msg}", file=sys.stderr, flush=True)

    if not 1 <= args.runs <= 50:
        print("repair bench: --runs must be 1..50", file=sys.stderr)
        return 2
    if not 0.5 <= args.interval <= 60:
        print("repair bench: --interval must be 0.5..60 seconds", file=sys.stderr)
        return 2
    if args.image == DEMO_IMAGE:
        try:
            build_demo(log=lambda msg: None)
        except BuildError as exc:
            print(f"repair bench: {exc}", file=sys.stderr)
            return 1
    try:
        result = asyncio.run(run_bench(args.runs, args.image, args.interval, args.podman_socket, log))
    except (RuntimeError, OSError) as exc:
        print(f"repair bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for path in ("event", "periodic"):
            print(f"{path}: running+registered p50 {result.get(f'{path}_running_ms_p50')} ms "
                  f"(max {result.get(f'{path}_running_ms_max')}), serving p50 "
                  f"{result.get(f'{path}_serving_ms_p50')} ms (max {result.get(f'{path}_serving_ms_max')})")
        print(f"event path: died event seen by the controller p50 {result.get('event_event_seen_ms_p50')} ms; "
              f"restarts by event {result.get('event_restarts_by_event')}/{args.runs}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="kills measured per path (default 5)")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="reconcile_interval_seconds of the periodic path (default 5, as in production)")
    parser.add_argument("--image", default="localhost/cloudlet-demo:latest",
                        help="image of the service; must greet on port 7000 (default: the demo image, built if needed)")
    parser.add_argument("--podman-socket", default=None,
                        help="use this podman API socket instead of starting a private `podman system service`")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=_cmd)


DESCRIPTION = (
    "Kill a service's container repeatedly and measure the time until it runs and is registered with "
    "sessiond again, and until a new session gets the greeting: the event path (runtime_events = true) "
    "against the periodic reconcile alone (runtime_events = false). Starts its own podman API service, "
    "sessiond and controllers, and removes everything it made."
)


def register(subparsers: Any) -> None:
    """Add ``repair`` to ``cloudlet bench`` (for ``cloudlet_bench.BENCHMARKS``)."""
    add_arguments(subparsers.add_parser("repair", help="repair time after a container dies: events vs periodic",
                                        description=DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudlet_bench.repair", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`cloudlet bench launch`: how long until a launched service answers, against plain `podman run`.

Side by side in one run, alternating, on the same image (the demo service, built if needed):

- ``launch``: ``PUT /v1/services/{name}`` on a real controller (podman runtime) with a real sessiond,
  ``POST .../sessions`` for a credential, connect to the session port with the session protocol,
  until the first byte of the service's greeting arrives;
- ``podman_run``: ``podman run -d -p 127.0.0.1:<port>:7000`` (the CLI, as an operator would), then
  connect to the published port until the first byte of the greeting arrives;
- ``podman_api`` (the floor, reported for honesty): libpod REST API create + start on the same
  podman service, then the container's IP until the first byte — no sessiond, no controller.

``ratio`` = launch_ms_p50 / podman_run_ms_p50 (target <= 1.3). Everything the benchmark starts
(podman API service, sessiond, controller, containers, network) is its own and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
from cloudlet.images import podman_env

TARGET_RATIO = 1.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except (OSError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


async def _first_byte(host: str, port: int, timeout: float = 30.0) -> None:
    """Connect until the service answers with its first byte (refused connections are retried)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if await asyncio.wait_for(reader.read(1), 5):
                    return
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} did not answer within {timeout} s")
        await asyncio.sleep(0.005)


class BenchCloudlet:
    """A private cloudlet for the benchmark: podman API service, sessiond, controller."""

    def __init__(self, workdir: Path, podman_socket: str | None, controller_options: dict[str, Any] | None = None,
                 nofile: int | None = None) -> None:
        self.dir = workdir
        self.nofile = nofile  # the daemons' descriptor limit (as a unit's LimitNOFILE= sets it)
        self.controller_options = controller_options or {}  # extra [controller] keys
        self.name = f"clbench-{secrets.token_hex(3)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.podman_socket = podman_socket or str(workdir / "podman.sock")
        self._own_podman = podman_socket is None
        self.token = secrets.token_urlsafe(24)
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    def _spawn(self, args: list[str], log: str, limited: bool = False) -> subprocess.Popen[bytes]:
        nofile = self.nofile if limited else None

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.dir / log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=podman_env(),
                                    preexec_fn=limit if nofile is not None else None)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        d = self.dir
        if self._own_podman:
            self._spawn(["podman", "system", "service", "--time=0", f"unix://{self.podman_socket}"], "podman.log")
            await _until(self._podman_up, 30, "podman system service")
        (d / "secret").write_text(secrets.token_hex(32))
        (d / "token").write_text(self.token)
        (d / "sessiond.toml").write_text(
            f'[sessiond]\ncloudlet = "{self.name}"\nsecret_file = "{d / "secret"}"\n'
            f'control_socket = "{d / "sessiond.sock"}"\nstate_dir = "{d / "state"}"\n'
            'peer_listen = "127.0.0.1:0"\nmetrics_listen = ""\n'
        )
        base = 20000 + secrets.randbelow(200) * 50
        (d / "controller.toml").write_text(
            f'[controller]\ncloudlet = "{self.name}"\nlisten = "127.0.0.1:0"\nlocal_listen = ""\n'
            f'state_dir = "{d / "controller-state"}"\ntoken_file = "{d / "token"}"\n'
            f'secret_file = "{d / "secret"}"\nsessiond_socket = "{d / "sessiond.sock"}"\n'
            f'session_host = "127.0.0.1"\nsession_listen = "127.0.0.1"\nport_range = [{base}, {base + 49}]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.controller_options.items())
            + f'[podman]\nsocket = "{self.podman_socket}"\n'
        )
        py = [sys.executable, "-m", "cloudlet"]
        self._spawn([*py, "sessiond", "--config", str(d / "sessiond.toml"), "--log-level", "warning"], "sessiond.log",
                    limited=True)
        await _until(lambda: asyncio.to_thread(os.path.exists, str(d / "sessiond.sock")), 30, "sessiond")
        self._spawn([*py, "controller", "--config", str(d / "controller.toml")], "controller.log", limited=True)
        self.url = await _until(self._controller_address, 30, "controller")
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"},
                                          timeout=aiohttp.ClientTimeout(total=120))

    async def _podman_up(self) -> bool:
        conn = aiohttp.UnixConnector(path=self.podman_socket)
        async with aiohttp.ClientSession(connector=conn) as http:
            async with http.get("http://d/v4.0.0/libpod/_ping") as resp:
                return resp.status == 200

    async def _controller_address(self) -> str | None:
        for rec in self.log_records():
            if rec.get("msg") == "controller listening":
                return f"http://{rec['address']}"
        return None

    def log_records(self) -> list[dict[str, Any]]:
        """The controller's JSON log records so far."""
        out = []
        for line in (self.dir / "controller.log").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    async def api(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        assert self.http is not None
        async with self.http.request(method, self.url + path, json=body) as resp:
            data = await resp.read()
            if resp.status != expect:
                raise RuntimeError(f"{method} {path} answered {resp.status}: {data.decode(errors='replace')}")
            return json.loads(data) if data else None

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label=cloudlet.cloudlet={self.name}"],
                             capture_output=True, text=True, env=podman_env()).stdout.split()
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, env=podman_env())
        subprocess.run(["podman", "network", "rm", "-f", f"cloudlet-{self.name}"], capture_output=True, env=podman_env())


async def launch_once(cl: BenchCloudlet, image: str, name: str) -> float:
    from cloudlet.client import attach

    start = time.perf_counter()
    await cl.api("PUT", f"/v1/services/{name}", {"image": image, "port": 7000}, expect=201)
    sess = await cl.api("POST", f"/v1/services/{name}/sessions", expect=201)
    reader, writer, _ = await attach(sess["host"], sess["port"], sess["session"])
    try:
        first = await asyncio.wait_for(reader.read(1), 30)
        if not first:
            raise RuntimeError("session closed before the service answered")
        elapsed = time.perf_counter() - start
    finally:
        writer.close()
    await cl.api("DELETE", f"/v1/services/{name}", expect=204)
    return elapsed * 1000


async def podman_run_once(image: str, name: str) -> float:
    port = _free_port()
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:7000", image,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=podman_env(),
    )
    _, err = await proc.communicate()
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"podman run failed: {err.decode(errors='replace').strip()}")
        await _first_byte("127.0.0.1", port)
        return (time.perf_counter() - start) * 1000
    finally:
        rm = await asyncio.create_subprocess_exec(
            "podman", "rm", "-f", "-t", "0", name, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env=podman_env(),
        )
        await rm.wait()


async def podman_api_once(socket_path: str, image: str, name: str) -> float:
    """The floor: libpod REST API create + start on the default network, then the container IP."""
    from cloudlet.controller.runtime.podman import on_local_link

    conn = aiohttp.UnixConnector(path=socket_path)
    base = "http://podman/v4.0.0/libpod"
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as http:
        start = time.perf_counter()
        try:
            async with http.post(f"{base}/containers/create", json={
                "name": name, "image": image,
                "r_limits": [{"type": "nofile", "soft": 1024, "hard": 1024},
                             {"type": "nproc", "soft": 4096, "hard": 4096}],
            }) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"podman API create answered {resp.status}: {await resp.text()}")
            async with http.post(f"{base}/containers/{name}/start") as resp:
                if resp.status not in (204, 304):
                    raise RuntimeError(f"podman API start answered {resp.status}: {await resp.text()}")
            async with http.get(f"{base}/containers/{name}/json") as resp:
                info = await resp.json()
            ip = info["NetworkSettings"]["IPAddress"]
            if not on_local_link(ip):
                raise RuntimeError(f"container address {ip} is not on a local bridge")
            await _first_byte(ip, 7000)
            return (time.perf_counter() - start) * 1000
        finally:
            async with http.delete(f"{base}/containers/{name}", params={"force": "true", "timeout": "0"}):
                pass


async def run_bench(runs: int, image: str, podman_socket: str | None, log: Any) -> dict[str, Any]:
    launch_ms: list[float] = []
    podman_ms: list[float] = []
    api_ms: list[float] = []
    async with AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cloudlet-bench-launch-")))
        cl = BenchCloudlet(workdir, podman_socket)
        stack.push_async_callback(cl.stop)
        await cl.start()
        tag = secrets.token_hex(3)
        log("warm-up (not measured)")
        await launch_once(cl, image, f"warm-{tag}")
        await podman_run_once(image, f"clbench-warm-{tag}")
        await podman_api_once(cl.podman_socket, image, f"clbench-warm-api-{tag}")
        for i in range(runs):
            launch_ms.append(await launch_once(cl, image, f"svc-{tag}-{i}"))
            podman_ms.append(await podman_run_once(image, f"clbench-{tag}-{i}"))
            api_ms.append(await podman_api_once(cl.podman_socket, image, f"clbench-api-{tag}-{i}"))
            log(f"run {i + 1}/{runs}: launch {launch_ms[-1]:.0f} ms, podman run {podman_ms[-1]:.0f} ms, "
                f"podman API {api_ms[-1]:.0f} ms")
    lp50, pp50, ap50 = statistics.median(launch_ms), statistics.median(podman_ms), statistics.median(api_ms)
    return {
        "benchmark": "launch",
        "runs": runs,
        "image": image,
        "launch_ms_p50": round(lp50, 1),
        "podman_run_ms_p50": round(pp50, 1),
        "ratio": round(lp50 / pp50, 3),
        "target_ratio": TARGET_RATIO,
        "podman_api_ms_p50": round(ap50, 1),
        "ratio_vs_podman_api": round(lp50 / ap50, 3),
        "launch_ms": [round(x, 1) for x in launch_ms],
        "podman_run_ms": [round(x, 1) for x in podman_ms],
        "podman_api_ms": [round(x, 1) for x in api_ms],
    }


def _cmd(args: argparse.Namespace) -> int:
    from cloudlet.images import DEMO_IMAGE, BuildError, build_demo

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"== {msg}", file=sys.stderr, flush=True)

    if not 1 <= args.runs <= 100:
        print("cloudlet bench launch: --runs must be 1..100", file=sys.stderr)
        return 2
    image = args.image
    if image == DEMO_IMAGE:
        try:
            build_demo(log=lambda msg: None if args.quiet else print(msg, file=sys.stderr, flush=True))
        except BuildError as exc:
            print(f"cloudlet bench launch: {exc}", file=sys.stderr)
            return 1
    try:
        result = asyncio.run(run_bench(args.runs, image, args.podman_socket, log))
    except (RuntimeError, OSError) as exc:
        print(f"cloudlet bench launch: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"launch (API -> first byte through session port): p50 {result['launch_ms_p50']} ms")
        print(f"podman run (CLI -> first byte on published port): p50 {result['podman_run_ms_p50']} ms")
        print(f"podman API (create+start -> first byte on container IP): p50 {result['podman_api_ms_p50']} ms "
              f"(launch / API = {result['ratio_vs_podman_api']})")
        verdict = "ok" if result["ratio"] <= TARGET_RATIO else "ABOVE TARGET"
        print(f"ratio {result['ratio']} (target <= {TARGET_RATIO}: {verdict})")
    return 0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "launch",
        help="service launch time through the controller vs plain podman run",
        description=(
            "Measure, alternating in one run, (a) controller API call until the first byte through the "
            "session port and (b) plain `podman run -p` until the first byte on the published port, and "
            "print both medians and their ratio (target <= 1.3). Starts its own podman API service, "
            "sessiond and controller, and removes everything it made."
        ),
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs of each (default 5)")
    parser.add_argument("--image", default="localhost/cloudlet-demo:latest",
                        help="image to launch; must greet on port 7000 (default: the demo image, built if needed)")
    parser.add_argument("--podman-socket", default=None,
                        help="use this podman API socket instead of starting a private `podman system service`")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=_cmd)

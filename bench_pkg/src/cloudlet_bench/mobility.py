"""`cloudlet bench mobility`: a device drives past three cloudlets while unmodified programs run.

Three real ``cloudlet sessiond`` processes (a, b, c; each reaches the others through a private sshd
over the SSH tunnel, ``--hop ssh``, or plain tcp), one ``redis-server`` behind all three as the
service. The device has its own network namespace (a veth to the host; loopback when not root) and
reaches each cloudlet through a latency-injecting proxy (:mod:`cloudlet_bench.harness.latency`,
this kernel has no netem). The drive: phase by phase (``--phase-seconds``) one cloudlet is near
(``--near-ms`` one way) and the others far (``--far-ms``), a, then b, then c.

In the device namespace: `cloudlet agent` (its own process), ``redis-benchmark -l`` (an unmodified
client with ``--connections`` long-lived connections, run for the whole drive) and a checker (one
connection sending ``INCR`` one at a time, every 50 ms at most, so the samples spread evenly over
the drive: every reply must be the one before plus one; its round
trips are the latency figures). The same drive runs three times, side by side in one run:

- ``follow``: the agent decides by itself (policy ``auto``, the product's defaults);
- ``oracle``: the agent is pinned and the bench switches it at the exact moment the delays change;
- ``stay``: the agent stays on the first cloudlet.

Figures (the top level is ``follow``): ``switches``, ``app_errors`` (redis-benchmark exiting or
printing an error, checker errors), ``bytes_lost``/``bytes_duplicated`` (requests whose reply never
came; INCRs the server executed beyond those acknowledged), ``latency_ms_p50``/``p99`` against
``oracle_latency_ms_*`` and ``stay_latency_ms_*``, and ``switch_delay_s_max``: from the moment a
link got worse to the agent's switch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from cloudlet_bench.harness.latency import LatencyProxy
from cloudlet_bench.harness.sshd import free_port
from cloudlet_bench.harness.sessiond import Fleet, control

NAMES = ("a", "b", "c")


def log(msg: str) -> None:
    print(f"[mobility] {msg}", file=sys.stderr, flush=True)


@dataclass
class DeviceNet:
    """The device's network namespace and a veth to the host, or nothing (loopback) without root."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    netns: bool = False
    host_ip: str = "127.0.0.1"

    @property
    def ns(self) -> str:
        return f"clmob-{self.tag}"

    def create(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return
        host_if, dev_if = f"clmh{self.tag}", f"clmd{self.tag}"
        steps = [["ip", "netns", "add", self.ns],
                 ["ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if],
                 ["ip", "link", "set", dev_if, "netns", self.ns],
                 ["ip", "addr", "add", "10.215.0.1/24", "dev", host_if], ["ip", "link", "set", host_if, "up"],
                 ["ip", "-n", self.ns, "addr", "add", "10.215.0.2/24", "dev", dev_if],
                 ["ip", "-n", self.ns, "link", "set", dev_if, "up"], ["ip", "-n", self.ns, "link", "set", "lo", "up"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                self.destroy()
                raise SystemExit(f"bench mobility: {' '.join(step)}: {done.stderr.strip()}")
        self.netns, self.host_ip = True, "10.215.0.1"

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns] if self.netns else []

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", f"clmh{self.tag}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _agent_status(sock: str) -> dict[str, Any]:
    _, data = await control(sock, "GET", "/v1/status")
    return data if isinstance(data, dict) else {}


AgentArgv = Callable[[str, str, dict[str, LatencyProxy]], list[str]]


def bench_agent(secret_file: Path) -> AgentArgv:
    """The agent of the bench: its own process, sessions from the fleet secret (no controller here)."""
    def argv(kind: str, sock: str, proxies: dict[str, LatencyProxy]) -> list[str]:
        return [sys.executable, "-m", "cloudlet_bench.mobility_device", "agent", "--secret-file", str(secret_file),
                *[f"--cloudlet={n}={p.address[0]}:{p.address[1]}" for n, p in proxies.items()],
                "--at", next(iter(proxies)), "--policy", "auto" if kind == "follow" else "pinned",
                "--control-socket", sock]
    return argv


async def drive(args: argparse.Namespace, kind: str, net: DeviceNet, proxies: dict[str, LatencyProxy],
                agent_argv: AgentArgv, workdir: Path) -> dict[str, Any]:
    """One drive past ``proxies`` in order (``kind``: follow, oracle or stay); the figures of that run."""
    near_s, far_s = args.near_ms / 1000.0, args.far_ms / 1000.0
    route = list(proxies)

    def set_near(name: str) -> None:
        for n, p in proxies.items():
            p.delay = near_s if n == name else far_s

    set_near(route[0])
    sock = str(workdir / f"agent-{kind}.sock")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agent = await asyncio.create_subprocess_exec(
        *net.prefix(), *agent_argv(kind, sock, proxies), stdout=asyncio.subprocess.PIPE,
        stderr=open(workdir / f"agent-{kind}.log", "wb"), env=env)
    assert agent.stdout is not None
    port = int(json.loads(await asyncio.wait_for(agent.stdout.readline(), 30))["listen"].rsplit(":", 1)[1])
    await asyncio.sleep(1.0)  # the agent's probes see every link before the programs start
    key = f"mobility:{kind}:{secrets.token_hex(4)}"
    total = args.phase_seconds * len(route)
    bench = await asyncio.create_subprocess_exec(
        *net.prefix(), "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(args.connections),
        "-t", "get", "-l", "-q", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    checker = await asyncio.create_subprocess_exec(
        *net.prefix(), sys.executable, "-m", "cloudlet_bench.mobility_device", "checker", "--port", str(port),
        "--seconds", str(total), "--key", key, stdout=asyncio.subprocess.PIPE, env=env)
    switch_delays: list[float] = []
    started = time.monotonic()
    for k, name in enumerate(route):
        phase_end = started + (k + 1) * args.phase_seconds
        if k > 0:
            set_near(name)
            changed = time.monotonic()
            if kind == "oracle":
                await control(sock, "POST", "/v1/switch", {"to": name, "fin": True})
            if kind == "follow":
                while time.monotonic() < phase_end:
                    status = await _agent_status(sock)
                    if status.get("cloudlet") == name and (status.get("last_switch") or {}).get("to") == name:
                        switch_delays.append(round(time.monotonic() - changed, 3))
                        break
                    await asyncio.sleep(0.02)
                else:
                    switch_delays.append(round(time.monotonic() - changed, 3))  # never within the phase
        await asyncio.sleep(max(0.0, phase_end - time.monotonic()))
        log(f"{kind}: phase {k + 1}/{len(route)} ({name} near) done")
    out, _ = await asyncio.wait_for(checker.communicate(), args.phase_seconds + 30)
    check = json.loads(out)
    bench_exited_early = bench.returncode is not None
    if not bench_exited_early:
        bench.terminate()
    bench_out, _ = await asyncio.wait_for(bench.communicate(), 30)
    bench_text = bench_out.decode(errors="replace").replace("\r", "\n")
    bench_errors = [line.strip() for line in bench_text.splitlines() if "error" in line.lower()]
    status = await _agent_status(sock)
    agent.terminate()
    await asyncio.wait_for(agent.wait(), 30)
    executed = check["executed"] if check["executed"] is not None else check["acked"]
    in_flight = check["sent"] - check["acked"]
    lat = [s[1] * 1000 for s in check["samples"]]
    last_rps = [line for line in bench_text.splitlines() if "requests per second" in line or "rps=" in line]
    return {
        "switches": int(status.get("switches", 0)), "heals": int(status.get("heals", 0)),
        "app_errors": len(bench_errors) + int(bench_exited_early) + len(check["errors"]),
        "app_error_lines": (bench_errors + check["errors"])[:5],
        "bytes_lost": in_flight * check["request_bytes"] if check["errors"] else 0,
        "bytes_duplicated": max(0, executed - check["acked"] - in_flight) * check["request_bytes"],
        "requests": check["acked"],
        "latency_ms_p50": round(statistics.median(lat), 3) if lat else None,
        "latency_ms_p99": round(percentile(lat, 0.99) or 0, 3) if lat else None,
        "switch_delays_s": switch_delays,
        "redis_benchmark_last": last_rps[-1].strip()[:200] if last_rps else "",
        "sessions_opened": int(status.get("sessions_opened", 0)),
    }


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench mobility: {tool} not installed (Debian packages redis-server, redis-tools)")
    fleet = Fleet()
    net = DeviceNet()
    sshds: list[Any] = []
    proxies: dict[str, LatencyProxy] = {}
    redis = None
    try:
        hop = args.hop
        if hop == "ssh":
            from cloudlet_bench.harness.sshd import sshd_argv_available

            missing = sshd_argv_available()
            if missing:
                log("--hop ssh not possible here (" + "; ".join(missing) + "): using tcp")
                hop = "tcp"
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(fleet.dir)], stdout=subprocess.DEVNULL)
        net.create()
        log(f"device in {'network namespace ' + net.ns if net.netns else 'the host namespace (not root)'}; "
            f"hop {hop}; {len(NAMES)} cloudlets; about {3 * (len(NAMES) * args.phase_seconds + 4):.0f} s")
        endpoints = {n: f"127.0.0.1:{free_port()}" for n in NAMES}  # each sessiond's peer endpoint
        peer_of: dict[str, Any] = dict(endpoints)
        if hop == "ssh":
            from cloudlet_bench.harness.sshd import TunnelSshd

            for n in NAMES:
                sshd = TunnelSshd(endpoint=endpoints[n])
                sshd.start()
                sshds.append(sshd)
                peer_of[n] = sshd.peer_table(n)
        daemons = {n: await fleet.start(n, peers={o: peer_of[o] for o in NAMES if o != n}, peer_listen=endpoints[n])
                   for n in NAMES}
        for d in daemons.values():
            await d.wait_peers_up()
        ports = {n: await d.put_service("redis", f"127.0.0.1:{redis_port}") for n, d in daemons.items()}
        for n, port in ports.items():
            proxies[n] = await LatencyProxy(("127.0.0.1", port), listen=(net.host_ip, 0)).start()
        runs = {}
        for kind in ("follow", "oracle", "stay"):
            runs[kind] = await drive(args, kind, net, proxies, bench_agent(fleet.secret_file), fleet.dir)
        result = summary(runs)
        result.update({"hop": hop, "device_netns": net.netns, "near_ms": args.near_ms, "far_ms": args.far_ms,
                       "phase_seconds": args.phase_seconds, "connections": args.connections, "route": list(NAMES)})
        return result
    finally:
        for p in proxies.values():
            await p.close()
        fleet.stop()
        for s in sshds:
            s.cleanup()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if net.netns:
            net.destroy()


def summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report: ``follow``'s figures at the top, the baselines beside them, the targets checked."""
    follow, oracle, stay = runs["follow"], runs["oracle"], runs["stay"]
    result = {
        **{k: follow[k] for k in ("switches", "heals", "app_errors", "bytes_lost", "bytes_duplicated",
                                  "latency_ms_p50", "latency_ms_p99", "requests")},
        "oracle_latency_ms_p50": oracle["latency_ms_p50"], "oracle_latency_ms_p99": oracle["latency_ms_p99"],
        "stay_latency_ms_p50": stay["latency_ms_p50"], "stay_latency_ms_p99": stay["latency_ms_p99"],
        "switch_delay_s_max": max(follow["switch_delays_s"]) if follow["switch_delays_s"] else None,
        "runs": runs,
    }
    p50, o50, s50 = result["latency_ms_p50"], result["oracle_latency_ms_p50"], result["stay_latency_ms_p50"]
    result["targets"] = {
        "no_app_errors": all(r["app_errors"] == 0 for r in runs.values()),
        "nothing_lost_or_duplicated": all(r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0 for r in runs.values()),
        "p50_within_1.2x_oracle": bool(p50 and o50 and p50 <= 1.2 * o50),
        "p50_2x_better_than_staying": bool(p50 and s50 and s50 >= 2 * p50),
        "switch_within_2s": result["switch_delay_s_max"] is not None and result["switch_delay_s_max"] <= 2.0,
    }
    return result



def _main(args: argparse.Namespace) -> int:
    from cloudlet.common.loop import use_fast_loop

    if args.phase_seconds < 2 or args.near_ms < 0 or args.far_ms <= args.near_ms or args.connections < 1:
        raise SystemExit("bench mobility: --phase-seconds >= 2, 0 <= --near-ms < --far-ms, --connections >= 1")
    started = time.monotonic()
    use_fast_loop("auto")
    result = asyncio.run(run_bench(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "mobility", help="a device drives past three cloudlets: automatic switches, app errors, latency vs oracle",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument("--phase-seconds", type=float, default=6.0, help="seconds near each cloudlet (default 6)")
    p.add_argument("--near-ms", type=float, default=2.0, help="one-way delay to the near cloudlet (default 2)")
    p.add_argument("--far-ms", type=float, default=20.0, help="one-way delay to the others (default 20)")
    p.add_argument("--connections", type=int, default=4, help="redis-benchmark connections (default 4)")
    p.add_argument("--hop", choices=["ssh", "tcp"], default="ssh",
                   help="between cloudlets: the SSH tunnel through private sshds (default; needs root and "
                   "openssh-server, else tcp) or plain tcp")
    p.set_defaults(func=_main)

#!/usr/bin/env python3
"""The demo's drive: redis-benchmark through `cloudlet agent`, which follows the nearest cloudlet by itself.

    demo_drive.py [--name cloudlet] [--phase-seconds 4] [--near-ms 2] [--far-ms 20] [--connections 4]

The device is this machine. With its device profile (playbooks/devices.yml) the agent asks the
fleet for the map of the ``redis`` service (launched from ``localhost/cloudlet-redis``) and gives
every connection its own session. Between the device and each cloudlet's session port sits a
latency-injecting proxy (the kernel has no netem); the agent reaches each cloudlet through it
(``--via``). The drive: a is near, then b, then c. An unmodified ``redis-benchmark -l`` (several
long-lived connections) and an INCR checker run through the agent the whole time; the same drive
runs with the agent deciding by itself (follow), with the agent switched at the exact moment
(oracle) and staying on a (stay): the figures of `cloudlet bench mobility`, on the real fleet.

Exit status 0 only if no program saw an error and nothing was lost or duplicated in any run, the
agent switched by itself, and its latency p50 beats staying.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

from cloudlet_bench.harness.latency import LatencyProxy
from cloudlet_bench.mobility import DeviceNet, drive, summary

ROOT = Path(__file__).resolve().parent.parent


def fleet_map(profile: dict, service: str) -> dict:  # type: ignore[type-arg]
    ctx = ssl.create_default_context(cadata=profile["ca"]) if profile.get("ca") else None
    for api in profile["controllers"]:
        req = urllib.request.Request(f"{api}/v1/services/{service}/map",
                                     headers={"Authorization": f"Bearer {profile['credential']}"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except OSError as exc:
            print(f"demo_drive: {api}: {exc}", file=sys.stderr)
    raise SystemExit("demo_drive: no controller of the profile answered")


async def run(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    profile_path = Path(args.profile) if args.profile else ROOT / ".cache" / "fleet" / args.name / "credentials" / \
        "devices" / "demo-client.toml"
    profile = tomllib.loads(profile_path.read_text())["device"]
    if args.service not in profile["services"]:
        raise SystemExit(f"demo_drive: the profile may not use {args.service!r} (run playbooks/devices.yml)")
    where = {e["cloudlet"]: (e["host"], int(e["port"])) for e in fleet_map(profile, args.service)["cloudlets"]}
    if len(where) < 2:
        raise SystemExit(f"demo_drive: {args.service} runs on {sorted(where)} only: launch it everywhere")
    proxies = {n: await LatencyProxy(where[n]).start() for n in sorted(where)}
    workdir = Path(tempfile.mkdtemp(prefix="cloudlet-demo-drive-"))

    def agent_argv(kind: str, sock: str, px: dict[str, LatencyProxy]) -> list[str]:
        return [sys.executable, "-m", "cloudlet", "agent", "run", "--profile", str(profile_path),
                "--service", args.service, "--listen", "127.0.0.1:0", "--control-socket", sock,
                "--at", next(iter(px)), "--policy", "auto" if kind == "follow" else "pinned", "--log-format", "json",
                *[f"--via={n}={p.address[0]}:{p.address[1]}" for n, p in px.items()]]

    try:
        runs = {}
        for kind in ("follow", "oracle", "stay"):
            runs[kind] = await drive(args, kind, DeviceNet(), proxies, agent_argv, workdir)
        result = summary(runs)
        result.update({"service": args.service, "route": list(proxies), "near_ms": args.near_ms,
                       "far_ms": args.far_ms, "phase_seconds": args.phase_seconds, "connections": args.connections,
                       "agent_logs": str(workdir)})
        return result
    finally:
        for p in proxies.values():
            await p.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="cloudlet", help="local fleet name (default cloudlet)")
    p.add_argument("--profile", help="device profile (default: the demo client's, from playbooks/devices.yml)")
    p.add_argument("--service", default="redis")
    p.add_argument("--phase-seconds", type=float, default=4.0)
    p.add_argument("--near-ms", type=float, default=2.0)
    p.add_argument("--far-ms", type=float, default=20.0)
    p.add_argument("--connections", type=int, default=4)
    args = p.parse_args()
    result = asyncio.run(run(args))
    runs = result["runs"]
    out = ROOT / ".cache" / "fleet" / args.name / "demo-drive.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("== the drive: redis-benchmark -l and an INCR checker through `cloudlet agent`, a -> b -> c")
    for kind in ("follow", "oracle", "stay"):
        r = runs[kind]
        print(f"   {kind:<7} switches {r['switches']}  requests {r['requests']:>5}  latency p50 {r['latency_ms_p50']} ms "
              f"p99 {r['latency_ms_p99']} ms  app errors {r['app_errors']}  lost {r['bytes_lost']} B  "
              f"duplicated {r['bytes_duplicated']} B  sessions {r['sessions_opened']}")
    print(f"   switch delays (link worse -> switch): {runs['follow']['switch_delays_s']} s")
    print(f"   targets: {json.dumps(result['targets'])}")
    print(f"   report: {out}")
    t = result["targets"]
    ok = (t["no_app_errors"] and t["nothing_lost_or_duplicated"] and t["p50_2x_better_than_staying"]
          and runs["follow"]["switches"] >= len(result["route"]) - 1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

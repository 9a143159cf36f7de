#!/usr/bin/env python3
"""A rolling upgrade under load, as a device sees it (molecule's side_effect runs it).

    upgrade_stream.py build --out DIR
        a new version of the package (one file changed, so a new `+src.<hash>` version) and a
        wheelhouse with it and the dependencies of the current one; prints {"version", "wheelhouse"}.
    upgrade_stream.py stream --name FLEET --dir DIR
        two devices' agents with the demo client's profile: one attached at the first cloudlet (its
        anchor), one anchored there and moved to the second (forwarded over the SSH tunnel). Each
        sends INCR every 20 ms on one connection and checks every reply is the one before plus one
        (the demo service counts per backend connection, so a new backend connection would show),
        until DIR/stop exists; writes DIR/report.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path, mark: str = "") -> dict[str, str]:
    src = out / "cloudlet_pkg"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ROOT / "cloudlet_pkg", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    init = src / "src" / "cloudlet" / "__init__.py"
    init.write_text(init.read_text() + f"\n# a build for the rolling upgrade test (fleet/upgrade_stream.py) {mark}\n")
    wheelhouse = out / "wheelhouse"
    shutil.copytree(ROOT / "wheelhouse", wheelhouse,
                    ignore=shutil.ignore_patterns("cloudlet-*.whl", ".stamp", ".wheelhouse.tar"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w",
                    str(wheelhouse), str(src)], check=True, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    [wheel] = wheelhouse.glob("cloudlet-*.whl")
    return {"version": wheel.name.split("-")[1], "wheelhouse": str(wheelhouse)}


async def agent(profile: Path, sock: Path, at: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudlet", "agent", "run", "--profile", str(profile), "--service", "demo",
        "--listen", "127.0.0.1:0", "--control-socket", str(sock), "--at", at, "--policy", "pinned",
        "--log-format", "json", stdout=asyncio.subprocess.PIPE, stderr=open(sock.with_suffix(".log"), "wb"))
    assert proc.stdout is not None
    info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    return proc, int(info["listen"].rsplit(":", 1)[1])


async def control(sock: Path, method: str, path: str, body: object = None) -> dict:  # type: ignore[type-arg]
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
        async with http.request(method, f"http://agent{path}", json=body) as resp:
            return await resp.json()  # type: ignore[no-any-return]


async def incr_stream(port: int, stop: Path) -> dict:  # type: ignore[type-arg]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = await asyncio.wait_for(reader.readline(), 30)
    count = gap = 0.0
    errors: list[str] = []
    last = time.monotonic()
    closed = False
    while not stop.exists():
        writer.write(b"INCR\n")
        try:
            line = await asyncio.wait_for(reader.readline(), 60)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            errors.append(f"after {int(count)} replies: {type(exc).__name__}")
            break
        if not line:
            closed = True
            errors.append(f"the connection closed after {int(count)} replies")
            break
        now = time.monotonic()
        gap, last = max(gap, now - last), now
        if line != b"COUNT %d\n" % (count + 1):
            errors.append(f"reply {line!r} after COUNT {int(count)}: lost, repeated or a new backend connection")
            break
        count += 1
        await asyncio.sleep(0.02)
    writer.close()
    return {"hello": hello.decode().strip(), "replies": int(count), "errors": errors, "closed": closed,
            "max_gap_ms": round(gap * 1000, 1)}


async def stream(name: str, work: Path) -> dict:  # type: ignore[type-arg]
    profile = ROOT / ".cache" / "fleet" / name / "credentials" / "devices" / "demo-client.toml"
    stop = work / "stop"
    stop.unlink(missing_ok=True)
    from cloudlet.client.fleet import DeviceProfile, FleetClient, endpoints

    fleet = FleetClient(DeviceProfile.load(profile))
    try:
        first, second = sorted(endpoints(await fleet.fleet_map("demo")))[:2]
    finally:
        await fleet.close()
    local, local_port = await agent(profile, work / "agent-local.sock", first)
    forwarded, forwarded_port = await agent(profile, work / "agent-forwarded.sock", first)
    try:
        streams = asyncio.gather(incr_stream(local_port, stop), incr_stream(forwarded_port, stop))
        await asyncio.sleep(0.5)
        moved = await control(work / "agent-forwarded.sock", "POST", "/v1/switch", {"to": second})
        (work / "started").write_text(json.dumps(moved))
        results = await streams
        status = [await control(work / s, "GET", "/v1/status") for s in ("agent-local.sock", "agent-forwarded.sock")]
    finally:
        for proc in (local, forwarded):
            proc.terminate()
            await proc.wait()
    return {"local": {**results[0], "heals": status[0]["heals"], "at": first},
            "forwarded": {**results[1], "heals": status[1]["heals"], "via": second, "anchor": first},
            "moved": moved}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--mark", default="", help="text that makes this build's version differ from another's")
    s = sub.add_parser("stream")
    s.add_argument("--name", required=True)
    s.add_argument("--dir", required=True, type=Path)
    args = p.parse_args()
    if args.what == "build":
        print(json.dumps(build(args.out, args.mark)))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(stream(args.name, args.dir))
    (args.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if not report["local"]["errors"] and not report["forwarded"]["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

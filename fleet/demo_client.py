#!/usr/bin/env python3
"""The demo's device: one session through the local fleet, moved A -> B -> C, every byte checked.

    demo_client.py [--name cloudlet] [--service demo] [--rate 500] [--seconds 6] [--blob-mib 16]
                   [--mode resumable|raw]

1. as a device does: with its own device credential (the profile playbooks/devices.yml wrote:
   credential, controller URLs, fleet CA), asks cloudlet A's controller over HTTPS for a session of
   the demo service; the reply carries the fleet map, every cloudlet's session endpoint;
2. attaches to A (the anchor), checks the service's per-connection state (INCR), measures the
   throughput of a BLOB read straight from A;
3. starts a STREAM of numbered, timestamped lines; a third of the way in it moves to B with a clean
   move (FIN, make-before-break), two thirds in to C without FIN (the old connection is abandoned, as
   a device losing its radio link would) - both times naming the anchor A, so B and C forward through
   their SSH tunnels to A. The application keeps reading while the device moves (the move runs in
   its own task). In the default resumable mode (protocol mode 2) the move without FIN loses nothing
   either; with ``--mode raw`` it loses what was in flight on the abandoned connection;
4. checks every line (gaps = lost, repeats = duplicated), that INCR still counts on the same backend
   connection, measures the throughput of a BLOB read through C's forwarding, verifies every BLOB
   byte, ends the session and prints the report (also written as JSON next to the fleet's state).

Exit status 0 only if the FIN handover lost and duplicated nothing (and, in resumable mode, the move
without FIN too), no byte was duplicated anywhere, every BLOB byte was right and the session kept its
backend connection throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloudlet.client import SessionClient

ROOT = Path(__file__).resolve().parent.parent
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLOB_CHUNK = 65536
MSG_RE = re.compile(rb"MSG (\d+) (\d+)")


def controller(url: str, token: str, method: str, path: str, ca_pem: str) -> dict:
    """One API call over HTTPS, the certificate verified against the fleet CA of the profile."""
    req = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Bearer {token}"})
    ctx = ssl.create_default_context(cadata=ca_pem)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise SystemExit(f"controller {url}: {method} {path}: {err.code} {err.read().decode(errors='replace')}") from None


@dataclass
class Handover:
    to: str
    fin: bool
    at_seq: int
    call_ms: float = 0.0  # handover() itself: attach through the new cloudlet (and drop, without FIN)
    gap_ms: float = 0.0  # longest silence between two stream lines around the move
    lost_lines: int = 0
    lost_bytes: int = 0
    duplicated_lines: int = 0


@dataclass
class Report:
    cloudlets: dict[str, str]
    service: str
    stream_lines: int
    stream_rate_per_s: int
    mode: str
    received_lines: int = 0
    lost_lines: int = 0
    lost_bytes: int = 0
    duplicated_lines: int = 0
    discarded_bytes: int = 0
    handovers: list[Handover] = field(default_factory=list)
    throughput_direct_mib_s: float = 0.0
    throughput_forwarded_mib_s: float = 0.0
    blob_bytes_checked: int = 0
    blob_bytes_wrong: int = 0
    same_backend_connection: bool = False
    ok: bool = False


class LineReader:
    def __init__(self, client: SessionClient) -> None:
        self.client = client
        self.buf = bytearray()

    async def line(self, timeout: float = 30.0) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return out
            chunk = await asyncio.wait_for(self.client.recv(), timeout)
            if not chunk:
                raise ConnectionError("session closed by the cloudlet")
            self.buf += chunk

    async def exactly(self, n: int, timeout: float = 60.0) -> bytes:
        while len(self.buf) < n:
            chunk = await asyncio.wait_for(self.client.recv(), timeout)
            if not chunk:
                raise ConnectionError("session closed by the cloudlet")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def blob_errors(data: bytes) -> int:
    # The service sends 64 KiB chunks, each starting the pattern afresh (demo.c do_blob).
    chunk = (PATTERN * (BLOB_CHUNK // len(PATTERN) + 1))[:BLOB_CHUNK]
    expect = (chunk * (len(data) // BLOB_CHUNK + 1))[: len(data)]
    if data == expect:
        return 0
    return sum(1 for a, b in zip(data, expect) if a != b)


async def blob(lr: LineReader, size: int) -> tuple[float, int]:
    await lr.client.send(f"BLOB {size}\n".encode())
    start = time.perf_counter()
    head = await lr.line()
    if head != f"DATA {size}".encode():
        raise RuntimeError(f"unexpected BLOB answer {head[:80]!r}")
    data = await lr.exactly(size)
    seconds = time.perf_counter() - start
    return size / seconds / (1 << 20), blob_errors(data)


async def run(args: argparse.Namespace) -> Report:
    state = ROOT / ".cache" / "fleet" / args.name
    fleet = json.loads((state / "fleet.json").read_text())
    profile_path = Path(args.profile) if args.profile else state / "credentials" / "devices" / "demo-client.toml"
    try:
        profile = tomllib.loads(profile_path.read_text())["device"]
    except OSError as exc:
        raise SystemExit(f"no device profile {profile_path} ({exc.strerror}): run ansible-playbook playbooks/devices.yml") from None
    names = list(fleet["hosts"])[:3]
    if len(names) < 3:
        raise SystemExit("the demo needs three cloudlets")
    a, b, c = names
    api = {n: f"https://{fleet['hosts'][n]['address']}:{args.controller_port}" for n in names}
    if api[a] not in profile["controllers"]:
        raise SystemExit(f"{api[a]} is not one of the profile's controllers {profile['controllers']}")
    sess = controller(api[a], profile["credential"], "POST", f"/v1/services/{args.service}/sessions", profile["ca"])
    where = {e["cloudlet"]: e for e in sess["map"]["cloudlets"]}  # the fleet map: no hand-written ports
    if sorted(where) != sorted(names):
        raise SystemExit(f"the fleet map lists {sorted(where)}, not {names}: is the service running everywhere?")
    addr = {n: where[n]["host"] for n in names}
    ports = {n: int(where[n]["port"]) for n in names}
    count = args.rate * args.seconds
    report = Report({n: f"{addr[n]}:{ports[n]}" for n in names}, args.service, count, args.rate, args.mode)

    client = SessionClient(sess.get("host", addr[a]), int(sess.get("port", ports[a])), sess["session"],
                           resumable=args.mode == "resumable")
    await client.open()
    lr = LineReader(client)
    hello = await lr.line()
    if not hello.startswith(b"HELLO "):
        raise RuntimeError(f"unexpected greeting {hello!r}")
    await client.send(b"INCR\n")
    first = await lr.line()

    report.throughput_direct_mib_s, wrong = await blob(lr, args.blob_mib << 20)
    report.blob_bytes_checked += args.blob_mib << 20
    report.blob_bytes_wrong += wrong

    plan = [Handover(b, True, count // 3), Handover(c, False, 2 * count // 3)]
    await client.send(f"STREAM {1_000_000 // args.rate} {count}\n".encode())
    seen: set[int] = set()
    arrivals: list[tuple[int, float]] = []
    moving: asyncio.Task[None] | None = None

    async def move(h: Handover) -> None:
        t0 = time.perf_counter()
        await client.handover(addr[h.to], ports[h.to], target=a, fin=h.fin)
        h.call_ms = (time.perf_counter() - t0) * 1000

    expected = 1
    pending = list(plan)
    resync = False
    while True:
        line = await lr.line()
        now = time.perf_counter()
        if line == f"END {count}".encode():
            break
        m = MSG_RE.fullmatch(line)
        if m is None:
            # Only possible right after a move without FIN: the first line can start mid-line.
            report.discarded_bytes += len(line) + 1
            if not resync:
                raise RuntimeError(f"unexpected line {line[:80]!r}")
            continue
        seq = int(m.group(1))
        done = plan[: len(plan) - len(pending)]  # the moves made so far
        if seq in seen:
            report.duplicated_lines += 1
            if done:
                done[-1].duplicated_lines += 1
            continue
        seen.add(seq)
        if seq > expected:
            missing = seq - expected
            report.lost_lines += missing
            # Each line is "MSG <seq> <19-digit t_ns>\n", so the lost bytes are known exactly.
            lost = sum(len(f"MSG {x} ") + 20 for x in range(expected, seq))
            report.lost_bytes += lost
            if done:
                done[-1].lost_lines += missing
                done[-1].lost_bytes += lost
        expected = max(expected, seq + 1)
        arrivals.append((seq, now))
        if pending and seq >= pending[0].at_seq:
            h = pending.pop(0)
            if moving is not None:
                await moving  # one move at a time
            if not h.fin and args.mode == "raw":
                # Raw mode: the bytes in flight on the abandoned connection are gone, so a line can be
                # cut where the old connection's last bytes meet the new one's first: skip such lines.
                resync = True
            moving = asyncio.create_task(move(h))  # the application keeps reading meanwhile
    if moving is not None:
        await moving
    report.received_lines = len(seen)
    if expected <= count:
        report.lost_lines += count - expected + 1

    times = dict(arrivals)
    ordered = sorted(times)
    for h in plan:
        window = [s for s in ordered if h.at_seq - 50 <= s <= h.at_seq + 50 + h.lost_lines]
        gaps = [times[y] - times[x] for x, y in zip(window, window[1:])]
        h.gap_ms = max(gaps) * 1000 if gaps else 0.0
    report.handovers = plan

    await client.send(b"INCR\n")
    second = await lr.line()
    report.same_backend_connection = first == b"COUNT 1" and second == b"COUNT 2"
    report.throughput_forwarded_mib_s, wrong = await blob(lr, args.blob_mib << 20)
    report.blob_bytes_checked += args.blob_mib << 20
    report.blob_bytes_wrong += wrong
    await client.end()
    await client.close()

    must_be_whole = [h for h in plan if h.fin or args.mode == "resumable"]
    report.ok = (all(h.lost_lines == 0 for h in must_be_whole) and report.duplicated_lines == 0
                 and report.blob_bytes_wrong == 0 and report.same_backend_connection)
    (state / "demo-report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def print_report(r: Report) -> None:
    a, b, c = list(r.cloudlets)
    print()
    print(f"== demo report: one session on service {r.service!r}, anchored on cloudlet {a}, mode {r.mode}")
    for n, where in r.cloudlets.items():
        print(f"   cloudlet {n}: session port {where}")
    print(f"   stream: {r.stream_lines} lines at {r.stream_rate_per_s}/s; received {r.received_lines}, "
          f"lost {r.lost_lines} ({r.lost_bytes} bytes), duplicated {r.duplicated_lines}, "
          f"partial line bytes discarded {r.discarded_bytes}")
    print(f"   {'move':<12} {'FIN':<4} {'at line':>8} {'handover call':>14} {'stream gap':>11} "
          f"{'lost lines':>11} {'lost bytes':>11} {'duplicated':>11}")
    prev = a
    for h in r.handovers:
        print(f"   {prev + ' -> ' + h.to:<12} {'yes' if h.fin else 'no':<4} {h.at_seq:>8} {h.call_ms:>11.1f} ms "
              f"{h.gap_ms:>8.1f} ms {h.lost_lines:>11} {h.lost_bytes:>11} {h.duplicated_lines:>11}")
        prev = h.to
    print(f"   throughput: {r.throughput_direct_mib_s:.1f} MiB/s straight from {a}, "
          f"{r.throughput_forwarded_mib_s:.1f} MiB/s forwarded {c} -> {a} through the SSH tunnel")
    print(f"   BLOB bytes checked: {r.blob_bytes_checked}, wrong: {r.blob_bytes_wrong}; "
          f"same backend connection throughout (INCR 1 then 2): {'yes' if r.same_backend_connection else 'NO'}")
    if r.mode == "raw":
        print("   mode raw: a move without FIN loses what was in flight on the abandoned connection "
              "(docs/protocol.md); a move with FIN loses nothing")
    else:
        print("   mode resumable (protocol mode 2): the anchor wrote again what the abandoned connection "
              "never delivered, so neither move lost or repeated anything")
    print(f"== demo {'PASSED' if r.ok else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo_client.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="cloudlet", help="fleet name (fleet/fleet.py --name)")
    parser.add_argument("--service", default="demo", help="service launched on every cloudlet")
    parser.add_argument("--controller-port", type=int, default=8700, help="the controllers' HTTPS port")
    parser.add_argument("--profile", help="device profile (default: the fleet's credentials/devices/demo-client.toml)")
    parser.add_argument("--rate", type=int, default=500, help="stream lines per second")
    parser.add_argument("--seconds", type=int, default=6, help="stream duration")
    parser.add_argument("--blob-mib", type=int, default=16, help="size of each throughput read")
    parser.add_argument("--mode", choices=["resumable", "raw"], default="resumable",
                        help="session protocol mode: resumable (mode 2, default) or raw (mode 0)")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

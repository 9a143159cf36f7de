"""`cloudlet bench migrate`: handover by forwarding (FW) against live migration with CRIU (LM).

The measurement the paper (section 5.3) promised and never ran, on one machine, side by side:

* The service is the demo container (``localhost/cloudlet-demo``), streaming numbered, timestamped
  lines (``STREAM``) to two clients: the **mover**, whose device changes cloudlet, and a
  **bystander**, another client of the same container that does not move.
* **FW**: three real ``cloudlet sessiond`` processes (``a`` anchors the container; ``b`` and ``c``
  forward to it over a tcp hop). The mover moves a -> b -> c -> a ... with a clean (FIN) detach,
  always naming the anchor.
* **LM**: the clients talk to the container directly; a move is ``podman container checkpoint
  --export --tcp-established``, remove, ``podman container restore --import --tcp-established`` (on
  the same host: a real migration also copies the archive, reported as ``checkpoint_bytes``, so LM
  figures here are a lower bound).

Per method: the mover's service interruption per move (``gap_ms``: the longest time between two
consecutive lines around the move), the bystander's longest gap over the whole run, lines lost and
duplicated, and throughput (``BLOB``) before and during forwarding for FW.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.client import SessionClient
from cloudlet.images import podman_env

from cloudlet_bench.harness.sessiond import Fleet

DEMO_IMAGE = "localhost/cloudlet-demo:latest"
DEMO_PORT = 7000
READ = 256 * 1024


async def podman(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=podman_env())
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def criu_version() -> str | None:
    """The CRIU version runc will use, or None when no CRIU 4 is installed."""
    exe = shutil.which("criu", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
            return version if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 4 else None
    return None


@dataclass
class Lines:
    """Receives ``MSG <seq> <t_ns>`` lines; records seq numbers and arrival times."""

    seqs: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    partial: bytes = b""

    def feed(self, data: bytes, now: float) -> None:
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            if line.startswith(b"MSG "):
                self.seqs.append(int(line.split()[1]))
                self.arrivals.append(now)

    def accounting(self) -> tuple[int, int]:
        """(lines lost, lines duplicated) from the seq numbers seen."""
        seen: set[int] = set()
        dup = 0
        for s in self.seqs:
            dup += s in seen
            seen.add(s)
        lost = (max(seen) - min(seen) + 1 - len(seen)) if seen else 0
        return lost, dup

    def gap_around(self, start: float, end: float) -> float | None:
        """Longest inter-arrival (ms) among lines arriving in [start, end + 5 ms], plus the one before."""
        times = self.arrivals
        idx = [i for i, t in enumerate(times) if start <= t <= end + 0.005]
        if not idx:
            return None
        first = max(idx[0] - 1, 0)
        window = times[first: idx[-1] + 2]
        return max((b - a) * 1000 for a, b in itertools.pairwise(window)) if len(window) > 1 else None

    def max_gap(self, skip_first: float = 0.05) -> float:
        t0 = self.arrivals[0] + skip_first if self.arrivals else 0
        times = [t for t in self.arrivals if t >= t0]
        return max(((b - a) * 1000 for a, b in itertools.pairwise(times)), default=0.0)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))], 3)


def _summary(gaps: list[float]) -> dict[str, Any]:
    return {"gap_ms_p50": round(statistics.median(gaps), 3) if gaps else None,
            "gap_ms_max": round(max(gaps), 3) if gaps else None}


class Container:
    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"clbench-{uuid.uuid4().hex[:8]}"
        self.ip = ""

    async def start(self) -> None:
        # --user 0: CRIU needs to read the process's rlimits, which this machine's root may do only
        # for processes of its own uid (no CAP_SYS_RESOURCE); both methods run the same container.
        await podman("run", "-d", "--name", self.name, "--user", "0", "--ulimit", "nofile=1024:1024",
                     "--ulimit", "nproc=4096:4096", self.image)
        await self._wait_ip()

    async def _wait_ip(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.ip = (await podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", self.name)).strip()
            if self.ip:
                try:
                    _, w = await asyncio.wait_for(asyncio.open_connection(self.ip, DEMO_PORT), 2)
                    w.close()
                    return
                except OSError:
                    pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"container {self.name} did not answer on port {DEMO_PORT}")

    async def migrate(self, archive: Path) -> dict[str, float]:
        t0 = time.perf_counter()
        await podman("container", "checkpoint", "--export", str(archive), "--tcp-established", self.name)
        t1 = time.perf_counter()
        await podman("rm", "-f", self.name)
        await podman("container", "restore", "--import", str(archive), "--tcp-established")
        t2 = time.perf_counter()
        return {"checkpoint_ms": (t1 - t0) * 1000, "restore_ms": (t2 - t1) * 1000,
                "checkpoint_bytes": archive.stat().st_size}

    async def remove(self) -> None:
        await podman("rm", "-f", "-t", "0", self.name, check=False)


async def _stream(reader: asyncio.StreamReader, rx: Lines) -> None:
    while True:
        data = await reader.read(READ)
        if not data:
            return
        rx.feed(data, time.perf_counter())


async def _blob_mbps(send: Any, recv: Any, size: int) -> float:
    await send(f"BLOB {size}\n".encode())
    got = 0
    header = b""
    t0 = time.perf_counter()
    while b"\n" not in header:
        header += await recv()
    got = len(header.split(b"\n", 1)[1])
    while got < size:
        chunk = await recv()
        if not chunk:
            raise ConnectionError("stream ended during BLOB")
        got += len(chunk)
    return size * 8 / (time.perf_counter() - t0) / 1e6


async def run_fw(image: str, moves: int, interval: float, count: int, blob: int) -> dict[str, Any]:
    ctr = Container(image)
    fleet = Fleet()
    try:
        await ctr.start()
        a = await fleet.start("a")
        others = {n: await fleet.start(n, peers={"a": a.peer_listen}) for n in ("b", "c")}
        backend = f"{ctr.ip}:{DEMO_PORT}"
        ports = {"a": await a.put_service("demo", backend)}
        for n, d in others.items():
            ports[n] = await d.put_service("demo", backend)

        # throughput through the anchor, then through b -> a (forwarding)
        tput = SessionClient("127.0.0.1", ports["a"], fleet.credential("demo"))
        await tput.open()
        await tput.recv()  # greeting
        direct = await _blob_mbps(tput.send, tput.recv, blob)
        await tput.handover("127.0.0.1", ports["b"], target="a")
        forwarded = await _blob_mbps(tput.send, tput.recv, blob)
        await tput.end()
        await tput.close()

        mover = SessionClient("127.0.0.1", ports["a"], fleet.credential("demo"))
        await mover.open()
        by_r, by_w = await asyncio.open_connection("127.0.0.1", ports["a"])
        from cloudlet.protocol.wire import encode_header, read_reply
        by_w.write(encode_header(fleet.credential("demo"), ""))
        if not (await read_reply(by_r)).ok:
            raise RuntimeError("bystander refused")
        rx, by_rx = Lines(), Lines()
        stream_cmd = f"STREAM 1000 {count}\n".encode()
        await mover.send(stream_cmd)
        by_w.write(stream_cmd)
        by_task = asyncio.create_task(_stream(by_r, by_rx))

        async def mover_reader() -> None:
            while True:
                data = await mover.recv()
                if not data:
                    return
                rx.feed(data, time.perf_counter())

        task = asyncio.create_task(mover_reader())
        windows: list[tuple[float, float]] = []
        route = ["b", "c", "a"]
        await asyncio.sleep(0.3)
        for i in range(moves):  # the mover's application keeps reading while its device moves
            to = route[i % 3]
            t0 = time.perf_counter()
            await mover.handover("127.0.0.1", ports[to], target="" if to == "a" else "a", fin=True)
            await asyncio.sleep(interval)
            windows.append((t0, time.perf_counter() - interval + 0.05))
        task.cancel()
        by_task.cancel()
        await asyncio.gather(task, by_task, return_exceptions=True)
        await mover.end()
        await mover.close()
        by_w.close()
        gaps = [g for s, e in windows if (g := rx.gap_around(s, e)) is not None]
        lost, dup = rx.accounting()
        by_lost, by_dup = by_rx.accounting()
        return {"moves": len(windows), **_summary(gaps), "lines_lost": lost, "lines_duplicated": dup,
                "bystander_gap_ms_max": round(by_rx.max_gap(), 3), "bystander_lines_lost": by_lost,
                "throughput_mbps_direct": round(direct, 1), "throughput_mbps_forwarded": round(forwarded, 1)}
    finally:
        fleet.stop()
        await ctr.remove()


async def run_lm(image: str, moves: int, interval: float, count: int, workdir: Path) -> dict[str, Any]:
    ctr = Container(image)
    try:
        await ctr.start()
        conns = [await asyncio.open_connection(ctr.ip, DEMO_PORT) for _ in range(2)]
        rxs = [Lines(), Lines()]
        for _, w in conns:
            w.write(f"STREAM 1000 {count}\n".encode())
        tasks = [asyncio.create_task(_stream(r, rx)) for (r, _), rx in zip(conns, rxs, strict=True)]
        await asyncio.sleep(0.3)
        windows, costs = [], []
        for i in range(moves):
            t0 = time.perf_counter()
            costs.append(await ctr.migrate(workdir / f"checkpoint-{i}.tar"))
            await asyncio.sleep(interval)
            windows.append((t0, time.perf_counter() - interval + 0.05))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, w in conns:
            w.close()
        mover, bystander = rxs
        gaps = [g for s, e in windows if (g := mover.gap_around(s, e)) is not None]
        lost, dup = mover.accounting()
        by_lost, _ = bystander.accounting()
        return {"moves": len(windows), **_summary(gaps), "lines_lost": lost, "lines_duplicated": dup,
                "bystander_gap_ms_max": round(bystander.max_gap(), 3), "bystander_lines_lost": by_lost,
                "checkpoint_ms_p50": round(statistics.median(c["checkpoint_ms"] for c in costs), 1),
                "restore_ms_p50": round(statistics.median(c["restore_ms"] for c in costs), 1),
                "checkpoint_bytes": int(statistics.median(c["checkpoint_bytes"] for c in costs))}
    finally:
        await ctr.remove()


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from cloudlet.images import build_demo

    build_demo(args.image, log=lambda m: print(m, file=sys.stderr, flush=True))
    count = int((args.moves * (args.interval + 3.0) + 5) * 1000)
    result: dict[str, Any] = {"method_fw": await run_fw(args.image, args.moves, args.interval, count, args.blob)}
    version = criu_version()
    if version is None:
        result["method_lm"] = {"skipped": "no CRIU 4 found (run tools/install-criu.sh)"}
    else:
        workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"clbench-lm-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        try:
            result["method_lm"] = {"criu": version, **await run_lm(args.image, args.moves, args.interval, count, workdir)}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    fw, lm = result["method_fw"], result["method_lm"]
    if fw.get("gap_ms_p50") and lm.get("gap_ms_p50"):
        result["lm_over_fw_gap_ratio"] = round(lm["gap_ms_p50"] / fw["gap_ms_p50"], 1)
    return result


def _main(args: argparse.Namespace) -> int:
    result = asyncio.run(run_bench(args))
    if args.json:
        print(json.dumps(result))
    else:
        for method in ("method_fw", "method_lm"):
            print(f"{method[7:].upper()}:")
            for key, value in result[method].items():
                print(f"  {key:26} {value}")
        if "lm_over_fw_gap_ratio" in result:
            print(f"LM gap / FW gap: {result['lm_over_fw_gap_ratio']}x")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "migrate",
        help="handover by forwarding vs live migration with CRIU (service gap, bystander, throughput)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--moves", type=int, default=3, help="moves per method (default 3)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between moves (default 0.5)")
    p.add_argument("--blob", type=int, default=32 << 20, help="bytes per throughput sample (default 32 MiB)")
    p.add_argument("--image", default=DEMO_IMAGE, help=f"demo service image (default {DEMO_IMAGE})")
    p.set_defaults(func=_main)

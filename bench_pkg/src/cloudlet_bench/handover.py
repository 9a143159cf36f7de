"""`cloudlet bench handover`: service interruption and byte accounting across handovers.

Three real ``cloudlet sessiond`` processes on loopback (``a`` the anchor, ``b`` and ``c`` with ``a``
as a peer, over plain tcp or, with ``--hop ssh``, over the SSH tunnel through a private sshd). A
backend (its own process) pushes a numbered, timestamped 16-byte record every millisecond. A client
moves a -> b -> c -> a ... (naming the anchor ``a``), ``--moves`` times for each kind: ``fin`` (a
clean, make-before-break move), ``no_fin`` (the old connection is abandoned, as when a radio link is
lost; the anchor takes over) and ``no_fin_resumable`` (the same in protocol mode 2: the anchor
replays what the client did not receive). The top-level figures are those of ``fin``.

The application keeps reading while the client moves (as `cloudlet agent` does). Per kind:
``gap_ms`` = the longest time without a record around a move (from the last record before the move
to the first after it, the largest interval between consecutive arrivals; p50/p99/max over the
moves); ``no_move_gap_ms_*`` = the same measure over windows of the same length half-way between
moves (the baseline: the ticker's own 1 ms period plus scheduling jitter); ``move_ms`` = how long
``handover()`` took; ``bytes_lost``/``bytes_duplicated`` from the record numbers (16 bytes per record).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import statistics
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from cloudlet.client import SessionClient

from cloudlet_bench.harness.sessiond import Fleet

RECORD = struct.Struct("!IId")
MAGIC = 0xC10D1E70
PERIOD = 0.001


async def ticker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, period: float = PERIOD) -> None:
    """Backend: one record per ``period`` (1 ms), on an absolute schedule (catches up after stalls)."""
    seq = 0
    start = time.perf_counter()
    try:
        while True:
            now = time.perf_counter()
            due = int((now - start) / period) + 1
            out = bytearray()
            while seq < due:
                out += RECORD.pack(MAGIC, seq, time.time())
                seq += 1
            writer.write(out)
            await writer.drain()
            await asyncio.sleep(max(0.0, start + seq * period - time.perf_counter()))
    except (ConnectionError, RuntimeError, asyncio.CancelledError):  # uvloop: RuntimeError once closed
        writer.close()


def _backend_process(conn: Any, period: float = PERIOD) -> None:
    """Child process: the ticker backend (so its work does not delay the client being measured)."""

    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: ticker(r, w, period), "127.0.0.1", 0, backlog=4096)
        conn.send(srv.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


@dataclass
class Receiver:
    """Parses records (resynchronising on the magic after lost bytes) and notes arrival times."""

    seqs: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # each record's send time (the backend's wall clock)
    buf: bytearray = field(default_factory=bytearray)
    skipped: int = 0

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        buf = self.buf
        pos = 0
        size = RECORD.size
        while len(buf) - pos >= size:
            magic, seq, sent = RECORD.unpack_from(buf, pos)
            if magic != MAGIC:  # partial record lost: find the next record start
                nxt = buf.find(struct.pack("!I", MAGIC), pos + 1)
                if nxt < 0:
                    self.skipped += len(buf) - pos - 3
                    pos = len(buf) - 3
                    break
                self.skipped += nxt - pos
                pos = nxt
                continue
            self.seqs.append(seq)
            self.arrivals.append(now)
            self.sent.append(sent)
            pos += size
        del buf[:pos]


async def run_kind(fleet: Fleet, ports: dict[str, int], fin: bool, moves: int, interval: float,
                   resumable: bool = False) -> dict[str, Any]:
    client = SessionClient("127.0.0.1", ports["a"], fleet.credential("tick"), resumable=resumable)
    await client.open()
    rx = Receiver()

    async def receive() -> None:  # the application: reads all the time, also while the client moves
        while True:
            data = await client.recv()
            if not data:
                raise ConnectionError("session closed by the server")
            rx.feed(data, time.perf_counter())

    task = asyncio.create_task(receive())
    await asyncio.sleep(0.2)
    route = ["b", "c", "a"]
    marks: list[tuple[float, float]] = []  # (move start, move end)
    move_ms: list[float] = []  # how long client.handover() took
    for i in range(moves):
        await asyncio.sleep(interval)
        if task.done():
            task.result()
        to = route[i % 3]
        t0 = time.perf_counter()
        await client.handover("127.0.0.1", ports[to], target="" if to == "a" else "a", fin=fin)
        t1 = time.perf_counter()
        marks.append((t0, t1))
        move_ms.append((t1 - t0) * 1000)
    await asyncio.sleep(0.3)
    if task.done():
        task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.end()
    await client.close()
    gaps = [g for g in (_move_gap(rx.arrivals, t0, t1) for t0, t1 in marks) if g is not None]
    # baseline, side by side: the same measure over windows of the same length half-way between moves
    calm = [g for g in (_move_gap(rx.arrivals, t1 + interval / 2, t1 + interval / 2 + (t1 - t0)) for t0, t1 in marks)
            if g is not None]
    seen = set()
    dup = 0
    for s in rx.seqs:
        if s in seen:
            dup += 1
        seen.add(s)
    lost = (max(seen) - min(seen) + 1 - len(seen)) if seen else 0
    gaps.sort()
    return {
        "moves": len(marks),
        "gap_ms_p50": round(statistics.median(gaps), 3) if gaps else None,
        "gap_ms_p99": round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 3) if gaps else None,
        "gap_ms_max": round(max(gaps), 3) if gaps else None,
        "bytes_lost": lost * RECORD.size,
        "bytes_duplicated": dup * RECORD.size,
        "move_ms_p50": round(statistics.median(move_ms), 3) if move_ms else None,
        "no_move_gap_ms_p50": round(statistics.median(calm), 3) if calm else None,
        "no_move_gap_ms_max": round(max(calm), 3) if calm else None,
        "records_received": len(rx.seqs),
        "partial_bytes_skipped": rx.skipped,
    }


def _move_gap(arrivals: list[float], start: float, end: float) -> float | None:
    """The longest time without a record around a move, in ms.

    From the last record before the move started to the first record after it ended, the
    largest interval between two consecutive arrivals (records keep coming on the old connection
    while the new one attaches, so the stall can fall anywhere in that span).
    """
    i = bisect.bisect_left(arrivals, start) - 1
    j = bisect.bisect_right(arrivals, end)
    if i < 0 or j >= len(arrivals):
        return None
    return max(arrivals[k + 1] - arrivals[k] for k in range(i, j)) * 1000


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing

    from cloudlet.common.loop import raise_nofile_limit

    if args.storm:  # every session holds a few descriptors here and in each sessiond (inherited)
        raise_nofile_limit(8 * (args.storm + args.bystanders) + 1024)
    parent, child = multiprocessing.Pipe()
    backend = multiprocessing.get_context("fork").Process(target=_backend_process, args=(child,), daemon=True)
    backend.start()
    backend_addr = "127.0.0.1:%d" % parent.recv()
    storm_backend = None
    if args.storm:
        from cloudlet_bench.storm import STORM_PERIOD

        parent2, child2 = multiprocessing.Pipe()
        storm_backend = multiprocessing.get_context("fork").Process(target=_backend_process,
                                                                     args=(child2, STORM_PERIOD), daemon=True)
        storm_backend.start()
        storm_addr = "127.0.0.1:%d" % parent2.recv()
    fleet = Fleet()
    sshd = None
    try:
        a = await fleet.start("a", loop=args.loop)
        peer: str | dict[str, Any] = a.peer_listen
        if args.hop == "ssh":  # b and c reach a's peer endpoint through a real sshd, as in a fleet
            from cloudlet_bench.harness.sshd import TunnelSshd, sshd_argv_available

            missing = sshd_argv_available()
            if missing:
                raise SystemExit("--hop ssh: " + "; ".join(missing))
            sshd = TunnelSshd(endpoint=a.peer_listen)
            sshd.start()
            peer = sshd.peer_table("a")
        b = await fleet.start("b", peers={"a": peer}, loop=args.loop)
        c = await fleet.start("c", peers={"a": peer}, loop=args.loop)
        for d in (b, c):
            await d.wait_peers_up()
        ports = {d.name: await d.put_service("tick", backend_addr) for d in (a, b, c)}
        kinds = {
            "fin": await run_kind(fleet, ports, True, args.moves, args.interval),
            "no_fin": await run_kind(fleet, ports, False, args.moves, args.interval),
            "no_fin_resumable": await run_kind(fleet, ports, False, args.moves, args.interval, resumable=True),
        }
        fin = kinds["fin"]
        result = {"moves": sum(k["moves"] for k in kinds.values()), "gap_ms_p50": fin["gap_ms_p50"],
                  "gap_ms_p99": fin["gap_ms_p99"], "gap_ms_max": fin["gap_ms_max"], "bytes_lost": fin["bytes_lost"],
                  "bytes_duplicated": fin["bytes_duplicated"], "kinds": kinds, "record_period_ms": PERIOD * 1000,
                  "loop": args.loop, "client_loop": args.client_loop, "hop": args.hop}
        if args.storm:
            from cloudlet_bench.storm import run_storm

            storm_ports = {d.name: await d.put_service("storm", storm_addr) for d in (a, b, c)}
            result["storm"] = await run_storm(fleet, storm_ports, args.storm, args.bystanders, args.storm_seconds,
                                              args.storm_rate, _log)
        return result
    finally:
        fleet.stop()
        if sshd is not None:
            sshd.stop()
        backend.terminate()
        backend.join(5)
        if storm_backend is not None:
            storm_backend.terminate()
            storm_backend.join(5)


def _log(msg: str) -> None:
    import sys

    print(f"[handover] {msg}", file=sys.stderr, flush=True)


def _main(args: argparse.Namespace) -> int:
    from cloudlet.common.loop import use_fast_loop

    started = time.monotonic()
    use_fast_loop(args.client_loop)  # the device side, as `cloudlet agent` runs it
    result = asyncio.run(run_bench(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "handover", help="gap and lost/duplicated bytes across handovers (with and without FIN)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument("--moves", type=int, default=30, help="moves per kind (default 30)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between moves (default 0.1)")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="sessiond's event loop")
    p.add_argument("--hop", choices=["tcp", "ssh"], default="tcp",
                   help="how b and c reach a: plain tcp (default) or an SSH tunnel through a private sshd "
                   "(asyncssh client, OpenSSH server; needs root and openssh-server)")
    p.add_argument("--client-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="the client's event loop (default auto, as `cloudlet agent`: uvloop if installed)")
    p.add_argument("--storm", type=int, default=0, metavar="N",
                   help="then N sessions of one service move a -> b at once, then --storm-rate moves/s for "
                   "--storm-seconds (the `storm` key; cloudlet_bench.storm). Default 0: no storm")
    p.add_argument("--bystanders", type=int, default=100, help="storm: sessions that never move (default 100)")
    p.add_argument("--storm-seconds", type=float, default=5.0, help="storm: seconds of sustained moves (default 5)")
    p.add_argument("--storm-rate", type=float, default=10.0, help="storm: sustained moves per second (default 10)")
    p.set_defaults(func=_main)

"""`cloudlet bench restart`: live sessions while the anchor's and the forwarder's sessiond restart.

Two real ``cloudlet sessiond`` processes, each as systemd would run it with
``FileDescriptorStoreMax=`` (the harness's :class:`FdStore`): ``a`` the anchor, ``b`` reaching ``a``
over the SSH tunnel through a private sshd (``--hop ssh``; tcp without root). A ticker backend (its
own process) pushes a numbered 16-byte record every millisecond on every connection.
`cloudlet agent` (the library, in this process) carries ``--sessions`` connections: half attached at
``a``, half through ``b`` (forwarded). Then, for each kind, ``--restarts`` restarts alternating
between ``a`` and ``b``, one second apart:

- ``clean``: SIGTERM and a new process (what ``systemctl restart`` and an upgrade do): sessiond
  hands its sessions over (docs/sessiond.md, Restart), the agent attaches again;
- ``upgrade``: an in-place upgrade (``POST /v1/upgrade``, ``cloudlet sessiond --upgrade``): the
  successor starts and imports while the old process serves, brings its tunnels up, then takes
  every session, connection and listener over SCM_RIGHTS: the stall is the hand-over only;
- ``kill9``: SIGKILL and a new process (a crash): nothing is handed over.

Per kind: ``sessions``, ``sessions_kept`` (connections still open and streaming at the end),
``connections_closed`` (program connections that saw the end), ``bytes_lost``/``bytes_duplicated``
(from the record numbers of every connection), ``stall_ms_p50``/``p99``/``max``: per restart and
connection, the longest time without a record around the restart (the baseline beside it,
``calm_stall_ms_p99``: the same measure in the calm between two restarts). A clean restart's stall
is the time from SIGTERM until the new process serves (``restart_ms_p50``): nothing relays meanwhile.
An upgrade's ``restart_ms_p50`` is from the request until the successor serves, most of it while the
old process still relays.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cloudlet.client.agent import Agent

from cloudlet_bench.handover import Receiver, _backend_process
from cloudlet_bench.harness.issuer import SecretIssuer
from cloudlet_bench.harness.sessiond import FdStore, Fleet, SessiondProcess
from cloudlet_bench.harness.sshd import free_port


def log(msg: str) -> None:
    print(f"[restart] {msg}", file=sys.stderr, flush=True)


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    via: str
    rx: Receiver = field(default_factory=Receiver)
    closed: bool = False
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.rx.feed(data, time.perf_counter())
        except (ConnectionError, OSError):
            pass
        self.closed = True


def _gap(arrivals: list[float], start: float, end: float) -> float | None:
    i = max(0, bisect.bisect_left(arrivals, start) - 1)
    j = bisect.bisect_right(arrivals, end)
    if j - i < 2:
        return None
    return max(arrivals[k + 1] - arrivals[k] for k in range(i, min(j, len(arrivals) - 1))) * 1000


def _accounting(conns: list[Conn]) -> tuple[int, int]:
    lost = dup = 0
    for c in conns:
        seqs = c.rx.seqs
        seen: set[int] = set()
        for s in seqs:
            if s in seen:
                dup += 1
            seen.add(s)
        if seen:
            lost += max(seen) - min(seen) + 1 - len(seen)
    return lost * 16, dup * 16


def _wait_gone(proc: SessiondProcess, timeout: float = 30.0) -> None:
    if proc.pid == proc.proc.pid:
        proc.proc.wait(timeout)
        return
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.01)


async def run_kind(kind: str, args: argparse.Namespace, fleet: Fleet, daemons: dict[str, SessiondProcess],
                   stores: dict[str, FdStore], start: Any, ports: dict[str, int]) -> dict[str, Any]:
    cloudlets = {n: ("127.0.0.1", p) for n, p in ports.items()}
    agent = Agent(dict(cloudlets), "a", service="tick", fleet=SecretIssuer(fleet.secret, dict(cloudlets)),
                  apis={"a": "a", "b": "b"}, heal_timeout=30.0)
    await agent.start()
    conns: list[Conn] = []
    try:
        for i in range(args.sessions):
            r, w = await asyncio.open_connection(*agent.address)
            conns.append(Conn(r, w, "a" if i % 2 == 0 else "b"))
        while len(agent.carriers) < args.sessions:  # noqa: ASYNC110 (carriers appear as sessions open)
            await asyncio.sleep(0.01)
        for carrier in sorted(agent.carriers, key=lambda c: c.id)[1::2]:
            await carrier.move("b", fin=True)  # half of them forwarded by b
        for c in conns:
            c.task = asyncio.create_task(c.read())
        await asyncio.sleep(0.5)
        marks: list[tuple[float, float]] = []
        for i in range(args.restarts):
            name = "a" if i % 2 == 0 else "b"
            t0 = time.perf_counter()
            if kind == "upgrade":  # the successor starts first, then takes over (POST /v1/upgrade)
                await daemons[name].upgrade()
            else:
                proc = daemons[name]
                os.kill(proc.pid, signal.SIGTERM if kind == "clean" else signal.SIGKILL)
                await asyncio.to_thread(_wait_gone, proc)
                daemons[name] = await start(name)
            t1 = time.perf_counter()
            marks.append((t0, t1))
            log(f"{kind}: restart {i + 1}/{args.restarts} ({name}) took {(t1 - t0) * 1000:.0f} ms")
            await asyncio.sleep(args.interval)
        await asyncio.sleep(0.5)
        end = time.perf_counter()
        stalls, calm = [], []
        for t0, t1 in marks:
            for c in conns:
                g = _gap(c.rx.arrivals, t0, t1 + 0.5)
                if g is not None:
                    stalls.append(g)
                q = _gap(c.rx.arrivals, t1 + args.interval / 4, t1 + args.interval * 3 / 4)  # before the next one
                if q is not None:
                    calm.append(q)
        kept = [c for c in conns if not c.closed and c.rx.arrivals and c.rx.arrivals[-1] > end - 0.2]
        lost, dup = _accounting(conns)
        stalls.sort()
        calm.sort()

        def pct(values: list[float], q: float) -> float | None:
            return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

        return {"restarts": len(marks), "sessions": len(conns), "sessions_kept": len(kept),
                "connections_closed": sum(c.closed for c in conns), "bytes_lost": lost, "bytes_duplicated": dup,
                "stall_ms_p50": round(statistics.median(stalls), 1) if stalls else None,
                "stall_ms_p99": pct(stalls, 0.99), "stall_ms_max": round(max(stalls), 1) if stalls else None,
                "calm_stall_ms_p99": pct(calm, 0.99), "restart_ms_p50": round(statistics.median(
                    [(t1 - t0) * 1000 for t0, t1 in marks]), 1) if marks else None,
                "heals": agent.heals, "records_received": sum(len(c.rx.seqs) for c in conns)}
    finally:
        for c in conns:
            if c.task is not None:
                c.task.cancel()
            c.writer.close()
        await agent.stop()


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    backend = multiprocessing.get_context("fork").Process(target=_backend_process, args=(child,), daemon=True)
    backend.start()
    backend_addr = "127.0.0.1:%d" % parent.recv()
    fleet = Fleet()
    sshd = None
    stores: dict[str, FdStore] = {}
    for n in ("a", "b"):
        (fleet.dir / f"store-{n}").mkdir()
        stores[n] = FdStore(fleet.dir / f"store-{n}")
    daemons: dict[str, SessiondProcess] = {}
    try:
        hop = args.hop
        if hop == "ssh":
            from cloudlet_bench.harness.sshd import TunnelSshd, sshd_argv_available

            missing = sshd_argv_available()
            if missing:
                log("--hop ssh not possible here (" + "; ".join(missing) + "): using tcp")
                hop = "tcp"
        a_peer = f"127.0.0.1:{free_port()}"
        peer: Any = a_peer
        if hop == "ssh":
            sshd = TunnelSshd(endpoint=a_peer)
            sshd.start()
            peer = sshd.peer_table("a")
        async def start(name: str) -> SessiondProcess:
            from cloudlet_bench.harness.sessiond import start_sessiond

            opts: dict[str, Any] = {"peer_listen": a_peer} if name == "a" else {"peers": {"a": peer}}
            sp = await start_sessiond(fleet.dir / name, fleet.secret_file, name, fdstore=stores[name],
                                      log_level="warning", **opts)
            if name == "b":
                await sp.wait_peers_up()
            return sp

        for n in ("a", "b"):
            daemons[n] = await start(n)
        ports = {n: await d.put_service("tick", backend_addr) for n, d in daemons.items()}
        log(f"hop {hop}; {args.sessions} sessions, {args.restarts} restarts per kind")
        kinds = {}
        for kind in ("clean", "upgrade", "kill9"):
            kinds[kind] = await run_kind(kind, args, fleet, daemons, stores, start, ports)
        clean = kinds["clean"]
        return {**kinds, "hop": hop, "targets": {
            "clean_all_kept": clean["sessions_kept"] == clean["sessions"],
            "clean_nothing_lost_or_duplicated": clean["bytes_lost"] == 0 and clean["bytes_duplicated"] == 0,
            "clean_none_closed": clean["connections_closed"] == 0,
            "clean_stall_p99_under_200ms": clean["stall_ms_p99"] is not None and clean["stall_ms_p99"] < 200,
            "upgrade_all_kept": kinds["upgrade"]["sessions_kept"] == kinds["upgrade"]["sessions"],
            "upgrade_nothing_lost_or_duplicated": kinds["upgrade"]["bytes_lost"] == 0
            and kinds["upgrade"]["bytes_duplicated"] == 0,
            "upgrade_stall_p99_under_200ms": kinds["upgrade"]["stall_ms_p99"] is not None
            and kinds["upgrade"]["stall_ms_p99"] < 200}}
    finally:
        for d in daemons.values():
            d.stop()
        fleet.stop()
        for store in stores.values():
            store.close()
        if sshd is not None:
            sshd.cleanup()
        backend.terminate()
        backend.join(5)



def _main(args: argparse.Namespace) -> int:
    from cloudlet.common.loop import use_fast_loop

    if args.sessions < 2 or args.restarts < 1:
        raise SystemExit("bench restart: --sessions >= 2, --restarts >= 1")
    started = time.monotonic()
    use_fast_loop("auto")
    result = asyncio.run(run_bench(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "restart", help="live sessions while the anchor's and the forwarder's sessiond restart (clean, kill -9)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument("--sessions", type=int, default=8, help="sessions, half of them forwarded (default 8)")
    p.add_argument("--restarts", type=int, default=4, help="restarts per kind, alternating a and b (default 4)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between restarts (default 1)")
    p.add_argument("--hop", choices=["ssh", "tcp"], default="ssh", help="how b reaches a (default ssh)")
    p.set_defaults(func=_main)

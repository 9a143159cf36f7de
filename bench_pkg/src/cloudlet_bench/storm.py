"""`cloudlet bench handover --storm N`: a train passes a cloudlet: N sessions of one service move at once.

Three sessiond processes as in the handover bench (``a`` the anchor, ``b`` and ``c`` forwarding to
it). A ticker backend of its own process pushes a numbered, timestamped record every
``STORM_PERIOD`` (100 ms) on each of ``N`` moving sessions and ``--bystanders`` sessions that never move (all
anchored at ``a``, the application reading all the time). Then:

1. **train**: all ``N`` move from ``a`` to ``b`` at once (make-before-break ``handover()``, concurrent);
   ``moves_per_s`` = N / the time from the first move's start to the last one's end;
2. **sustained**: for ``--storm-seconds`` seconds, ``--storm-rate`` moves a second, session after
   session, between ``b`` and ``c`` (each still anchored at ``a``).

Per move the ``gap_ms`` is the longest time without a record around it (as in the handover bench:
it includes the record period, shown as ``record_period_ms``; the same measure between moves is the
baseline ``no_move_gap_ms_p50``). ``delay_ms`` is the longest extra one-way delay of a record around
the move over that session's calm median (period-free). Bystanders: ``bystander_stall_ms_max`` is the
longest extra delay of any bystander record during the train over the bystanders' calm median.
Bytes lost and duplicated come from every session's record numbers.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from cloudlet.client import SessionClient

from cloudlet_bench.handover import RECORD, Receiver, _move_gap

STORM_PERIOD = 0.1  # 10 records/s per session: 1,100 sessions leave two cores room to move them


@dataclass
class Tracked:
    client: SessionClient
    rx: Receiver = field(default_factory=Receiver)
    delays: list[float] = field(default_factory=list)  # arrival - send (wall clock), per record
    marks: list[tuple[float, float]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def receive(self) -> None:
        while True:
            data = await self.client.recv()
            if not data:
                raise ConnectionError("session closed by the server")
            before = len(self.rx.seqs)
            now, wall = time.perf_counter(), time.time()
            self.rx.feed(data, now)
            # the records just parsed carry their send time: their one-way delay (same machine clock)
            for sent in self.rx.sent[before:]:
                self.delays.append((wall - sent) * 1000)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def _accounting(tracked: list[Tracked]) -> tuple[int, int]:
    lost = dup = 0
    for t in tracked:
        seen: set[int] = set()
        for s in t.rx.seqs:
            if s in seen:
                dup += 1
            seen.add(s)
        if seen:
            lost += max(seen) - min(seen) + 1 - len(seen)
    return lost * RECORD.size, dup * RECORD.size


def _extra_delay(t: Tracked, start: float, end: float) -> float | None:
    """The longest delay of a record that arrived in [start, end] over the session's calm median."""
    arr = t.rx.arrivals
    window = [d for a, d in zip(arr, t.delays, strict=False) if start <= a <= end]
    calm = [d for a, d in zip(arr, t.delays, strict=False) if a < start - 0.05]
    if not window or not calm:
        return None
    return max(0.0, max(window) - statistics.median(calm))


async def run_storm(fleet: Any, ports: dict[str, int], sessions: int, bystanders: int, seconds: float,
                    rate: float, log: Any) -> dict[str, Any]:
    movers = [Tracked(SessionClient("127.0.0.1", ports["a"], fleet.credential("storm"), resumable=True))
              for _ in range(sessions)]
    still = [Tracked(SessionClient("127.0.0.1", ports["a"], fleet.credential("storm"), resumable=True))
             for _ in range(bystanders)]
    everyone = movers + still
    for i in range(0, len(everyone), 100):  # open in batches: a device does not open 1,100 at once
        await asyncio.gather(*(t.client.open() for t in everyone[i:i + 100]))
    for t in everyone:
        t.task = asyncio.create_task(t.receive())
    log(f"storm: {sessions} sessions and {bystanders} bystanders streaming")
    await asyncio.sleep(1.5)  # the calm before: every session's baseline delay

    async def move(t: Tracked, to: str) -> None:
        t0 = time.perf_counter()
        await t.client.handover("127.0.0.1", ports[to], target="a", fin=True)
        t.marks.append((t0, time.perf_counter()))

    train0 = time.perf_counter()
    await asyncio.gather(*(move(t, "b") for t in movers))
    train1 = time.perf_counter()
    log(f"storm: train of {sessions} moves in {(train1 - train0) * 1000:.0f} ms")
    await asyncio.sleep(0.5)
    sustained0 = time.perf_counter()
    count = int(seconds * rate)
    where = {id(t): "b" for t in movers}
    pending = []
    for i in range(count):  # `rate` moves a second, on schedule, each to the other forwarder
        await asyncio.sleep(max(0.0, sustained0 + i / rate - time.perf_counter()))
        t = movers[i % len(movers)]
        where[id(t)] = "c" if where[id(t)] == "b" else "b"
        pending.append(asyncio.create_task(move(t, where[id(t)])))
    await asyncio.gather(*pending)
    sustained1 = time.perf_counter()
    await asyncio.sleep(0.5)
    for t in everyone:
        if t.task is not None and t.task.done():
            t.task.result()  # a session that broke is an error of the bench run, not a figure
    for t in everyone:
        if t.task is not None:
            t.task.cancel()
    await asyncio.gather(*(t.task for t in everyone if t.task is not None), return_exceptions=True)
    gaps, delays, calm = [], [], []
    for t in movers:
        for t0, t1 in t.marks:
            g = _move_gap(t.rx.arrivals, t0, t1)
            if g is not None:
                gaps.append(g)
            d = _extra_delay(t, t0, t1 + 0.2)
            if d is not None:
                delays.append(d)
        # baseline: the same measure in the calm before the train, over a window as long as a move
        g = _move_gap(t.rx.arrivals, train0 - 0.8, train0 - 0.8 + (t.marks[0][1] - t.marks[0][0]) + STORM_PERIOD)
        if g is not None:
            calm.append(g)
    stall = [d for d in (_extra_delay(t, train0, train1 + 0.2) for t in still) if d is not None]
    lost, dup = _accounting(everyone)
    for t in everyone:
        await t.client.end()
        await t.client.close()
    train_moves_per_s = sessions / (train1 - train0) if train1 > train0 else None
    return {
        "sessions": sessions,
        "bystanders": bystanders,
        "moves": sum(len(t.marks) for t in movers),
        "moves_per_s": round(train_moves_per_s, 1) if train_moves_per_s else None,
        "train_ms": round((train1 - train0) * 1000, 1),
        "sustained_moves": count,
        "sustained_moves_per_s": round(count / (sustained1 - sustained0), 2) if count else None,
        "gap_ms_p50": _pct(gaps, 0.5),
        "gap_ms_p99": _pct(gaps, 0.99),
        "gap_ms_max": _pct(gaps, 1.0),
        "no_move_gap_ms_p50": _pct(calm, 0.5),
        "delay_ms_p50": _pct(delays, 0.5),
        "delay_ms_p99": _pct(delays, 0.99),
        "bytes_lost": lost,
        "bytes_duplicated": dup,
        "bystander_stall_ms_max": _pct(stall, 1.0),
        "bystander_stall_ms_p50": _pct(stall, 0.5),
        "record_period_ms": STORM_PERIOD * 1000,
        "records_received": sum(len(t.rx.seqs) for t in everyone),
    }

"""The sessiond-wide budget for bytes held for detached sessions: back-pressure, nothing lost.

Reproduces the finding: each detached session held up to ``buffer_bytes`` (plus socket buffers)
with no global cap, so many detached sessions could take the daemon's memory. With
``held_bytes_budget`` the backends of detached sessions are paused once the budget is spent, and
read again as the held bytes drain; every byte still arrives once, in order.
"""

from __future__ import annotations

import asyncio

from cloudlet.client import SessionClient
from support.sessiond import Backend, issue, wait_for

SESSIONS = 8
PER_SESSION = 1_500_000
READ = 256 * 1024  # one socket read of the event loop, which may land before the pause takes effect
BUDGET = 256 * 1024


async def test_held_bytes_stay_within_the_budget_and_nothing_is_lost(make_sessiond, backend: Backend) -> None:
    a = await make_sessiond("a", buffer_bytes=1 << 20, held_bytes_budget=BUDGET, splice_threshold_bytes=-1)
    entry, _ = await a.put_service("svc", backend.address)
    clients, conns = [], []
    for _ in range(SESSIONS):
        c = SessionClient("127.0.0.1", entry.port, issue("svc"))
        await c.open()
        clients.append(c)
        conns.append(await backend.next_conn())
    for c in clients:
        await c.detach()
    await wait_for(lambda: all(s.state == "detached" for s in a.manager.sessions.values()), what="all detached")
    payloads = [bytes([i]) * PER_SESSION for i in range(SESSIONS)]
    writers = [asyncio.create_task(_write(conn, data)) for conn, data in zip(conns, payloads, strict=True)]
    peak = 0
    for _ in range(60):  # the backends write 12 MB in all; each session alone could hold 1 MiB (buffer_bytes)
        await asyncio.sleep(0.05)
        peak = max(peak, a.manager.held_total)
    assert a.manager.held_total == sum(s.buffered for s in a.manager.sessions.values())
    assert peak <= BUDGET + SESSIONS * READ, peak  # without the budget: about SESSIONS * 1 MiB
    assert a.metrics.held_budget_reached._value.get() >= 1  # type: ignore[attr-defined]
    for c, data in zip(clients, payloads, strict=True):  # resume one by one: each gets its bytes, exactly
        await c.open()
        assert await asyncio.wait_for(c.recv_exactly(PER_SESSION), 30) == data
    await asyncio.wait_for(asyncio.gather(*writers), 30)
    assert a.manager.held_total == 0 and not a.manager.budget_paused
    for c in clients:
        await c.close()


async def _write(conn, data: bytes) -> None:  # type: ignore[no-untyped-def]
    conn.writer.write(data)
    await conn.writer.drain()

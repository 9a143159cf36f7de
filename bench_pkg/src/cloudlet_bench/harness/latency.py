"""A TCP proxy that delays what it carries, changeable while it runs (toxiproxy's latency toxic).

This kernel has no ``netem`` qdisc, so a link's delay comes from user space: every chunk read from
one side is written to the other ``delay`` seconds later (each direction, so a round trip costs
``2 * delay``), in order. ``delay`` may change at any time; a chunk is never delivered before one
read earlier (order holds when the delay shrinks). ``cut()`` is a link that stops carrying
anything (packets dropped, no RST: connections hang, new ones are accepted and go nowhere) until
``restore()``; ``reset()`` aborts every connection (an RST to both sides).

On a machine with netem, ``tc qdisc add dev IF root netem delay 20ms`` on the device's link does the
same for the whole link (docs/bench.md, mobility).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass(eq=False)
class LatencyProxy:
    target: tuple[str, int]
    listen: tuple[str, int] = ("127.0.0.1", 0)
    delay: float = 0.0  # one way, seconds
    queue_chunks: int = 256  # per direction: reading pauses beyond this (flow control)
    server: asyncio.Server | None = None
    connections: int = 0
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)
    _transports: set[asyncio.WriteTransport] = field(default_factory=set)
    _open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._open.set()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> LatencyProxy:
        self.server = await asyncio.start_server(self._handle, *self.listen, limit=CHUNK)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.reset()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def reset(self) -> None:
        for tr in list(self._transports):
            tr.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._transports.add(writer.transport)
        try:
            await self._open.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target, limit=CHUNK)
        except (OSError, asyncio.CancelledError):
            self._transports.discard(writer.transport)
            writer.transport.abort()
            return
        self._transports.add(up_writer.transport)
        pipes = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._transports.discard(w.transport)
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.queue_chunks)

        async def read() -> None:
            last = 0.0
            try:
                while True:
                    data = await src.read(CHUNK)
                    if not data:
                        break
                    last = max(loop.time() + self.delay, last)
                    await queue.put((last, data))
            except (ConnectionError, OSError):
                dst.transport.abort()  # a reset passes on as a reset
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
                return
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()
                dst.write(data)
                await dst.drain()
            if not dst.transport.is_closing() and dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

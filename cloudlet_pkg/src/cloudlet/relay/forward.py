"""The forwarding pipe: a client connection relayed to a peer cloudlet's channel, no session state.

Half-closes are passed on both ways; flow control pauses the client while the channel's write
buffer is above its high-water mark, and the channel pump while the client's is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from cloudlet.common.logs import event
from cloudlet.relay.flow import PEER, WRITE_HIGH, write_buffer_size
from cloudlet.relay.interfaces import ClientSide, ServiceEntry

log = logging.getLogger(__name__)

PEER_READ_SIZE = 256 * 1024


def close_writer(writer: Any) -> None:
    try:
        writer.close()
    except Exception:  # already closed or broken: nothing left to release
        pass


class Forward:
    """A forwarded connection: client <-> peer channel, passing half-closes; no session state.

    It is the :class:`~cloudlet.relay.interfaces.ClientSink` of its client connection; ``on_close``
    is called once when it ends (the manager forgets it and releases the channel).
    """

    __slots__ = ("conn", "reader", "writer", "id", "service", "peer", "since", "bytes_up", "bytes_down",
                 "counted_up", "counted_down", "task", "drain_task", "up_eof", "down_eof", "writable", "closed",
                 "loop", "on_close", "device")

    def __init__(self, conn: ClientSide, reader: Any, writer: Any, sid: str, service: ServiceEntry, peer: str,
                 loop: asyncio.AbstractEventLoop, on_close: Callable[[Forward], None], device: str = "") -> None:
        self.conn = conn
        self.device = device
        self.reader = reader
        self.writer = writer
        self.id = sid
        self.service = service
        self.peer = peer
        self.loop = loop
        self.on_close = on_close
        self.since = time.time()
        self.bytes_up = self.bytes_down = self.counted_up = self.counted_down = 0
        self.task: asyncio.Task[None] | None = None
        self.drain_task: asyncio.Task[None] | None = None
        self.up_eof = self.down_eof = self.closed = False
        self.writable = asyncio.Event()  # the client connection can take more
        self.writable.set()

    def start(self) -> None:
        self.task = self.loop.create_task(self._pump())

    # -- ClientSink ----------------------------------------------------------------------------
    def client_data(self, conn: ClientSide, data: bytes) -> None:
        self.bytes_up += len(data)
        self.writer.write(data)
        if self.drain_task is None and write_buffer_size(self.writer) > WRITE_HIGH:
            conn.gate.pause(PEER)
            self.drain_task = self.loop.create_task(self._drain())

    def client_fin(self, conn: ClientSide) -> None:
        self.up_eof = True
        try:
            self.writer.write_eof()
        except Exception:
            self.close()
            return
        if self.down_eof:
            self.close()

    def client_lost(self, conn: ClientSide) -> None:
        self.close()

    def client_write_paused(self, conn: ClientSide, paused: bool) -> None:
        if paused:
            self.writable.clear()
        else:
            self.writable.set()

    # -- the channel side ----------------------------------------------------------------------
    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except Exception:  # the pump sees the broken channel and closes
            pass
        self.drain_task = None
        if not self.closed:
            self.conn.gate.resume(PEER)

    async def _pump(self) -> None:
        conn = self.conn
        try:
            while True:
                data = await self.reader.read(PEER_READ_SIZE)
                if not data:
                    break
                self.bytes_down += len(data)
                conn.write(data)
                if not self.writable.is_set():
                    await self.writable.wait()
            self.down_eof = True
            if not conn.is_closing():
                conn.write_eof()
            if self.up_eof:
                self.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer channel broke: make the client see it
            event(log, logging.INFO, "peer channel broke", session=self.id, peer=self.peer, error=str(exc) or type(exc).__name__)
            conn.abort()
            self.close()

    def close(self) -> None:
        """End the forward. Orderly (FIN) only once the anchor ended its side: the session's own end
        passes through as a FIN; anything else (the channel or peer failing, this sessiond stopping,
        the client going) resets the client connection, so the client re-attaches instead of taking a
        broken path for the end of its session (docs/protocol.md)."""
        if self.closed:
            return
        self.closed = True
        self.conn.bind(None)
        if not self.conn.is_closing():
            if self.down_eof:
                self.conn.close()
            else:
                self.conn.abort()
        close_writer(self.writer)
        for task in (self.task, self.drain_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self.writable.set()
        self.on_close(self)
        event(log, logging.INFO, "forward closed", session=self.id, peer=self.peer,
              bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service.name, "state": "forwarded", "since": round(self.since, 3),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "buffered": 0, "peer": self.peer}

"""The forwarding pipe: a client connection relayed to a peer cloudlet's channel, no session state.

Half-closes are passed on both ways; flow control pauses the client while the channel's write
buffer is above its high-water mark, and the channel pump while the client's is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from cloudlet.common.logs import event
from cloudlet.relay.session import WRITE_HIGH

if TYPE_CHECKING:
    from cloudlet.relay.connection import ServerConnection
    from cloudlet.relay.manager import ServiceEntry, SessionManager


log = logging.getLogger(__name__)


PEER_READ_SIZE = 256 * 1024


def close_writer(writer: Any) -> None:
    try:
        writer.close()
    except Exception:  # already closed or broken: nothing left to release
        pass


def channel_closed(m: SessionManager, peer: str) -> None:
    hook = getattr(m.connector, "channel_closed", None)
    if hook is not None:
        hook(peer)


def _write_buffer_size(writer: Any) -> int:
    transport = getattr(writer, "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        return int(transport.get_write_buffer_size())
    channel = getattr(writer, "channel", None)
    if channel is not None and hasattr(channel, "get_write_buffer_size"):
        return int(channel.get_write_buffer_size())
    return WRITE_HIGH + 1  # unknown: always wait for drain()


class Forward:
    """A forwarded connection: client <-> peer channel, passing half-closes; no session state."""

    __slots__ = ("manager", "conn", "reader", "writer", "id", "service", "peer", "since", "bytes_up",
                 "bytes_down", "counted_up", "counted_down", "task", "up_eof", "down_eof", "writable",
                 "draining", "closed")

    def __init__(self, manager: SessionManager, conn: ServerConnection, reader: Any, writer: Any, sid: str,
                 service: ServiceEntry, peer: str) -> None:
        self.manager = manager
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.id = sid
        self.service = service
        self.peer = peer
        self.since = time.time()
        self.bytes_up = self.bytes_down = self.counted_up = self.counted_down = 0
        self.task: asyncio.Task[None] | None = None
        self.up_eof = self.down_eof = self.draining = self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()

    def start(self) -> None:
        self.task = self.manager.loop.create_task(self._pump())

    def client_data(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.writer.write(data)
        if not self.draining and _write_buffer_size(self.writer) > WRITE_HIGH:
            self.draining = True
            self.conn.transport.pause_reading()
            self.manager.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except Exception:  # the pump sees the broken channel and closes
            pass
        self.draining = False
        if not self.closed and not self.conn.transport.is_closing():
            self.conn.transport.resume_reading()

    def client_eof(self) -> None:
        self.up_eof = True
        try:
            self.writer.write_eof()
        except Exception:
            self.close()
            return
        if self.down_eof:
            self.close()

    async def _pump(self) -> None:
        conn_t = self.conn.transport
        try:
            while True:
                data = await self.reader.read(PEER_READ_SIZE)
                if not data:
                    break
                self.bytes_down += len(data)
                conn_t.write(data)
                if not self.writable.is_set():
                    await self.writable.wait()
            self.down_eof = True
            if not conn_t.is_closing():
                conn_t.write_eof()
            if self.up_eof:
                self.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer channel broke: make the client see it
            event(log, logging.INFO, "peer channel broke", session=self.id, peer=self.peer, error=str(exc) or type(exc).__name__)
            conn_t.abort()
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.forward = None
        if not self.conn.transport.is_closing():
            self.conn.transport.close()
        close_writer(self.writer)
        channel_closed(self.manager, self.peer)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.writable.set()
        self.manager.forwards.discard(self)
        self.manager.count_bytes(self)
        event(log, logging.INFO, "forward closed", session=self.id, peer=self.peer,
              bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service.name, "state": "forwarded", "since": round(self.since, 3),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "buffered": 0, "peer": self.peer}

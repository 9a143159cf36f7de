"""`cloudlet.client`: open a session, send and receive, hand over, resume, end.

Example::

    c = SessionClient("10.0.0.1", 31001, credential)        # cloudlet A, the anchor
    await c.open()
    await c.send(b"hello"); data = await c.recv()
    await c.handover("10.0.0.2", 31001, target="a")         # to cloudlet B, naming the anchor
    await c.end()

or with names: ``SessionClient(..., cloudlets={"a": ("10.0.0.1", 31001), "b": ("10.0.0.2", 31001)},
anchor="a")`` and ``await c.handover(to="b")`` (the target is set to the anchor for you).

A clean move (``detach``/``handover``) half-closes the old connection and reads it to EOF, so every
byte the backend sent arrives exactly once and in order: what came on the old connection first
(kept in the client and returned by ``recv`` before anything else), then the held bytes on the new one.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from cloudlet.protocol import HEADER_AFTER_FIN, Op, ProtocolError, Reply, Status, encode_header, read_reply

READ_SIZE = 256 * 1024


class SessionRefused(Exception):
    """The sessiond answered with a non-OK status."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.status.name}: {reply.message}")
        self.reply = reply
        self.status = reply.status


async def attach(host: str, port: int, credential: str, target: str = "", *, op: Op = Op.ATTACH,
                 timeout: float = 10.0, flags: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Reply]:
    """Connect and send a header; returns the streams and the OK reply or raises ``SessionRefused``."""
    # asyncio.timeout, not wait_for: no extra task per step on the handover path (Python 3.11)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(encode_header(credential, target, op, flags=flags))
        async with asyncio.timeout(timeout):
            reply = await read_reply(reader)
    except BaseException:
        writer.close()
        raise
    if not reply.ok:
        writer.close()
        raise SessionRefused(reply)
    return reader, writer, reply


async def end_session(host: str, port: int, credential: str, target: str = "", timeout: float = 10.0) -> Reply:
    """Send END for ``credential`` on a fresh connection (through ``target`` if it is forwarded)."""
    reader, writer, reply = await attach(host, port, credential, target, op=Op.END, timeout=timeout)
    writer.close()
    return reply


@dataclass
class SessionClient:
    host: str
    port: int
    credential: str
    target: str = ""
    timeout: float = 10.0
    cloudlets: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> session port there
    anchor: str = ""  # the cloudlet that issued the credential (for handover(to=...))
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    last_reply: Reply | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _abandoned: list[asyncio.StreamWriter] = field(default_factory=list)

    async def open(self) -> Reply:
        """Attach (a new session, or resume/take over an existing one)."""
        self.reader, self.writer, self.last_reply = await attach(self.host, self.port, self.credential, self.target,
                                                                 timeout=self.timeout)
        return self.last_reply

    async def send(self, data: bytes) -> None:
        if self.writer is None:
            raise ConnectionError("session not attached")
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, n: int = READ_SIZE) -> bytes:
        """Bytes from the backend (first those drained from a previous connection); b"" at EOF."""
        if self._pending:
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data
        if self.reader is None:
            raise ConnectionError("session not attached")
        return await self.reader.read(n)

    async def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.recv(n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    async def detach(self) -> bytes:
        """Clean detach: half-close, read the old connection to EOF (kept for ``recv``), close."""
        if self.writer is None or self.reader is None:
            return b""
        writer, reader = self.writer, self.reader
        self.writer = self.reader = None
        drained = bytearray()
        try:
            if writer.can_write_eof():
                writer.write_eof()
            while True:
                async with asyncio.timeout(self.timeout):
                    chunk = await reader.read(READ_SIZE)
                if not chunk:
                    break
                drained += chunk
        finally:
            writer.close()
        self._pending += drained
        return bytes(drained)

    def drop(self) -> None:
        """Abandon the connection without FIN, as a device losing its radio link would.

        The socket is left open and unread (nothing reaches the server, which learns only when a
        new connection takes the session over); ``close()`` releases it later.
        """
        if self.writer is not None:
            transport: Any = self.writer.transport
            transport.pause_reading()
            self._abandoned.append(self.writer)
        self.reader = self.writer = None

    async def handover(self, host: str | None = None, port: int | None = None, target: str = "", *,
                       to: str | None = None, fin: bool = True) -> Reply:
        """Move to another sessiond, keeping every byte exactly once and in order.

        With ``fin`` (a clean move) the old connection is half-closed and, *at the same time*, the
        new one attaches with the AFTER_FIN flag; the old one is read to EOF (kept for ``recv``)
        before anything from the new one. Whichever reaches the anchor first, the anchor switches
        the stream at one point: everything before it on the old connection, the rest on the new.
        Without ``fin`` the old connection is abandoned and the anchor takes the session over.
        ``to`` names a cloudlet of ``cloudlets`` instead of ``host``/``port``/``target``.
        """
        if to is not None:
            if to not in self.cloudlets:
                raise KeyError(f"unknown cloudlet {to!r} (known: {', '.join(sorted(self.cloudlets))})")
            host, port = self.cloudlets[to]
            target = "" if to == self.anchor else self.anchor
        if host is None or port is None:
            raise ValueError("handover needs host and port, or to=NAME")
        self.host, self.port, self.target = host, port, target
        if not fin or self.writer is None or self.reader is None:
            self.drop()
            return await self.open()
        old_reader, old_writer = self.reader, self.writer
        self.reader = self.writer = None
        if old_writer.can_write_eof():
            old_writer.write_eof()

        async def drain() -> bytes:
            out = bytearray()
            while True:
                async with asyncio.timeout(self.timeout):
                    chunk = await old_reader.read(READ_SIZE)
                if not chunk:
                    break
                out += chunk
            return bytes(out)

        drained = asyncio.ensure_future(drain())
        try:
            reader, writer, reply = await attach(host, port, self.credential, target, timeout=self.timeout,
                                                 flags=HEADER_AFTER_FIN)
        except BaseException:
            drained.cancel()
            old_writer.close()
            raise
        try:
            self._pending += await drained
        except (OSError, asyncio.TimeoutError):
            pass  # the old path broke: what it still carried is lost, as without FIN
        finally:
            old_writer.close()
        self.reader, self.writer, self.last_reply = reader, writer, reply
        return reply

    async def resume(self) -> Reply:
        """Reattach to the same place after a drop or a detach."""
        if self.writer is not None:
            self.drop()
        return await self.open()

    async def end(self) -> Reply:
        """End the session (closes the backend connection); the credential is then refused."""
        try:
            return await end_session(self.host, self.port, self.credential, self.target, self.timeout)
        finally:  # the server closes the attached connection itself; ours goes after END, not before
            await self.close()

    async def close(self) -> None:
        """Close without ending (the session is kept for the grace period)."""
        for w in self._abandoned:
            w.transport.abort()
        self._abandoned.clear()
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


__all__ = ["SessionClient", "SessionRefused", "attach", "end_session", "ProtocolError", "Status"]

"""`cloudlet.client`: open a session, send and receive, hand over, resume, end.

Example::

    c = SessionClient("10.0.0.1", 31001, credential)        # cloudlet A, the anchor
    await c.open()
    await c.send(b"hello"); data = await c.recv()
    await c.handover("10.0.0.2", 31001, target="a")         # to cloudlet B, naming the anchor
    await c.end()

or with names: ``SessionClient(..., cloudlets={"a": ("10.0.0.1", 31001), "b": ("10.0.0.2", 31001)},
anchor="a")`` and ``await c.handover(to="b")`` (the target is set to the anchor for you).

A clean move (``handover``) is make-before-break: the new connection attaches while the old one
still carries the stream, the anchor switches at one byte, and ``recv`` (which may keep running in
another task) returns the old connection up to its EOF and then the new one, so every byte the
backend sent arrives exactly once and in order and the stream pauses only for the switch itself.
``detach`` half-closes and reads the connection to EOF (kept for ``recv``); the session then waits
at the anchor for the grace period.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cloudlet.protocol.replay import ReplayRing
from cloudlet.protocol.wire import HEADER_AFTER_FIN, Mode, Op, ProtocolError, Reply, Status, encode_header, read_reply

READ_SIZE = 256 * 1024


class SessionRefused(Exception):
    """The sessiond answered with a non-OK status."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.status.name}: {reply.message}")
        self.reply = reply
        self.status = reply.status


async def attach(host: str, port: int, credential: str, target: str = "", *, op: Op = Op.ATTACH,
                 timeout: float = 10.0, flags: int = 0,
                 down_received: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Reply]:
    """Connect and send a header; returns the streams and the OK reply or raises ``SessionRefused``.

    ``down_received`` (not None) asks for mode 2 (resumable) with that count of backend bytes held.
    """
    # asyncio.timeout, not wait_for: no extra task per step on the handover path (Python 3.11)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = Mode.RAW if down_received is None else Mode.RESUMABLE
        writer.write(encode_header(credential, target, op, mode, flags, down_received or 0))
        async with asyncio.timeout(timeout):
            reply = await read_reply(reader)
    except BaseException:
        writer.close()
        raise
    if not reply.ok:
        writer.close()
        raise SessionRefused(reply)
    if op == Op.ATTACH and down_received is not None and (reply.up_received is None or reply.down_start is None):
        writer.close()
        raise ProtocolError(Status.UNSUPPORTED_MODE, "the sessiond did not answer mode 2 with offsets")
    return reader, writer, reply


async def end_session(host: str, port: int, credential: str, target: str = "", timeout: float = 10.0) -> Reply:
    """Send END for ``credential`` on a fresh connection (through ``target`` if it is forwarded)."""
    reader, writer, reply = await attach(host, port, credential, target, op=Op.END, timeout=timeout)
    writer.close()
    return reply


class StreamGap(ConnectionError):
    """Mode 2: a connection would start after bytes the client never received (they were lost)."""


@dataclass
class SessionClient:
    host: str
    port: int
    credential: str
    target: str = ""
    timeout: float = 10.0
    cloudlets: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> session port there
    anchor: str = ""  # the cloudlet that issued the credential (for handover(to=...))
    resumable: bool = False  # protocol mode 2: a move without FIN loses nothing (byte offsets, replay)
    resend_bytes: int = 8 << 20  # mode 2: how many sent bytes are kept to resend after a move
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    last_reply: Reply | None = None
    down_offset: int = 0  # mode 2: backend bytes taken from connections so far (the stream position)
    up_offset: int = 0  # mode 2: bytes sent so far
    _pending: bytearray = field(default_factory=bytearray)
    _abandoned: list[asyncio.StreamWriter] = field(default_factory=list)
    # connections left by moves, read to EOF before ``reader`` (writer None: dropped, never closed by us)
    _old: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter | None]] = field(default_factory=deque)
    _moving: asyncio.Future[None] | None = None
    _next: dict[asyncio.StreamReader, int] = field(default_factory=dict)  # mode 2: stream offset read next
    _sent: ReplayRing | None = None

    def __post_init__(self) -> None:
        if self.resumable:
            self._sent = ReplayRing(self.resend_bytes)

    async def _attach(self, host: str, port: int, target: str, flags: int = 0) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter, Reply]:
        """Attach and, in mode 2, resend what the anchor lacks before anything else is sent."""
        reader, writer, reply = await attach(host, port, self.credential, target, timeout=self.timeout, flags=flags,
                                             down_received=self.down_offset if self.resumable else None)
        if self._sent is not None and reply.up_received is not None and reply.down_start is not None:
            resend = self._sent.since(reply.up_received)
            if resend is None:
                writer.close()
                raise StreamGap(f"the anchor has {reply.up_received} of the {self.up_offset} bytes sent and the "
                                f"rest is no longer kept here (resend_bytes = {self.resend_bytes})")
            if resend:
                writer.write(resend)
            self._next[reader] = reply.down_start
        return reader, writer, reply

    def _take(self, reader: asyncio.StreamReader, data: bytes) -> bytes:
        """Mode 2: drop bytes already taken from an earlier connection; detect a gap."""
        if self._sent is None:
            return data
        at = self._next[reader]
        self._next[reader] = at + len(data)
        if at > self.down_offset:
            raise StreamGap(f"bytes {self.down_offset}..{at} of the stream never arrived")
        skip = self.down_offset - at
        if skip:
            data = data[skip:]
        self.down_offset += len(data)
        return data

    def _retire(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        self._next.pop(reader, None)
        if writer is not None:
            writer.close()

    async def open(self) -> Reply:
        """Attach (a new session, or resume/take over an existing one)."""
        self.reader, self.writer, self.last_reply = await self._attach(self.host, self.port, self.target)
        return self.last_reply

    async def send(self, data: bytes) -> None:
        """Send to the backend; during a move, on the old connection until the new one has the session.

        While a move without FIN has no connection, it waits for the move to finish.
        """
        writer = self.writer
        while writer is None and self._moving is not None:
            await asyncio.wait([self._moving])
            writer = self.writer
        if writer is None:
            raise ConnectionError("session not attached")
        writer.write(data)
        if self._sent is not None:
            self._sent.append(data)
            self.up_offset += len(data)
        await writer.drain()

    async def recv(self, n: int = READ_SIZE) -> bytes:
        """Bytes from the backend, in order across moves; b"" at EOF (the session is over).

        May run in its own task while ``handover`` runs in another: it reads the old connection to
        its EOF (which the anchor sends when it switches), then the new one. In mode 2 a gap (an old
        connection that broke before its EOF) is repaired by attaching again where the client is.
        """
        while True:
            try:
                data = await self._recv_once(n)
            except StreamGap:
                if self._moving is not None:
                    await asyncio.wait([self._moving])
                await self._recover()
                continue
            if data is not None:
                return data

    async def _recv_once(self, n: int) -> bytes | None:
        """Bytes, b"" at the end of the session, or None to be called again."""
        if self._pending:
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data
        if self._old:  # connections left by a move: read them to EOF first
            old_reader, old_writer = self._old[0]
            try:
                data = await old_reader.read(n)
            except (ConnectionError, OSError):  # the old path broke (reset): what it carried is done
                data = b""
            if data:
                return self._take(old_reader, data) or None
            if self._old and self._old[0][0] is old_reader:
                self._old.popleft()
                self._retire(old_reader, old_writer)
            return None
        reader = self.reader
        if reader is None:
            if self._moving is not None:
                await asyncio.wait([self._moving])
                return None
            raise ConnectionError("session not attached")
        data = await reader.read(n)
        if data:
            return self._take(reader, data) or None
        if self._moving is not None:  # the anchor switched to the new connection: wait for it
            await asyncio.wait([self._moving])
            return None
        if reader is not self.reader or self._old:
            return None
        return b""

    async def _recover(self) -> None:
        """Mode 2: take the session over where the client is now; the anchor replays what is missing."""
        reader, writer, reply = await self._attach(self.host, self.port, self.target)
        while self._old:
            self._retire(*self._old.popleft())
        if self.reader is not None:
            self._retire(self.reader, self.writer)
        self.reader, self.writer, self.last_reply = reader, writer, reply

    def clear_pending(self) -> None:
        """Forget bytes kept by ``detach`` (once the caller has passed them on)."""
        self._pending.clear()

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
            while self._old:  # a previous move's connection comes first
                old_reader, old_writer = self._old.popleft()
                async with asyncio.timeout(self.timeout):
                    drained += self._take(old_reader, await old_reader.read())
                self._retire(old_reader, old_writer)
            while True:
                async with asyncio.timeout(self.timeout):
                    chunk = await reader.read(READ_SIZE)
                if not chunk:
                    break
                drained += self._take(reader, chunk)
        finally:
            self._retire(reader, writer)
        self._pending += drained
        return bytes(drained)

    def drop(self) -> None:
        """Abandon the connection without FIN, as a device losing its radio link would.

        The socket is left open and unread (nothing reaches the server, which learns only when a
        new connection takes the session over); ``close()`` releases it later. Bytes that had
        already arrived are still returned by ``recv``, before those of the next connection.
        """
        if self.writer is not None and self.reader is not None:
            transport: Any = self.writer.transport
            transport.pause_reading()
            self._abandoned.append(self.writer)
            self.reader.feed_eof()  # a recv waiting on it returns what had arrived, then moves on
            self._old.append((self.reader, None))
        self.reader = self.writer = None

    async def handover(self, host: str | None = None, port: int | None = None, target: str = "", *,
                       to: str | None = None, fin: bool = True) -> Reply:
        """Move to another sessiond, keeping every byte exactly once and in order.

        With ``fin`` (a clean move, make-before-break) the new connection attaches with the
        AFTER_FIN flag while the old one keeps carrying the stream. On the OK reply the anchor has
        switched (it half-closed the old path after its last byte); only then is the old
        connection half-closed, so the anchor reads what the client sent on it and then the new
        one. ``recv`` returns the rest of the old connection before anything from the new one, and
        can keep running in another task throughout. If the new cloudlet refuses or cannot be
        reached, the old connection is left as it was. Without ``fin`` the old connection is
        abandoned (``drop``) and the anchor takes the session over. ``to`` names a cloudlet of
        ``cloudlets`` instead of ``host``/``port``/``target``.
        """
        if to is not None:
            if to not in self.cloudlets:
                raise KeyError(f"unknown cloudlet {to!r} (known: {', '.join(sorted(self.cloudlets))})")
            host, port = self.cloudlets[to]
            target = "" if to == self.anchor else self.anchor
        if host is None or port is None:
            raise ValueError("handover needs host and port, or to=NAME")
        if self._moving is not None:
            raise RuntimeError("a handover is already in progress")
        moving = self._moving = asyncio.get_running_loop().create_future()
        try:
            if not fin or self.writer is None or self.reader is None:
                previous = (self.host, self.port, self.target)
                self.host, self.port, self.target = host, port, target
                self.drop()
                try:
                    return await self.open()
                except BaseException:
                    self.host, self.port, self.target = previous
                    raise
            reader, writer, reply = await self._attach(host, port, target, flags=HEADER_AFTER_FIN)
            old_reader, old_writer = self.reader, self.writer
            self._old.append((old_reader, old_writer))
            self.reader, self.writer, self.last_reply = reader, writer, reply
            self.host, self.port, self.target = host, port, target
            if old_writer.can_write_eof():
                old_writer.write_eof()  # after the switch: the anchor then reads the new connection
            # the anchor half-closed the old path at the switch; should it never arrive, give up on it
            asyncio.get_running_loop().call_later(self.timeout, _abort_if_open, old_reader, old_writer)
            return reply
        finally:
            self._moving = None
            moving.set_result(None)

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
        while self._old:
            self._retire(*self._old.popleft())
        if self.reader is not None:
            self._retire(self.reader, self.writer)
        self.reader = self.writer = None


def _abort_if_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The old connection of a move did not reach EOF in time: what it still carried is lost."""
    if not reader.at_eof() and not writer.transport.is_closing():
        writer.transport.abort()


__all__ = ["SessionClient", "SessionRefused", "StreamGap", "attach", "end_session", "ProtocolError", "Status"]


PING_CREDENTIAL = "ping"  # any ASCII: a PING's credential is not checked


async def ping(host: str, port: int, timeout: float = 2.0) -> float:
    """One nearness probe (op PING) to a session port; the round trip in seconds (connect included).

    Raises ``OSError``/``asyncio.TimeoutError`` if the cloudlet does not answer, ``SessionRefused``
    if it answers with anything but OK.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(encode_header(PING_CREDENTIAL, op=Op.PING))
            reply = await read_reply(reader)
        finally:
            writer.close()
    if not reply.ok:
        raise SessionRefused(reply)
    return loop.time() - started

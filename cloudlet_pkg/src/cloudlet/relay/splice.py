"""Zero-copy fast path for busy attached sessions: ``os.splice`` through a pipe per direction.

A session starts on the asyncio Protocol path. Once an attachment has moved ``splice_threshold_bytes``
and both transports have nothing buffered, the session is *upgraded*: both transports stop reading,
the relay takes duplicates of the two socket descriptors, and bytes go socket -> pipe -> socket inside
the kernel, driven by ``loop.add_reader``/``add_writer`` (level-triggered, non-blocking). Idle sessions
never upgrade, so they cost no extra descriptors.

Any event other than data (client FIN, backend EOF, an error, takeover, end) first *leaves* splice
mode: what is still in the pipes is read out and handed to the transports (so ordering and
exactly-once delivery hold), the duplicates are closed, and the session's Protocol logic takes over.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
AVAILABLE = hasattr(os, "splice")


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # pipe-max-size lower than ours: the default size works too
        pass
    return r, w


class _Direction:
    __slots__ = ("relay", "src", "dst", "pr", "pw", "pending", "reading", "writing", "up")

    def __init__(self, relay: "SpliceRelay", src: int, dst: int, up: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.pr, self.pw = _pipe()
        self.pending = 0
        self.reading = False
        self.writing = False
        self.up = up

    def start(self) -> None:
        self.relay.loop.add_reader(self.src, self.on_readable)
        self.reading = True

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src, self.pw, PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.fail(src_of=self, exc=exc)
            return
        if n == 0:
            self.relay.eof(self)
            return
        self.pending += n
        self.flush()

    def on_writable(self) -> None:
        self.flush()

    def flush(self) -> None:
        relay = self.relay
        while self.pending:
            try:
                m = os.splice(self.pr, self.dst, self.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                relay.fail(dst_of=self, exc=exc)
                return
            if m <= 0:
                break
            self.pending -= m
            relay.on_moved(self.up, m)
        loop = relay.loop
        if self.pending:
            if self.reading:
                loop.remove_reader(self.src)
                self.reading = False
            if not self.writing:
                loop.add_writer(self.dst, self.on_writable)
                self.writing = True
        else:
            if self.writing:
                loop.remove_writer(self.dst)
                self.writing = False
            if not self.reading:
                loop.add_reader(self.src, self.on_readable)
                self.reading = True

    def stop(self) -> bytes:
        """Unregister and return the bytes still in the pipe (read out, in order)."""
        loop = self.relay.loop
        if self.reading:
            loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.dst)
            self.writing = False
        out = bytearray()
        while self.pending > 0:
            try:
                chunk = os.read(self.pr, self.pending)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
            self.pending -= len(chunk)
        os.close(self.pr)
        os.close(self.pw)
        return bytes(out)


class SpliceRelay:
    """Both directions of one attached session, in splice mode.

    It reports to its owner through callbacks only: ``on_moved(up, n)`` after bytes reached the other
    socket, ``on_eof(up)`` when a side half-closed, ``on_fail(client_side)`` when a socket failed.
    Before handling either of the last two, the owner calls :meth:`leave`.
    """

    __slots__ = ("loop", "cfd", "ufd", "up", "down", "active", "on_moved", "on_eof", "on_fail")

    def __init__(self, loop: asyncio.AbstractEventLoop, client_sock: socket.socket, upstream_sock: socket.socket,
                 on_moved: Callable[[bool, int], None], on_eof: Callable[[bool], None],
                 on_fail: Callable[[bool], None]) -> None:
        self.loop = loop
        self.on_moved = on_moved
        self.on_eof = on_eof
        self.on_fail = on_fail
        self.cfd = os.dup(client_sock.fileno())
        try:
            self.ufd = os.dup(upstream_sock.fileno())
        except OSError:
            os.close(self.cfd)
            raise
        try:
            self.up = _Direction(self, self.cfd, self.ufd, True)
            try:
                self.down = _Direction(self, self.ufd, self.cfd, False)
            except OSError:
                self.up.stop()
                raise
        except OSError:
            os.close(self.cfd)
            os.close(self.ufd)
            raise
        self.active = True

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def leave(self) -> tuple[bytes, bytes]:
        """Stop; return what is still in the pipes ``(to_upstream, to_client)``, in order, for the transports."""
        if not self.active:
            return b"", b""
        self.active = False
        to_upstream = self.up.stop()
        to_client = self.down.stop()
        os.close(self.cfd)
        os.close(self.ufd)
        return to_upstream, to_client

    def eof(self, direction: _Direction) -> None:
        self.on_eof(direction.up)

    def fail(self, exc: OSError, src_of: _Direction | None = None, dst_of: _Direction | None = None) -> None:
        d = src_of or dst_of
        assert d is not None
        self.on_fail((src_of is not None and d.up) or (dst_of is not None and not d.up))

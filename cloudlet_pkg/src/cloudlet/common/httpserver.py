"""Serving an aiohttp application under a flood: admission, a request-head timeout, quiet refusals.

aiohttp's server has a keep-alive timeout but no bound on connections and no deadline for the
first request head, so idle or slow connections can pile up until the process runs out of
descriptors. :class:`HttpServer` serves the application's request handler (``runner.server``,
public API) behind a thin guard protocol per connection that:

- admits the connection through an :class:`~cloudlet.common.admission.Admission` (beyond
  ``max_open`` it answers ``503`` at once with the daemons' error JSON, code ``overloaded``; among
  pending connections the oldest is evicted first, so a flood cannot lock real clients out);
- closes a connection whose first request head has not arrived within ``header_timeout``;
- leaves everything else to aiohttp (``keepalive_timeout`` closes idle keep-alive connections).

TCP and Unix sockets alike (the controller's API, the sessiond's control API and metrics port, the
agent's control socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cloudlet.common.admission import Admission, bytes_waiting, default_limits

log = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"


def overloaded_response(message: str) -> bytes:
    body = json.dumps({"error": {"code": "overloaded", "message": message}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Guard(asyncio.Protocol):
    """One connection: admission and the first-request deadline, then aiohttp's handler does the rest."""

    __slots__ = ("server", "inner", "transport", "timer", "tail", "admitted")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: Any = transport
        self.transport = t
        peer = t.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        talking = bytes_waiting(t.get_extra_info("socket")) > 0
        if not self.server.admission.accept(self, source, self._evict, talking=talking):
            # answer, send FIN, and read until the client closes (bounded): closing at once with the
            # request unread would reset the connection and lose the answer
            t.write(overloaded_response(f"{self.server.admission.name}: too many connections; retry"))
            if t.can_write_eof():
                t.write_eof()
            self.timer = asyncio.get_running_loop().call_later(2.0, t.abort)
            return
        self.admitted = True
        self.timer = asyncio.get_running_loop().call_later(self.server.header_timeout, self._head_timeout)
        self.inner = self.server.protocol_factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return  # a refused connection's request: ignored
        if self.timer is not None:
            if not self.tail:
                self.server.admission.talking(self)
            if HEAD_END in self.tail + data:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
                self.server.admission.started(self)
            else:
                self.tail = (self.tail + data)[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None:  # a refused connection: the client read the answer and closed
            if self.transport is not None:
                self.transport.close()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted:
            self.admitted = False
            self.server.admission.closed(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def _head_timeout(self) -> None:
        self.timer = None
        self.server.head_timeouts += 1
        if self.transport is not None:
            self.transport.abort()

    def _evict(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    """An aiohttp application on TCP or a Unix socket, guarded (see the module docstring)."""

    def __init__(self, app: web.Application, name: str, *, admission: Admission | None = None,
                 header_timeout: float = 10.0, keepalive_timeout: float = 15.0) -> None:
        if admission is None:
            max_open, max_pending, per_source = default_limits()
            admission = Admission(name, max_open, max_pending, per_source)
        self.admission = admission
        self.header_timeout = header_timeout
        self.head_timeouts = 0
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=keepalive_timeout)
        self._server: asyncio.AbstractServer | None = None
        self.protocol_factory: Callable[[], asyncio.Protocol] = lambda: None  # type: ignore[assignment,return-value]

    async def _setup(self) -> None:
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        self.protocol_factory = server  # web.Server() builds a RequestHandler

    async def start_tcp(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                        backlog: int = 1024) -> tuple[str, int]:
        await self._setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Guard(self), host or None, port, reuse_address=True,
                                                ssl=ssl_context, backlog=backlog)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def start_unix(self, path: str, mode: int = 0o660, backlog: int = 1024) -> None:
        await self._setup()
        loop = asyncio.get_running_loop()
        if os.path.exists(path):
            os.unlink(path)
        self._server = await loop.create_unix_server(lambda: _Guard(self), path, backlog=backlog)
        os.chmod(path, mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.runner.cleanup()

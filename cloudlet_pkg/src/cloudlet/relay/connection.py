"""The server side of every session connection: header, dispatch, then a pipe.

:class:`ServerConnection` is the asyncio Protocol of each accepted connection, on a service port
or on the peer endpoint. It reads the header (bounded size, bounded time), dispatches, and then
hands its bytes to a session (anchor) or to a :class:`~cloudlet.relay.forward.Forward` (forwarder).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cloudlet.common.logs import event
from cloudlet.protocol.wire import (
    HeaderParser,
    Mode,
    Op,
    ProtocolError,
    Status,
    encode_reply,
    read_reply,
)
from cloudlet.relay.forward import Forward, channel_closed, close_writer
from cloudlet.relay.hop import PeerError
from cloudlet.relay.manager import ServiceEntry, SessionManager
from cloudlet.relay.session import WRITE_HIGH, Refused, Session

log = logging.getLogger(__name__)


class ServerConnection(asyncio.Protocol):
    """One accepted connection; ``service`` is None on the peer endpoint."""

    __slots__ = ("manager", "service", "transport", "parser", "timer", "session", "forward", "lost", "task",
                 "up_start", "up_skip")

    def __init__(self, manager: SessionManager, service: ServiceEntry | None) -> None:
        self.manager = manager
        self.service = service
        self.transport: Any = None
        self.parser: HeaderParser | None = HeaderParser()
        self.timer: asyncio.TimerHandle | None = None
        self.session: Session | None = None
        self.forward: Forward | None = None
        self.lost = False
        self.task: asyncio.Task[None] | None = None
        self.up_start = 0  # mode 2: the session's bytes_up when this connection attached (told to the client)
        self.up_skip = 0  # mode 2: first bytes of this connection that a drained one already delivered

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        self.timer = self.manager.loop.call_later(self.manager.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s is not None:  # the hot path
            if self.up_skip:
                if len(data) <= self.up_skip:
                    self.up_skip -= len(data)
                    return
                data, self.up_skip = data[self.up_skip :], 0
            s.upstream.transport.write(data)  # type: ignore[union-attr]
            s.bytes_up += len(data)
            if s.bytes_up > s.splice_up:
                s.try_splice()
            return
        f = self.forward
        if f is not None:
            f.client_data(data)
            return
        parser = self.parser
        if parser is None:
            return
        try:
            result = parser.feed(data)
        except ProtocolError as exc:
            self._bad_header(exc.status, exc.message)
            return
        if result is None:
            return
        self.parser = None
        self._cancel_timer()
        self.transport.pause_reading()
        header, rest = result
        self.task = self.manager.loop.create_task(self._dispatch(header, rest))

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.client_gone(self, fin=True)
        elif self.forward is not None:
            self.forward.client_eof()
        elif self.parser is not None:
            if self.parser.empty:  # a port probe (health check, wait_for): not an error
                self.parser = None
                self._cancel_timer()
                self.transport.close()
                return True
            self._bad_header(Status.BAD_HEADER, "truncated header: connection half-closed before the header was complete")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self.session is not None:
            self.session.client_gone(self, fin=False)
        elif self.forward is not None:
            self.forward.close()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.client_write_pressure(self, True)
        elif self.forward is not None:
            self.forward.writable.clear()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.client_write_pressure(self, False)
        elif self.forward is not None:
            self.forward.writable.set()

    # -- header handling ---------------------------------------------------------------------
    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _header_timeout(self) -> None:
        self.timer = None
        if self.parser is not None:
            self._bad_header(Status.HEADER_TIMEOUT, f"no complete header within {self.manager.header_timeout:g} s")

    def _bad_header(self, status: Status, message: str) -> None:
        self.parser = None
        self._cancel_timer()
        self.manager.metrics.header_errors.inc()
        self.refuse(status, message)

    def refuse(self, status: Status, message: str, session: str | None = None) -> None:
        self.manager.metrics.refusals.labels(status.name).inc()
        event(log, logging.INFO, "connection refused", code=status.name, reason=message, session=session,
              service=self.service.name if self.service else None, peer_endpoint=self.service is None)
        if not self.transport.is_closing():
            self.transport.write(encode_reply(status, message))
            self.transport.close()

    async def _dispatch(self, header: Any, rest: bytes) -> None:
        m = self.manager
        sid: str | None = None
        try:
            if self.service is None:  # peer endpoint: the service comes from the credential
                if not header.is_local and header.target != m.cloudlet:
                    raise Refused(Status.BAD_TARGET, "the peer endpoint does not forward further: name the anchor cloudlet")
                cred = m.check(header.credential, None)
                sid = cred.nonce
                service = m.services.get(cred.service)
                if service is None:
                    raise Refused(Status.UNKNOWN_SERVICE, f"no service {cred.service!r} on cloudlet {m.cloudlet!r}")
                via_peer = True
            else:
                service = self.service
                if m.services.get(service.name) is not service:
                    raise Refused(Status.UNKNOWN_SERVICE, f"service {service.name!r} is being removed")
                cred = m.check(header.credential, service.name)
                sid = cred.nonce
                via_peer = False
                if not header.is_local and header.target != m.cloudlet:
                    await self._forward(header, cred.nonce, service, rest)
                    return
            if header.op == Op.END:
                existed = m.end_credential(cred, "ended_by_client")
                self.transport.write(encode_reply(Status.OK, "session ended" if existed else "no live session; credential retired"))
                self.transport.close()
                return
            await m.attach(self, cred, service, rest, via_peer, header.after_fin,
                           header.down_received if header.mode == Mode.RESUMABLE else None)
            if via_peer:
                m.metrics.handovers.labels("in").inc()
        except Refused as exc:
            self.refuse(exc.status, exc.message, sid)
        except Exception as exc:  # never let one connection take the daemon down
            log.exception("internal error while dispatching a connection")
            self.refuse(Status.INTERNAL, f"internal error: {type(exc).__name__}", sid)

    async def _forward(self, header: Any, sid: str, service: ServiceEntry, rest: bytes) -> None:
        m = self.manager
        if m.connector is None:
            raise Refused(Status.UNKNOWN_PEER, f"cloudlet {m.cloudlet!r} has no peers configured")
        try:
            reader, writer = await m.connector.open(header.target)
        except PeerError as exc:
            raise Refused(exc.status, str(exc)) from None
        try:
            writer.write(header.encode(target=""))  # same op, mode, flags and offset; the peer is the anchor
            async with asyncio.timeout(m.header_timeout + m.backend_connect_timeout):
                reply = await read_reply(reader)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ProtocolError) as exc:
            close_writer(writer)
            channel_closed(m, header.target)
            raise Refused(Status.PEER_UNAVAILABLE, f"peer {header.target!r} gave no reply: {exc or type(exc).__name__}") from None
        except Exception as exc:  # tunnel errors (asyncssh.Error, ...)
            close_writer(writer)
            channel_closed(m, header.target)
            raise Refused(Status.PEER_UNAVAILABLE, f"peer {header.target!r} failed: {exc or type(exc).__name__}") from None
        if self.lost:
            close_writer(writer)
            channel_closed(m, header.target)
            return
        self.transport.write(reply.encode())
        if not reply.ok or header.op == Op.END:
            close_writer(writer)
            channel_closed(m, header.target)
            self.transport.close()
            event(log, logging.INFO, "forwarded request answered", session=sid, peer=header.target,
                  code=reply.status.name, op=header.op.name)
            return
        fwd = Forward(m, self, reader, writer, sid, service, header.target)
        self.forward = fwd
        m.forwards.add(fwd)
        m.metrics.handovers.labels("out").inc()
        event(log, logging.INFO, "session forwarded", session=sid, service=service.name, peer=header.target)
        if rest:
            fwd.client_data(rest)
        fwd.start()
        if not fwd.draining:
            self.transport.resume_reading()

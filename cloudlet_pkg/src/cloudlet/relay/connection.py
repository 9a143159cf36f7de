"""The server side of every session connection: header, dispatch, then a pipe.

:class:`ServerConnection` is the asyncio Protocol of each accepted connection, on a service port
or on the peer endpoint. It reads the header (bounded size, bounded time), dispatches, and then
hands its bytes to a session (anchor) or to a :class:`~cloudlet.relay.forward.Forward` (forwarder).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from typing import Any

from cloudlet.common.admission import bytes_waiting
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
from cloudlet.relay.core import Refused
from cloudlet.relay.flow import DISPATCH, WRITE_HIGH, ReadGate
from cloudlet.relay.forward import Forward, close_writer
from cloudlet.relay.hop import PeerError
from cloudlet.relay.interfaces import ClientSink, ServiceEntry
from cloudlet.relay.manager import SessionManager

log = logging.getLogger(__name__)

_AIDS = itertools.count(1)
_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


class ServerConnection(asyncio.Protocol):
    """One accepted connection; ``service`` is None on the peer endpoint.

    Until its header is handled it belongs to nobody; then it is bound to a session or a forward
    (its :class:`~cloudlet.relay.interfaces.ClientSink`) and passes every event to it. It is the
    :class:`~cloudlet.relay.interfaces.ClientSide` those see.
    """

    __slots__ = ("manager", "service", "transport", "parser", "timer", "sink", "lost", "task", "aid", "gate", "admitted")

    def __init__(self, manager: SessionManager, service: ServiceEntry | None) -> None:
        self.manager = manager
        self.service = service
        self.transport: Any = None
        self.parser: HeaderParser | None = HeaderParser()
        self.timer: asyncio.TimerHandle | None = None
        self.sink: ClientSink | None = None
        self.lost = False
        self.task: asyncio.Task[None] | None = None
        self.aid = next(_AIDS)
        self.gate: ReadGate = None  # type: ignore[assignment]  # set in connection_made
        self.admitted = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.gate = ReadGate(transport)  # type: ignore[arg-type]
        admission = self.manager.admission_for(self.service is None)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        waiting = bytes_waiting(transport.get_extra_info("socket"))
        if not admission.accept(self, source, self._evicted, talking=waiting > 0):
            transport.abort()  # type: ignore[attr-defined]  # beyond max_connections: refused at once, counted, logged
            return
        self.admitted = True
        self._linger(True)  # a close that is not close() (abort, a crash of this process) is a reset
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        if self.parser is not None:  # (None: a connection handed over by the previous process, bound already)
            self.timer = self.manager.loop.call_later(self.manager.header_timeout, self._header_timeout)

    def _linger(self, reset_on_close: bool) -> None:
        """``SO_LINGER`` 0: the kernel answers any close of the socket with RST instead of FIN.

        The protocol's FIN from a server means "the session is over"; a path that breaks (a
        forwarder or tunnel failing, this sessiond killed) must not look like that, so every
        connection resets unless this code closes it on purpose (:meth:`close`, :meth:`write_eof`).
        """
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if reset_on_close else _LINGER_OFF)
        except OSError:  # already closed
            pass

    def adopt(self) -> bool:
        """A connection handed over by the previous sessiond process, past its header and bound."""
        if self.lost or not self.admitted:
            return False
        self.manager.admission_for(self.service is None).started(self)
        return True

    def _evicted(self) -> None:
        """The oldest pending connection gives way to a new one (a flood of header-less connections)."""
        self.parser = None
        self._cancel_timer()
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:  # the hot path
            sink.client_data(self, data)
            return
        parser = self.parser
        if parser is None:
            return
        if parser.empty:
            self.manager.admission_for(self.service is None).talking(self)
        try:
            result = parser.feed(data)
        except ProtocolError as exc:
            self._bad_header(exc.status, exc.message)
            return
        if result is None:
            return
        self.parser = None
        self._cancel_timer()
        self.manager.admission_for(self.service is None).started(self)
        self.gate.pause(DISPATCH)
        header, rest = result
        self.task = self.manager.loop.create_task(self._dispatch(header, rest))

    def eof_received(self) -> bool:
        if self.sink is not None:
            self.sink.client_fin(self)
        elif self.parser is not None:
            if self.parser.empty:  # a port probe (health check, wait_for): not an error
                self.parser = None
                self._cancel_timer()
                self.close()
                return True
            self._bad_header(Status.BAD_HEADER, "truncated header: connection half-closed before the header was complete")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self.admitted:
            self.admitted = False
            self.manager.admission_for(self.service is None).closed(self)
        if self.sink is not None:
            self.sink.client_lost(self)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.client_write_paused(self, True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.client_write_paused(self, False)

    # -- ClientSide ----------------------------------------------------------------------------
    def bind(self, sink: ClientSink | None) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def close(self) -> None:
        """Orderly: what was written goes out, then FIN (the session, or this request, is over)."""
        self._linger(False)
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def write_buffer_size(self) -> int:
        return int(self.transport.get_write_buffer_size())

    def socket(self) -> socket.socket | None:
        """The socket (uvloop gives a socket-like object with ``fileno()``), for the splice relay."""
        sock = self.transport.get_extra_info("socket")
        return sock if hasattr(sock, "fileno") else None

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
        self.manager.refusal_log.event(logging.INFO, "connection refused", status.name, code=status.name, reason=message,
                                       session=session, service=self.service.name if self.service else None,
                                       peer_endpoint=self.service is None)
        if not self.transport.is_closing():
            self.transport.write(encode_reply(status, message))
            self.close()

    async def _dispatch(self, header: Any, rest: bytes) -> None:
        m = self.manager
        sid: str | None = None
        try:
            if header.op == Op.PING:  # a nearness probe: no credential check, no session, no log
                self.transport.write(encode_reply(Status.OK, "pong"))
                self.close()
                m.metrics.pings.inc()
                return
            if self.service is None:  # peer endpoint: the service comes from the credential
                if not header.is_local and header.target != m.cloudlet:
                    raise Refused(Status.BAD_TARGET, "the peer endpoint does not forward further: name the anchor cloudlet")
                cred = m.check(header.credential, None)
                sid = cred.nonce
                if cred.anchor != m.cloudlet:
                    raise Refused(Status.WRONG_ANCHOR, f"this session is anchored at cloudlet {cred.anchor!r}, "
                                  f"not {m.cloudlet!r}: the forwarder must name the anchor")
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
                    if header.target != cred.anchor:
                        raise Refused(Status.BAD_TARGET, f"this session is anchored at cloudlet {cred.anchor!r}, "
                                      f"not {header.target!r}: name the anchor as the target")
                    await self._forward(header, cred.nonce, service, rest, cred.device)
                    return
                if cred.anchor != m.cloudlet:
                    raise Refused(Status.WRONG_ANCHOR, f"this session is anchored at cloudlet {cred.anchor!r}: "
                                  f"connect with target {cred.anchor!r} (only the anchor starts or holds it)")
            if header.op == Op.END:
                existed = m.end_credential(cred, "ended_by_client")
                self.transport.write(encode_reply(Status.OK, "session ended" if existed else "no live session; credential retired"))
                self.close()
                return
            await m.attach(self, cred, service, rest, via_peer, header.after_fin,
                           header.down_received if header.mode == Mode.RESUMABLE else None)
            self.gate.resume(DISPATCH)
            if via_peer:
                m.metrics.handovers.labels("in").inc()
        except Refused as exc:
            self.refuse(exc.status, exc.message, sid)
        except Exception as exc:  # never let one connection take the daemon down
            log.exception("internal error while dispatching a connection")
            self.refuse(Status.INTERNAL, f"internal error: {type(exc).__name__}", sid)

    async def _forward(self, header: Any, sid: str, service: ServiceEntry, rest: bytes, device: str = "") -> None:
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
            _channel_closed(m, header.target)
            raise Refused(Status.PEER_UNAVAILABLE, f"peer {header.target!r} gave no reply: {exc or type(exc).__name__}") from None
        except Exception as exc:  # tunnel errors (asyncssh.Error, ...)
            close_writer(writer)
            _channel_closed(m, header.target)
            raise Refused(Status.PEER_UNAVAILABLE, f"peer {header.target!r} failed: {exc or type(exc).__name__}") from None
        if self.lost:
            close_writer(writer)
            _channel_closed(m, header.target)
            return
        self.transport.write(reply.encode())
        if not reply.ok or header.op == Op.END:
            close_writer(writer)
            _channel_closed(m, header.target)
            self.close()
            event(log, logging.INFO, "forwarded request answered", session=sid, peer=header.target,
                  code=reply.status.name, op=header.op.name)
            return
        fwd = Forward(self, reader, writer, sid, service, header.target, m.loop, m.forward_closed, device)
        self.bind(fwd)
        m.forwards.add(fwd)
        m.metrics.handovers.labels("out").inc()
        event(log, logging.INFO, "session forwarded", session=sid, service=service.name, peer=header.target)
        if rest:
            fwd.client_data(self, rest)
        fwd.start()
        self.gate.resume(DISPATCH)


def _channel_closed(m: SessionManager, peer: str) -> None:
    hook = getattr(m.connector, "channel_closed", None)
    if hook is not None:
        hook(peer)

"""How the relay's parts meet: a client connection and what consumes it, and the service they serve.

A connection (:class:`ClientSide`, implemented by ``ServerConnection``) is written to, closed and
paused through these methods only; it delivers its events to the :class:`ClientSink` bound to it
(a ``Session`` at the anchor, a ``Forward`` on a forwarding cloudlet). Neither reads or writes the
other's fields.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol

from cloudlet.common.addresses import parse_hostport
from cloudlet.relay.flow import ReadGate


class ClientSink(Protocol):
    """Receives a bound connection's events."""

    def client_data(self, conn: ClientSide, data: bytes) -> None: ...

    def client_fin(self, conn: ClientSide) -> None: ...

    def client_lost(self, conn: ClientSide) -> None: ...

    def client_write_paused(self, conn: ClientSide, paused: bool) -> None: ...


class ClientSide(Protocol):
    """One client connection as a session or forward sees it."""

    aid: int  # attachment id: unique per connection within the process
    gate: ReadGate  # its reading (flow control)

    def bind(self, sink: ClientSink | None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool: ...

    def write_buffer_size(self) -> int: ...

    def socket(self) -> socket.socket | None: ...

    @property
    def lost(self) -> bool: ...


@dataclass(slots=True, eq=False)
class ServiceEntry:
    """A service this sessiond listens for: its own port, relayed to ``backend``."""

    name: str
    port: int
    listen: str
    backend: str
    server: Any = None  # asyncio.Server

    @property
    def backend_hostport(self) -> tuple[str, int]:
        return parse_hostport(self.backend, "backend")

    def to_json(self, sessions: int) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "listen": self.listen, "backend": self.backend, "sessions": sessions}

"""Flow control, written once: a transport's reading, paused while any reason holds.

Every back-pressure rule of the relay is "stop reading A while B cannot take more": the client
while the backend's (or the peer channel's) write buffer is full, the backend while the client's
is full or a detached session's buffer is at its limit, both while the splice relay owns the
sockets, a new connection while the old one drains, any connection while its header is handled.
Each rule holds its own reason on the source's :class:`ReadGate`; the transport reads again only
when no reason is left, so the rules never undo each other.
"""

from __future__ import annotations

from typing import Any, Protocol

WRITE_HIGH = 256 * 1024  # write buffer high-water mark of every relay transport


class Readable(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool: ...


# the reasons (bits of ReadGate.held)
SESSION = 1  # the session core (backend or client full, a drain in progress)
SPLICE = 2  # the splice relay owns the sockets
DISPATCH = 4  # the connection's header is being handled
PEER = 8  # the forward's peer channel is full


class ReadGate:
    """Reading of one transport: paused while at least one reason (a bit of ``held``) is held."""

    __slots__ = ("transport", "held")

    def __init__(self, transport: Readable) -> None:
        self.transport = transport
        self.held = 0

    @property
    def paused(self) -> bool:
        return bool(self.held)

    def pause(self, reason: int) -> None:
        if not self.held and not self.transport.is_closing():
            self.transport.pause_reading()
        self.held |= reason

    def resume(self, reason: int) -> None:
        if not self.held & reason:
            return
        self.held &= ~reason
        if not self.held and not self.transport.is_closing():
            self.transport.resume_reading()

    def set(self, reason: int, paused: bool) -> None:
        if paused:
            self.pause(reason)
        else:
            self.resume(reason)


def write_buffer_size(writer: Any) -> int:
    """Bytes waiting in a stream writer's transport (an SSH channel's too); unknown counts as full."""
    transport = getattr(writer, "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        return int(transport.get_write_buffer_size())
    channel = getattr(writer, "channel", None)
    if channel is not None and hasattr(channel, "get_write_buffer_size"):
        return int(channel.get_write_buffer_size())
    return WRITE_HIGH + 1

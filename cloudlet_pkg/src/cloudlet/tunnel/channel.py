"""One forwarded session's SSH channel, seen by the relay as an asyncio stream pair."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import asyncssh

from cloudlet.tunnel._fastpath import _DirectData

log = logging.getLogger(__name__)


# The channel's StreamReader pauses the channel (no more window adjusts) above 2 * READER_LIMIT, so
# one forwarded session buffers at most ``window`` + 2 * READER_LIMIT bytes of peer data.
READER_LIMIT = 256 * 1024


class _ChannelTransport(asyncio.Transport):
    """An ``asyncio.Transport`` over one asyncssh TCP channel (for a real ``StreamWriter``)."""

    def __init__(self, chan: Any, peer: str, endpoint: tuple[str, int], direct: _DirectData | None) -> None:
        super().__init__()
        self._chan = chan
        self._peer = peer
        self._endpoint = endpoint
        self._direct = direct
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (any bytes-like object; it is not referenced after the call returns)."""
        if self._closing or not data:
            return
        try:
            if self._direct is not None:
                sent = self._direct.send(self._chan, data)
                if sent:
                    if sent == len(data):
                        return
                    data = memoryview(data)[sent:]
            self._chan.write(data if isinstance(data, bytes) else bytes(data))
        except (BrokenPipeError, OSError):
            pass  # the channel is gone; connection_lost tells the reader and drain()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if not self._closing:
            try:
                self._chan.write_eof()
            except (BrokenPipeError, OSError):
                pass

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._chan.close()

    def abort(self) -> None:
        self._closing = True
        self._chan.abort()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._chan.pause_reading()

    def resume_reading(self) -> None:
        self._chan.resume_reading()

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return int(self._chan.get_write_buffer_size())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._chan.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._endpoint
        if name == "peer":
            return self._peer
        if name == "ssh_channel":
            return self._chan
        return self._chan.get_extra_info(name, default)


class ChannelOwner(Protocol):
    """What a channel needs of the tunnel it runs on (``PeerTunnel`` implements it)."""

    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> tuple[str, int]: ...

    @property
    def direct(self) -> _DirectData | None: ...

    def channel_opened(self) -> None: ...

    def channel_closed(self) -> None: ...


class _ChannelSession(asyncssh.SSHTCPSession[bytes]):
    """Feeds channel events to an ``asyncio.StreamReaderProtocol``; counts the open channel."""

    def __init__(self, tunnel: ChannelOwner, protocol: asyncio.StreamReaderProtocol) -> None:
        self._tunnel = tunnel
        self._protocol = protocol
        self.transport: _ChannelTransport | None = None
        self._counted = False

    def connection_made(self, chan: Any) -> None:
        tunnel = self._tunnel
        direct = tunnel.direct
        if direct is not None:
            direct.install_flush(chan)
        self.transport = _ChannelTransport(chan, tunnel.name, tunnel.endpoint, direct)
        tunnel.channel_opened()
        self._counted = True
        self._protocol.connection_made(self.transport)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._protocol.data_received(data)

    def eof_received(self) -> bool:
        return bool(self._protocol.eof_received())

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._tunnel.channel_closed()
        if self.transport is not None:
            self.transport._closing = True
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            exc = ConnectionResetError(f"tunnel to {self._tunnel.name!r} lost: {exc}")
        self._protocol.connection_lost(exc)

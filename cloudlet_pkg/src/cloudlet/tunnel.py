"""SSH tunnels to peer cloudlets: warm asyncssh connections, one channel per forwarded session.

``SshPeerConnector`` keeps one long-lived SSH connection per peer (``[peers.NAME]`` tables with
``transport = "ssh"``, see docs/tunnels.md). A forwarded session opens a ``direct-tcpip`` channel
on the warm connection to the peer's *peer endpoint* (its sessiond ``peer_listen``, loopback on
the peer), so a handover never waits for an SSH handshake. When a tunnel is down, ``open()``
refuses at once with ``PeerUnavailable`` (status ``PEER_UNAVAILABLE``); the connection task
reconnects by itself with capped exponential backoff.

The peer side is the system OpenSSH sshd with a dedicated tunnel account whose key may only open
the peer endpoint (``restrict,port-forwarding,permitopen="127.0.0.1:PORT"``). Host keys are always
checked against the configured ``known_hosts`` file; an unknown or changed key refuses the tunnel.

Throughput: asyncssh as released copies each 32 KiB data packet about eight times, writes every
packet with its own ``send()``, precedes each with an empty encrypted ``SSH_MSG_IGNORE`` and re-slices
its input buffer twice per received packet, which reached about half of OpenSSH. The *fast path* (on
by default, ``fast_path = false`` turns it off) sends and receives AES-GCM channel data directly
(``_DirectData``, ``_DirectRecv``), batches the packets of one event-loop iteration into one write
(``_CorkedTransport``) and drops the empty IGNORE packets. Everything else (other packet types, key
exchange, other ciphers) stays on asyncssh's own path; the hooks are feature-detected on the
asyncssh objects and skipped if its internals differ. docs/tunnels.md explains each part.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from cloudlet.hop import PeerError, parse_hostport
from cloudlet.logs import event
from cloudlet.protocol import Status

log = logging.getLogger(__name__)

# Measured with `cloudlet bench tunnel` (docs/bench.md): AES-GCM (AES-NI) is clearly faster than
# chacha20-poly1305 both in OpenSSH and in asyncssh on x86-64 here, so it is offered first.
DEFAULT_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)

_MSG_IGNORE = 2
# The channel's StreamReader pauses the channel (no more window adjusts) above 2 * READER_LIMIT, so
# one forwarded session buffers at most ``window`` + 2 * READER_LIMIT bytes of peer data.
READER_LIMIT = 256 * 1024
_MSG_CHANNEL_DATA = 94
_EMPTY_STRING = b"\x00\x00\x00\x00"  # SSH string b"": the payload of asyncssh's inserted IGNORE


class PeerUnavailable(PeerError):
    """The SSH tunnel to the peer is down, connecting, or refused the channel."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.PEER_UNAVAILABLE, message)


class TunnelConfigError(ValueError):
    """A ``[peers.NAME]`` table with ``transport = "ssh"`` is invalid."""


# -- configuration -----------------------------------------------------------------------------

_REQUIRED = ("host", "user", "client_key", "known_hosts", "endpoint")


@dataclass(frozen=True, slots=True)
class SshPeerConfig:
    """One SSH peer (keys of its ``[peers.NAME]`` table; documented in docs/tunnels.md)."""

    name: str
    host: str
    user: str
    client_key: str
    known_hosts: str
    endpoint_host: str
    endpoint_port: int
    port: int = 22
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3
    connect_timeout: float = 5.0
    open_timeout: float = 3.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    rtt_interval: float = 5.0
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    window: int = 2 * 1024 * 1024
    max_pktsize: int = 32768
    rekey_bytes: int = 1 << 30
    rekey_seconds: float = 3600.0
    fast_path: bool = True

    @classmethod
    def from_table(cls, name: str, table: dict[str, Any]) -> "SshPeerConfig":
        where = f"peer {name!r} (transport ssh)"
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "endpoint_host", "endpoint_port")}
        known |= {"endpoint", "transport"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise TunnelConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; see docs/tunnels.md")
        missing = [k for k in _REQUIRED if not table.get(k)]
        if missing:
            raise TunnelConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        try:
            ep_host, ep_port = parse_hostport(str(table["endpoint"]), f"{where} endpoint")
        except ValueError as exc:
            raise TunnelConfigError(str(exc)) from None
        kwargs: dict[str, Any] = {}
        numbers: dict[str, type] = {
            "port": int, "keepalive_interval": float, "keepalive_count_max": int, "connect_timeout": float,
            "open_timeout": float, "backoff_initial": float, "backoff_max": float, "rtt_interval": float,
            "window": int, "max_pktsize": int, "rekey_bytes": int, "rekey_seconds": float,
        }
        for key, kind in numbers.items():
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                    raise TunnelConfigError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
                if value < 0 or (key not in ("keepalive_interval", "rtt_interval") and value == 0):
                    raise TunnelConfigError(f"{where}: {key} must be positive, got {value!r}")
                kwargs[key] = kind(value)
        if "port" in kwargs and not 1 <= kwargs["port"] <= 65535:
            raise TunnelConfigError(f"{where}: port {kwargs['port']} out of range")
        if "ciphers" in table:
            ciphers = table["ciphers"]
            if isinstance(ciphers, str):
                ciphers = [c.strip() for c in ciphers.split(",") if c.strip()]
            if not isinstance(ciphers, list) or not ciphers or not all(isinstance(c, str) for c in ciphers):
                raise TunnelConfigError(f"{where}: ciphers must be a non-empty list of cipher names")
            kwargs["ciphers"] = tuple(ciphers)
        if "fast_path" in table:
            if not isinstance(table["fast_path"], bool):
                raise TunnelConfigError(f"{where}: fast_path must be true or false")
            kwargs["fast_path"] = table["fast_path"]
        for key in ("host", "user", "client_key", "known_hosts"):
            if not isinstance(table[key], str):
                raise TunnelConfigError(f"{where}: {key} must be a string")
        return cls(name=name, host=table["host"], user=table["user"], client_key=table["client_key"],
                   known_hosts=table["known_hosts"], endpoint_host=ep_host, endpoint_port=ep_port, **kwargs)


# -- fast path on the SSH connection ------------------------------------------------------------

class _CorkedTransport:
    """Batches the SSH packets written in one event-loop iteration into one ``write()``."""

    __slots__ = ("_t", "_loop", "_buf", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._buf.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def write_many(self, chunks: list[bytes]) -> None:
        self._buf.extend(chunks)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        buf, self._buf = self._buf, []
        if not self._t.is_closing():
            self._t.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def close(self) -> None:
        self._flush()
        self._t.close()

    def abort(self) -> None:
        self._buf.clear()
        self._t.abort()

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + sum(map(len, self._buf))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def _install_fast_path(conn: Any) -> bool:
    """Cork the connection's socket writes and drop asyncssh's empty IGNORE packets."""
    transport = getattr(conn, "_transport", None)
    send_packet = getattr(conn, "send_packet", None)
    if transport is None or send_packet is None or not hasattr(conn, "_send"):
        return False
    conn._transport = _CorkedTransport(transport, asyncio.get_running_loop())

    def send_packet_fast(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send_packet_fast
    return True


class _DirectData:
    """Channel data packets built and AES-GCM-encrypted in one pass, bypassing asyncssh's generic
    packet path (which copies each 32 KiB payload about eight times).

    Used only in steady state: key exchange complete and not in progress, authentication done, no
    deferred packets, no compression, an AES-GCM cipher, the channel open with nothing queued in
    asyncssh's own send buffer. Otherwise (and for whatever exceeds the peer's window) the data takes
    asyncssh's normal path, in order. The SSH state it advances is exactly what asyncssh's
    ``send_packet`` advances for a data packet: the sequence number, the GCM invocation counter, the
    rekey byte count and the channel's send window.
    """

    __slots__ = ("conn", "_enc", "_aead")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._enc: Any = None
        self._aead: Any = None

    @staticmethod
    def supported(conn: Any) -> bool:
        needed = ("_kex_complete", "_auth_complete", "_deferred_packets", "_compressor", "_send_encryption",
                  "_send_seq", "_send_blocksize", "_send_enchdrlen", "_rekey_bytes_sent", "_rekey_bytes",
                  "_rekey_seconds", "_rekey_time", "_send")
        return all(hasattr(conn, a) for a in needed)

    def _aead_for(self, enc: Any) -> Any:
        if enc is not self._enc:
            self._enc = enc
            self._aead = None
            cipher: Any = getattr(enc, "_cipher", None)  # asyncssh internals, checked by name below
            if (type(enc).__name__ == "GCMEncryption" and type(cipher).__name__ == "GCMCipher"
                    and hasattr(cipher, "_iv") and hasattr(cipher, "_update_iv")):
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                self._aead = AESGCM(cipher._key)
        return self._aead

    def send(self, chan: Any, data: bytes | bytearray | memoryview, head: bool = False) -> int:
        """Send what the window allows of ``data`` directly; return the number of bytes sent.

        ``head``: ``data`` is the head of the channel's own send buffer (flushed by ``flush``).
        """
        conn = self.conn
        if (not conn._kex_complete or not conn._auth_complete or conn._deferred_packets
                or conn._compressor is not None or conn._rekey_bytes_sent >= conn._rekey_bytes
                or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)):
            return 0
        if chan._send_chan is None or chan._send_window <= 0:
            return 0
        if not head and (chan._send_state != "open" or chan._send_buf):
            return 0
        enc = conn._send_encryption
        aead = self._aead_for(enc)
        if aead is None:
            return 0
        cipher = enc._cipher
        view = memoryview(data)
        total = len(data)
        window = chan._send_window
        pktmax = chan._send_pktsize
        blocksize = conn._send_blocksize
        enchdrlen = conn._send_enchdrlen
        prefix = chan._send_chan.to_bytes(4, "big")
        seq = conn._send_seq
        iv = cipher._iv
        fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")  # GCMCipher._update_iv, inlined
        rekey_bytes = 0
        sent = 0
        out: list[bytes] = []
        while sent < total and window > 0:
            size = min(total - sent, window, pktmax)
            payload_len = 9 + size  # byte MSG_CHANNEL_DATA, uint32 recipient, uint32 length, data
            padlen = -(enchdrlen + payload_len) % blocksize
            if padlen < 4:
                padlen += blocksize
            body_len = 1 + payload_len + padlen
            header = body_len.to_bytes(4, "big")
            plaintext = b"".join((bytes((padlen, _MSG_CHANNEL_DATA)), prefix, size.to_bytes(4, "big"),
                                  view[sent:sent + size], os.urandom(padlen)))
            out.append(header)
            out.append(aead.encrypt(fixed + counter.to_bytes(8, "big"), plaintext, header))
            counter = (counter + 1) & 0xFFFFFFFFFFFFFFFF
            seq = (seq + 1) & 0xFFFFFFFF
            rekey_bytes += body_len
            sent += size
            window -= size
        if not sent:
            return 0
        cipher._iv = fixed + counter.to_bytes(8, "big")
        conn._send_seq = seq
        conn._rekey_bytes_sent += rekey_bytes
        chan._send_window = window
        transport = conn._transport
        if isinstance(transport, _CorkedTransport):
            transport.write_many(out)
        else:
            conn._send(b"".join(out))
        return sent

    def install_flush(self, chan: Any) -> None:
        """Route the channel's own buffer flush (after a window adjust) through ``send`` too."""
        original = getattr(chan, "_flush_send_buf", None)
        if original is None or not all(hasattr(chan, a) for a in ("_send_buf", "_send_buf_len", "_send_window")):
            return

        def flush() -> None:
            buf = chan._send_buf
            while buf and chan._send_window > 0:
                data, datatype = buf[0]
                if datatype is not None:
                    break
                sent = self.send(chan, data, head=True)
                if not sent:
                    break
                chan._send_buf_len -= sent
                if sent == len(data):
                    del buf[0]
                else:
                    del data[:sent]
            original()  # the rest (other data types, no window), EOF/close, pause/resume writing

        chan._flush_send_buf = flush


class _DirectRecv:
    """Receive side of the fast path: AES-GCM channel data packets decrypted and delivered straight
    from the received bytes.

    asyncssh keeps its input in a ``bytes`` buffer and re-slices the remainder twice per packet, so
    a 256 KiB read is copied about eight times over before its eight packets are processed. Here,
    in steady state (key exchange complete, an AES-GCM cipher, no decompression, asyncssh between
    packets), complete ``SSH_MSG_CHANNEL_DATA`` packets for open channels are decrypted in place and
    given to the channel (``_accept_data``: window accounting, pause buffering and window adjusts
    stay asyncssh's). The first packet of any other kind (window adjust, EOF, close, replies, key
    exchange), or one that fails any check or its tag, is handed to asyncssh untouched, with the
    sequence number and GCM counter not advanced, so asyncssh processes it (and reports errors) as
    it would have. A partial packet at the end of a read waits here for the next read.
    """

    CHUNK = 40 * 1024  # feed asyncssh at most this much at a time (its buffer copies grow with it)

    __slots__ = ("conn", "original", "pending", "_enc", "_aead", "_keepalive_reset")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.original = conn.data_received
        self.pending = b""
        self._enc: Any = None
        self._aead: Any = None
        self._keepalive_reset = 0.0

    @staticmethod
    def supported(conn: Any) -> bool:
        needed = ("data_received", "_inpbuf", "_packet", "_recv_handler", "_recv_pkthdr", "_recv_packet",
                  "_recv_encryption", "_recv_seq", "_decompressor", "_max_recv_pktlen", "_channels",
                  "_kex_complete", "_auth_complete", "_reset_keepalive_timer", "_transport")
        return all(hasattr(conn, a) for a in needed)

    def install(self) -> None:
        self.conn.data_received = self.data_received

    def _aead_for(self, enc: Any) -> Any:
        if enc is not self._enc:
            self._enc = enc
            self._aead = None
            cipher: Any = getattr(enc, "_cipher", None)  # asyncssh internals, checked by name below
            if (type(enc).__name__ == "GCMEncryption" and type(cipher).__name__ == "GCMCipher"
                    and hasattr(cipher, "_iv")):
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                self._aead = AESGCM(cipher._key)
        return self._aead

    def _take_over(self) -> bytes | None:
        """If asyncssh sits between packets (or holds an undecrypted partial one), take its buffered
        bytes back and return them; None if the fast path cannot run now."""
        conn = self.conn
        if (not conn._kex_complete or not conn._auth_complete or conn._decompressor is not None
                or self._aead_for(conn._recv_encryption) is None):
            return None
        handler = conn._recv_handler
        if handler == conn._recv_pkthdr:
            tail = conn._inpbuf
        elif handler == conn._recv_packet:
            tail = conn._packet + conn._inpbuf  # GCM leaves the first block undecrypted
        else:
            return None  # asyncssh is waiting for an asynchronous packet handler
        conn._inpbuf = b""
        conn._packet = b""
        conn._recv_handler = conn._recv_pkthdr
        return bytes(tail)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        conn = self.conn
        buf = self.pending + data if self.pending else data
        self.pending = b""
        while buf:
            if conn._transport is None:
                return
            tail = self._take_over()
            if tail is not None:
                if tail:
                    buf = tail + buf
                used, partial = self._run(buf)
                if partial:
                    self.pending = bytes(buf[used:])
                    return
                buf = buf[used:]
                if not buf:
                    return
            piece, buf = buf[:self.CHUNK], buf[self.CHUNK:]
            self.original(piece)

    def _run(self, buf: bytes) -> tuple[int, bool]:
        """Process leading channel data packets; return (bytes used, stopped at a partial packet)."""
        conn = self.conn
        enc = conn._recv_encryption
        aead = self._aead
        cipher = enc._cipher
        channels = conn._channels
        maxlen = conn._max_recv_pktlen
        view = memoryview(buf)
        total = len(buf)
        off = 0
        now = time.monotonic()
        if now - self._keepalive_reset > 0.2:  # a timer re-arm per read costs more than the data here
            self._keepalive_reset = now
            conn._reset_keepalive_timer()
        from cryptography.exceptions import InvalidTag

        while True:
            if total - off < 4:
                return off, True
            pktlen = int.from_bytes(view[off:off + 4], "big")
            if pktlen > maxlen:
                return off, False  # asyncssh raises 'Max packet size exceeded'
            end = off + 4 + pktlen + 16
            if end > total:
                return off, True
            iv = cipher._iv
            try:
                plain = aead.decrypt(iv, view[off + 4:end], view[off:off + 4])
            except InvalidTag:
                return off, False  # asyncssh reports the MAC failure
            if len(plain) < 10 or plain[1] != _MSG_CHANNEL_DATA:
                return off, False
            padlen = plain[0]
            chan = channels.get(int.from_bytes(plain[2:6], "big"))
            datalen = int.from_bytes(plain[6:10], "big")
            if (chan is None or 10 + datalen + padlen != len(plain) or getattr(chan, "_recv_state", None) != "open"
                    or datalen > chan._recv_window):
                return off, False  # asyncssh raises the right protocol error
            counter = (int.from_bytes(iv[4:], "big") + 1) & 0xFFFFFFFFFFFFFFFF
            cipher._iv = iv[:4] + counter.to_bytes(8, "big")
            conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
            off = end
            chan._accept_data(memoryview(plain)[10:10 + datalen])
            if conn._transport is None or conn._recv_encryption is not enc or not conn._kex_complete:
                return off, False


def _install_quickack(conn: Any) -> bool:
    """ACK the peer's segments at once (TCP_QUICKACK, re-armed after every read).

    OpenSSH's sshd leaves Nagle on for non-interactive connections. When it sends two small packets
    in a row (a channel close, then the confirmation of the next channel open), the second waits for
    the ACK of the first, which Linux may delay by up to 40 ms: a channel open then takes 40 ms
    instead of a round trip. Immediate ACKs from this side remove the stall.
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if quickack is None or sock is None or not hasattr(conn, "data_received"):
        return False
    inner = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        except OSError:
            pass
        inner(data, datatype)

    conn.data_received = data_received
    return True


def _rebind_protocol(conn: Any) -> None:
    """Make the transport pick up the patched ``data_received`` (uvloop caches the bound method)."""
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, _CorkedTransport):
        transport = transport._t
    set_protocol = getattr(transport, "set_protocol", None)
    if set_protocol is not None:
        set_protocol(conn)


# -- a channel as asyncio streams ---------------------------------------------------------------

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


class _ChannelSession(asyncssh.SSHTCPSession[bytes]):
    """Feeds channel events to an ``asyncio.StreamReaderProtocol``; counts the open channel."""

    def __init__(self, tunnel: "PeerTunnel", protocol: asyncio.StreamReaderProtocol) -> None:
        self._tunnel = tunnel
        self._protocol = protocol
        self.transport: _ChannelTransport | None = None
        self._counted = False

    def connection_made(self, chan: Any) -> None:
        cfg = self._tunnel.config
        direct = self._tunnel._direct
        if direct is not None:
            direct.install_flush(chan)
        self.transport = _ChannelTransport(chan, cfg.name, (cfg.endpoint_host, cfg.endpoint_port), direct)
        self._tunnel.channels += 1
        self._tunnel.channels_opened += 1
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
            self._tunnel.channels -= 1
        if self.transport is not None:
            self.transport._closing = True
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            exc = ConnectionResetError(f"tunnel to {self._tunnel.config.name!r} lost: {exc}")
        self._protocol.connection_lost(exc)


# -- one peer -----------------------------------------------------------------------------------

STATES = ("up", "down", "connecting")


@dataclass(eq=False)
class PeerTunnel:
    """The long-lived SSH connection to one peer and its state."""

    config: SshPeerConfig
    state: str = "down"
    channels: int = 0
    channels_opened: int = 0
    open_failures: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    rtt_ms: float | None = None
    last_error: str | None = None
    cipher: str | None = None
    fast_path: bool = False
    up_since: float | None = None
    _conn: Any = None
    _direct: _DirectData | None = None
    _task: asyncio.Task[None] | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _up: asyncio.Event = field(default_factory=asyncio.Event)
    _ever_up: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tunnel-{self.name}")

    async def wait_up(self, timeout: float) -> bool:
        """Wait until the tunnel is up (for tests and benchmarks); False on timeout."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        cfg = self.config
        return asyncssh.SSHClientConnectionOptions(
            config=None,
            port=cfg.port,
            username=cfg.user,
            client_keys=[cfg.client_key],
            known_hosts=cfg.known_hosts,
            agent_path=None,
            password=None,
            kbdint_auth=False,
            password_auth=False,
            gss_auth=False,
            host_based_auth=False,
            encryption_algs=list(cfg.ciphers),
            compression_algs=["none"],
            connect_timeout=cfg.connect_timeout,
            login_timeout=cfg.connect_timeout,
            keepalive_interval=cfg.keepalive_interval,
            keepalive_count_max=cfg.keepalive_count_max,
            x509_trusted_certs=None,
            rekey_bytes=cfg.rekey_bytes,
            rekey_seconds=cfg.rekey_seconds,
        )

    async def _run(self) -> None:
        cfg = self.config
        delay = cfg.backoff_initial
        while not self._closing.is_set():
            self.state = "connecting"
            try:
                options = self._options()
                async with asyncssh.connect(cfg.host, options=options) as conn:
                    await self._serve(conn)
                delay = cfg.backoff_initial
            except asyncio.CancelledError:
                raise
            except asyncssh.HostKeyNotVerifiable as exc:
                self._failed(f"host key not verified against {cfg.known_hosts} (unknown or changed): {exc}",
                             logging.ERROR, "tunnel refused: peer host key unknown or changed")
            except asyncssh.PermissionDenied as exc:
                self._failed(f"authentication refused for user {cfg.user!r}: {exc}", logging.ERROR,
                             "tunnel refused: peer did not accept the client key")
            except (asyncio.TimeoutError, TimeoutError):
                self._failed(f"no SSH handshake within {cfg.connect_timeout:g} s", logging.WARNING,
                             "tunnel connect timed out")
            except (OSError, asyncssh.Error, ValueError) as exc:
                self._failed(f"{type(exc).__name__}: {exc}", logging.WARNING, "tunnel connect failed")
            except Exception as exc:  # never let one peer's surprise end its reconnect loop
                log.exception("unexpected error in the tunnel task of peer %s", cfg.name)
                self._failed(f"{type(exc).__name__}: {exc}", logging.ERROR, "tunnel failed unexpectedly")
            finally:
                self._conn = None
                self._up.clear()
                self.up_since = None
                self.rtt_ms = None
                self.state = "down"
            if self._closing.is_set():
                break
            wait = delay * (0.8 + 0.4 * random.random())
            delay = min(delay * 2, cfg.backoff_max)
            try:
                await asyncio.wait_for(self._closing.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _failed(self, error: str, level: int, msg: str) -> None:
        self.connect_failures += 1
        self.last_error = error
        cfg = self.config
        event(log, level, msg, peer=cfg.name, host=cfg.host, port=cfg.port, user=cfg.user, error=error)

    async def _serve(self, conn: Any) -> None:
        cfg = self.config
        self.fast_path = _install_fast_path(conn) if cfg.fast_path else False
        self._direct = _DirectData(conn) if self.fast_path and _DirectData.supported(conn) else None
        if self.fast_path and _DirectRecv.supported(conn):
            _DirectRecv(conn).install()
        _install_quickack(conn)
        _rebind_protocol(conn)
        self.cipher = conn.get_extra_info("send_cipher")
        self._conn = conn
        if self._ever_up:
            self.reconnects += 1
        self._ever_up = True
        self.state = "up"
        self.up_since = time.time()
        self.last_error = None
        self._up.set()
        event(log, logging.INFO, "tunnel up", peer=cfg.name, host=cfg.host, port=cfg.port, cipher=self.cipher,
              fast_path=self.fast_path, reconnects=self.reconnects)
        rtt_task = asyncio.get_running_loop().create_task(self._measure_rtt(conn))
        try:
            await conn.wait_closed()
        finally:
            rtt_task.cancel()
            self._up.clear()
            self._conn = None
            self._direct = None
            self.state = "down"
        reason = "closed by sessiond" if self._closing.is_set() else "connection lost"
        if not self._closing.is_set():
            self.last_error = reason
        event(log, logging.WARNING if not self._closing.is_set() else logging.INFO, "tunnel down",
              peer=cfg.name, reason=reason)

    async def _measure_rtt(self, conn: Any) -> None:
        request = getattr(conn, "_make_global_request", None)
        if request is None or self.config.rtt_interval <= 0:
            return
        while True:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(request(b"keepalive@openssh.com"), max(self.config.connect_timeout, 1.0))
            except asyncio.CancelledError:
                raise
            except Exception:  # the connection is going away; keepalive handles the verdict
                return
            self.rtt_ms = round((time.perf_counter() - started) * 1000, 3)
            await asyncio.sleep(self.config.rtt_interval)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cfg = self.config
        conn = self._conn
        if conn is None or self.state != "up":
            self.open_failures += 1
            why = f": {self.last_error}" if self.last_error else ""
            raise PeerUnavailable(f"SSH tunnel to peer {cfg.name!r} ({cfg.host}:{cfg.port}) is {self.state}{why}")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READER_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            async with asyncio.timeout(cfg.open_timeout):  # no extra task, unlike wait_for (3.11)
                _chan, session = await conn.create_connection(
                    lambda: _ChannelSession(self, protocol), cfg.endpoint_host, cfg.endpoint_port,
                    window=cfg.window, max_pktsize=cfg.max_pktsize)
        except asyncssh.ChannelOpenError as exc:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r} refused a channel to {cfg.endpoint_host}:{cfg.endpoint_port}: "
                                  f"{exc.reason or exc}") from None
        except asyncio.TimeoutError:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r}: no channel within {cfg.open_timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r}: channel open failed: {exc}") from None
        assert isinstance(session, _ChannelSession) and session.transport is not None
        writer = asyncio.StreamWriter(session.transport, protocol, reader, loop)
        return reader, writer

    async def close(self) -> None:
        self._closing.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:  # the task logged its own failure
                pass
            self._task = None

    def status(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": cfg.name, "transport": "ssh", "state": self.state, "channels": self.channels,
            "rtt_ms": self.rtt_ms, "reconnects": self.reconnects, "last_error": self.last_error,
            "host": cfg.host, "port": cfg.port, "endpoint": f"{cfg.endpoint_host}:{cfg.endpoint_port}",
            "cipher": self.cipher, "fast_path": self.fast_path, "channels_opened": self.channels_opened,
            "open_failures": self.open_failures, "connect_failures": self.connect_failures,
        }


# -- metrics ------------------------------------------------------------------------------------

class _TunnelCollector:
    """Prometheus collector reading the tunnels' state at scrape time."""

    def __init__(self, connector: "SshPeerConnector") -> None:
        self._connector = connector

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("cloudlet_tunnel_up", "1 if the SSH tunnel to the peer is up, else 0", labels=["peer"])
        state = GaugeMetricFamily("cloudlet_tunnel_state", "Tunnel state (1 for the current one)", labels=["peer", "state"])
        channels = GaugeMetricFamily("cloudlet_tunnel_channels", "Open channels (forwarded sessions) on the tunnel",
                                     labels=["peer"])
        rtt = GaugeMetricFamily("cloudlet_tunnel_rtt_seconds", "Last measured SSH round trip (global request)",
                                labels=["peer"])
        reconnects = CounterMetricFamily("cloudlet_tunnel_reconnects", "Times the tunnel came back up after being down",
                                         labels=["peer"])
        failures = CounterMetricFamily("cloudlet_tunnel_connect_failures", "Failed SSH connection attempts",
                                       labels=["peer"])
        opened = CounterMetricFamily("cloudlet_tunnel_channels_opened", "Channels opened on the tunnel", labels=["peer"])
        refused = CounterMetricFamily("cloudlet_tunnel_channel_open_failures",
                                      "Channel opens refused (tunnel down or peer refused)", labels=["peer"])
        for t in self._connector.tunnels.values():
            up.add_metric([t.name], 1.0 if t.state == "up" else 0.0)
            for s in STATES:
                state.add_metric([t.name, s], 1.0 if t.state == s else 0.0)
            channels.add_metric([t.name], float(t.channels))
            if t.rtt_ms is not None:
                rtt.add_metric([t.name], t.rtt_ms / 1000.0)
            reconnects.add_metric([t.name], float(t.reconnects))
            failures.add_metric([t.name], float(t.connect_failures))
            opened.add_metric([t.name], float(t.channels_opened))
            refused.add_metric([t.name], float(t.open_failures))
        yield from (up, state, channels, rtt, reconnects, failures, opened, refused)


# -- the connector ------------------------------------------------------------------------------

class SshPeerConnector:
    """``PeerConnector`` over warm SSH connections (one per peer)."""

    def __init__(self, configs: list[SshPeerConfig]) -> None:
        self.tunnels: dict[str, PeerTunnel] = {c.name: PeerTunnel(c) for c in configs}
        self._started = False

    @classmethod
    def from_config(cls, peers: dict[str, dict[str, Any]]) -> "SshPeerConnector":
        """Build from the ``[peers.NAME]`` TOML tables (``transport = "ssh"``); TunnelConfigError if bad."""
        return cls([SshPeerConfig.from_table(name, dict(table)) for name, table in peers.items()])

    async def start(self) -> None:
        """Start one connection task per peer; returns at once (tunnels come up in the background)."""
        if self._started:
            return
        self._started = True
        quiet = logging.getLogger("asyncssh")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)  # asyncssh logs every channel at INFO
        for t in self.tunnels.values():
            t.start()

    async def wait_up(self, timeout: float = 10.0, peers: list[str] | None = None) -> bool:
        """Wait until the given (default: all) tunnels are up; False if any is not within ``timeout``."""
        names = peers or list(self.tunnels)
        results = await asyncio.gather(*(self.tunnels[n].wait_up(timeout) for n in names))
        return all(results)

    async def open(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        tunnel = self.tunnels.get(peer)
        if tunnel is None:
            raise PeerError(Status.UNKNOWN_PEER, f"no SSH peer named {peer!r} in this cloudlet's config")
        return await tunnel.open()

    def channel_closed(self, peer: str) -> None:
        """Part of the hop interface; SSH channels count themselves when they close."""

    async def close(self) -> None:
        await asyncio.gather(*(t.close() for t in self.tunnels.values()))

    def status(self) -> list[dict[str, Any]]:
        return [t.status() for t in self.tunnels.values()]

    def metrics(self, registry: Any) -> None:
        """Register the tunnel metrics on ``registry`` (a ``prometheus_client.CollectorRegistry``)."""
        registry.register(_TunnelCollector(self))

    bind_metrics = metrics


def generate_client_key(path: str) -> str:
    """Write a new ed25519 client key (0600) and its ``.pub``; return the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="cloudlet-tunnel")
    key.write_private_key(path)
    os.chmod(path, 0o600)
    key.write_public_key(path + ".pub")
    return key.export_public_key().decode().strip()

"""PRIVATE: the asyncssh fast path for AES-GCM channel data (docs/tunnels.md).

asyncssh as released copies each 32 KiB data packet about eight times, writes every packet with
its own ``send()``, precedes each with an empty encrypted ``SSH_MSG_IGNORE`` and re-slices its
input buffer twice per received packet. The fast path sends and receives AES-GCM channel data
directly (``_DirectData``, ``_DirectRecv``), batches the packets of one event-loop iteration into
one write (``_CorkedTransport``) and drops the empty IGNORE packets. It relies on asyncssh's
private internals, so it is installed only for asyncssh versions it was tested with and only for
the ciphers it implements; everything else stays on asyncssh's own path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import asyncssh

# asyncssh releases whose internals the fast path was tested against (tests/tunnel/
# test_fastpath_contract.py, against an in-process asyncssh server and OpenSSH's sshd). To widen:
# install the release, run the contract and tunnel tests, add its "major.minor" here and widen the
# pin in cloudlet_pkg/pyproject.toml.
TESTED_ASYNCSSH = ("2.24",)
# the negotiated ciphers the direct data paths implement (AES-GCM, the OpenSSH variants)
CIPHERS = frozenset({"aes128-gcm@openssh.com", "aes256-gcm@openssh.com"})


@dataclass(frozen=True, slots=True)
class FastPath:
    """What ``install`` did to a connection: ``direct`` sends channel data (None: asyncssh's path)."""

    installed: bool
    reason: str  # why not, when not installed
    direct: _DirectData | None = None


def asyncssh_tested(version: str | None = None) -> bool:
    v = version if version is not None else str(getattr(asyncssh, "__version__", ""))
    return any(v == t or v.startswith(t + ".") for t in TESTED_ASYNCSSH)


def install(conn: Any, enabled: bool = True, version: str | None = None) -> FastPath:
    """Install the fast path on an authenticated asyncssh client connection, if it may run here.

    Only with a tested asyncssh release, only for a negotiated AES-GCM cipher in both directions and
    only if every internal it uses is present; otherwise the connection is left exactly as asyncssh
    made it (TCP_QUICKACK aside, which is plain socket tuning).
    """
    try:
        if not enabled:
            return FastPath(False, "fast_path = false")
        if not asyncssh_tested(version):
            return FastPath(False, f"asyncssh {version or getattr(asyncssh, '__version__', '?')} is not a tested "
                                   f"release ({', '.join(TESTED_ASYNCSSH)})")
        ciphers = {conn.get_extra_info("send_cipher"), conn.get_extra_info("recv_cipher")}
        if not ciphers <= CIPHERS:
            return FastPath(False, f"cipher {'/'.join(sorted(str(c) for c in ciphers))} has no fast path")
        if not (_DirectData.supported(conn) and _DirectRecv.supported(conn)):
            return FastPath(False, "this asyncssh lacks an internal the fast path uses")
        if not _install_cork(conn):
            return FastPath(False, "this asyncssh lacks an internal the fast path uses")
        direct = _DirectData(conn)
        _DirectRecv(conn).install()
        return FastPath(True, "", direct)
    finally:
        # outermost, after the direct receive path: every read re-arms TCP_QUICKACK, or the peer's
        # small packets wait for a delayed ACK (40 ms)
        _install_quickack(conn)
        _rebind_protocol(conn)

_MSG_IGNORE = 2


_MSG_CHANNEL_DATA = 94


_EMPTY_STRING = b"\x00\x00\x00\x00"  # SSH string b"": the payload of asyncssh's inserted IGNORE


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


def _install_cork(conn: Any) -> bool:
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

    data_received.quickack = True  # type: ignore[attr-defined]  # (tests check it is the outermost hook)
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

"""The session wire protocol: header, status reply, status codes and limits (docs/protocol.md).

A client connection starts with a header::

    offset size field
    0      4    magic  b"CLSH"
    4      1    version (1)
    5      1    mode   (0 = raw stream; 1 = framed, reserved; 2 = resumable raw stream)
    6      1    op     (1 = ATTACH, 2 = END)
    7      1    flags  (bit 0 AFTER_FIN: the client has just half-closed its previous connection of
                           this session, see docs/protocol.md; other bits reserved, 0)
    8      2    credential length (big endian, 1..MAX_CREDENTIAL_LEN)
    10     2    target length     (big endian, 0..MAX_TARGET_LEN)
    12     n    credential (ASCII)
    12+n   m    target (ASCII: empty, "0.0.0.0" or a cloudlet name)
    12+n+m 8    mode 2 only: down_received, the count of backend bytes the client has received

The server answers with a reply::

    0      4    magic  b"CLSR"
    4      1    version (1)
    5      1    status (Status)
    6      1    flags  (bit 0: the session was resumed, bit 1: an older connection was taken over)
    7      1    message length (0..255)
    8      k    message (UTF-8)
    8+k    16   flags bit 2 (OFFSETS, OK replies to mode 2 only): up_received (client bytes the
                anchor has taken, u64) and down_start (stream offset of the first backend byte sent
                on this connection, u64)

After an OK reply to ATTACH the connection carries raw bytes both ways.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from enum import IntEnum

from cloudlet.common.names import is_name

MAGIC = b"CLSH"
REPLY_MAGIC = b"CLSR"
VERSION = 1
MAX_CREDENTIAL_LEN = 160
MAX_TARGET_LEN = 64
HEADER_FIXED = struct.Struct("!4sBBBBHH")
REPLY_FIXED = struct.Struct("!4sBBBB")
OFFSET = struct.Struct("!Q")
OFFSETS = struct.Struct("!QQ")
MAX_HEADER_LEN = HEADER_FIXED.size + MAX_CREDENTIAL_LEN + MAX_TARGET_LEN + OFFSET.size
MAX_MESSAGE_LEN = 255
MAX_REPLY_LEN = REPLY_FIXED.size + MAX_MESSAGE_LEN + OFFSETS.size
DEFAULT_HEADER_TIMEOUT = 5.0
LOCAL_TARGETS = frozenset({"", "0.0.0.0"})

HEADER_AFTER_FIN = 0x01
HEADER_KNOWN_FLAGS = HEADER_AFTER_FIN

REPLY_RESUMED = 0x01
REPLY_TOOK_OVER = 0x02
REPLY_OFFSETS = 0x04


class Mode(IntEnum):
    RAW = 0
    FRAMED = 1  # reserved: sequence numbers and acknowledgements (not implemented by v1 servers)
    RESUMABLE = 2  # raw stream; byte offsets exchanged at attach, so a move without FIN loses nothing


class Op(IntEnum):
    ATTACH = 1
    END = 2
    PING = 3  # answered OK at once, without a session (devices measure nearness with it)


class Status(IntEnum):
    OK = 0
    BAD_HEADER = 1
    UNSUPPORTED_VERSION = 2
    UNSUPPORTED_MODE = 3
    BAD_CREDENTIAL = 4
    WRONG_SERVICE = 5
    EXPIRED = 6
    SESSION_ENDED = 7
    UNKNOWN_SERVICE = 8
    UNKNOWN_PEER = 9
    PEER_UNAVAILABLE = 10
    BACKEND_UNAVAILABLE = 11
    TOO_MANY_SESSIONS = 12
    HEADER_TIMEOUT = 13
    BAD_TARGET = 14
    INTERNAL = 15
    REPLAY_UNAVAILABLE = 16
    WRONG_ANCHOR = 17  # only the credential's anchor starts its session: name the anchor as the target
    SESSION_LOST = 18  # the anchor started this session before a restart and no longer holds its state
    DEVICE_REFUSED = 19  # the credential's device is unknown here, revoked or expired


class ProtocolError(Exception):
    """A header or reply could not be accepted; ``status`` is what goes on the wire."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Header:
    op: Op
    credential: str
    target: str = ""
    mode: Mode = Mode.RAW
    flags: int = 0
    down_received: int = 0  # mode 2: backend bytes the client already has

    @property
    def is_local(self) -> bool:
        return self.target in LOCAL_TARGETS

    @property
    def after_fin(self) -> bool:
        return bool(self.flags & HEADER_AFTER_FIN)

    def encode(self, target: str | None = None) -> bytes:
        return encode_header(self.credential, self.target if target is None else target, self.op, self.mode,
                             self.flags, self.down_received)


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    message: str = ""
    flags: int = 0
    up_received: int | None = None  # OFFSETS: client bytes the anchor has taken (resend from here)
    down_start: int | None = None  # OFFSETS: stream offset of the first backend byte on this connection

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def resumed(self) -> bool:
        return bool(self.flags & REPLY_RESUMED)

    @property
    def took_over(self) -> bool:
        return bool(self.flags & REPLY_TOOK_OVER)

    def encode(self) -> bytes:
        offsets = None if self.up_received is None or self.down_start is None else (self.up_received, self.down_start)
        return encode_reply(self.status, self.message, self.flags, offsets)


def encode_header(credential: str, target: str = "", op: Op = Op.ATTACH, mode: Mode = Mode.RAW,
                  flags: int = 0, down_received: int = 0) -> bytes:
    cred = credential.encode("ascii")
    tgt = target.encode("ascii")
    if not 0 < len(cred) <= MAX_CREDENTIAL_LEN:
        raise ValueError(f"credential length {len(cred)} not in 1..{MAX_CREDENTIAL_LEN}")
    if len(tgt) > MAX_TARGET_LEN:
        raise ValueError(f"target length {len(tgt)} over {MAX_TARGET_LEN}")
    out = HEADER_FIXED.pack(MAGIC, VERSION, int(mode), int(op), flags, len(cred), len(tgt)) + cred + tgt
    if mode == Mode.RESUMABLE:
        out += OFFSET.pack(down_received)
    return out


def encode_reply(status: Status, message: str = "", flags: int = 0, offsets: tuple[int, int] | None = None) -> bytes:
    """``offsets`` = ``(up_received, down_start)`` for an OK reply to a mode 2 ATTACH (sets OFFSETS)."""
    msg = message.encode("utf-8")[:MAX_MESSAGE_LEN]
    if offsets is None:
        return REPLY_FIXED.pack(REPLY_MAGIC, VERSION, int(status), flags & ~REPLY_OFFSETS, len(msg)) + msg
    return REPLY_FIXED.pack(REPLY_MAGIC, VERSION, int(status), flags | REPLY_OFFSETS, len(msg)) + msg + OFFSETS.pack(*offsets)


def _check_target(target: str) -> None:
    if target not in LOCAL_TARGETS and not is_name(target):
        raise ProtocolError(Status.BAD_TARGET, f"target {target!r} is neither empty, 0.0.0.0 nor a cloudlet name")


class HeaderParser:
    """Incremental header parser: ``feed`` bytes until it returns ``(header, rest)``.

    Errors are raised as soon as they can be seen (an oversized length field is refused before the
    bytes it announces arrive), so a bad client costs at most ``MAX_HEADER_LEN`` bytes of memory.
    """

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = b""
        self._need = HEADER_FIXED.size

    @property
    def empty(self) -> bool:
        """No byte of a header has arrived yet."""
        return not self._buf

    def feed(self, data: bytes) -> tuple[Header, bytes] | None:
        buf = self._buf + data if self._buf else data
        if len(buf) < HEADER_FIXED.size:
            if buf and not MAGIC.startswith(buf[: len(MAGIC)]):
                raise ProtocolError(Status.BAD_HEADER, "bad magic: not a cloudlet session header")
            self._buf = buf
            return None
        magic, version, mode, op, flags, cred_len, target_len = HEADER_FIXED.unpack_from(buf)
        if magic != MAGIC:
            raise ProtocolError(Status.BAD_HEADER, "bad magic: not a cloudlet session header")
        if version != VERSION:
            raise ProtocolError(Status.UNSUPPORTED_VERSION, f"protocol version {version} not supported (server speaks {VERSION})")
        if mode not in (Mode.RAW, Mode.RESUMABLE):
            raise ProtocolError(Status.UNSUPPORTED_MODE, f"mode {mode} not supported (0 = raw, 2 = resumable)")
        if op not in (Op.ATTACH, Op.END, Op.PING):
            raise ProtocolError(Status.BAD_HEADER, f"unknown op {op}")
        if cred_len == 0 or cred_len > MAX_CREDENTIAL_LEN:
            raise ProtocolError(Status.BAD_HEADER, f"credential length {cred_len} not in 1..{MAX_CREDENTIAL_LEN}")
        if target_len > MAX_TARGET_LEN:
            raise ProtocolError(Status.BAD_HEADER, f"target length {target_len} over {MAX_TARGET_LEN}")
        names_end = HEADER_FIXED.size + cred_len + target_len
        total = names_end + (OFFSET.size if mode == Mode.RESUMABLE else 0)
        if len(buf) < total:
            self._buf = buf
            return None
        start = HEADER_FIXED.size
        try:
            credential = buf[start : start + cred_len].decode("ascii")
            target = buf[start + cred_len : names_end].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(Status.BAD_HEADER, "credential and target must be ASCII") from None
        _check_target(target)
        down_received = OFFSET.unpack_from(buf, names_end)[0] if mode == Mode.RESUMABLE else 0
        self._buf = b""
        return Header(Op(op), credential, target, Mode(mode), flags & HEADER_KNOWN_FLAGS, down_received), buf[total:]


def parse_reply(data: bytes) -> tuple[Reply, bytes] | None:
    """Parse a reply from the start of ``data``; ``None`` if more bytes are needed."""
    if len(data) < REPLY_FIXED.size:
        return None
    magic, version, status, flags, msg_len = REPLY_FIXED.unpack_from(data)
    if magic != REPLY_MAGIC or version != VERSION:
        raise ProtocolError(Status.BAD_HEADER, "bad reply magic or version: not a cloudlet sessiond")
    end = REPLY_FIXED.size + msg_len
    if len(data) < end + (OFFSETS.size if flags & REPLY_OFFSETS else 0):
        return None
    message = data[REPLY_FIXED.size : end].decode("utf-8", "replace")
    if flags & REPLY_OFFSETS:
        up, down = OFFSETS.unpack_from(data, end)
        return Reply(_status(status), message, flags, up, down), data[end + OFFSETS.size :]
    return Reply(_status(status), message, flags), data[end:]


def _status(code: int) -> Status:
    try:
        return Status(code)
    except ValueError:
        return Status.INTERNAL


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """Read one reply from a stream (raises ``ProtocolError`` or ``asyncio.IncompleteReadError``)."""
    fixed = await reader.readexactly(REPLY_FIXED.size)
    magic, version, status, flags, msg_len = REPLY_FIXED.unpack(fixed)
    if magic != REPLY_MAGIC or version != VERSION:
        raise ProtocolError(Status.BAD_HEADER, "bad reply magic or version: not a cloudlet sessiond")
    msg = await reader.readexactly(msg_len) if msg_len else b""
    offsets: tuple[int, int] | tuple[None, None] = (None, None)
    if flags & REPLY_OFFSETS:
        offsets = OFFSETS.unpack(await reader.readexactly(OFFSETS.size))
    return Reply(_status(status), msg.decode("utf-8", "replace"), flags, *offsets)

"""The wire format: encoding, incremental parsing, and every refusal the parser can give."""

import struct

import pytest
from cloudlet.protocol.wire import (
    HEADER_FIXED,
    MAGIC,
    MAX_CREDENTIAL_LEN,
    MAX_HEADER_LEN,
    REPLY_RESUMED,
    HeaderParser,
    Mode,
    Op,
    ProtocolError,
    Reply,
    Status,
    encode_header,
    encode_reply,
    parse_reply,
)


def test_header_roundtrip_byte_by_byte_keeps_trailing_data() -> None:
    raw = encode_header("v1.svc.1.abc.def", "edge-1", Op.END) + b"payload"
    parser = HeaderParser()
    result = None
    for i in range(len(raw)):
        result = parser.feed(raw[i : i + 1])
        if result is not None:
            rest = raw[i + 1 :]
            break
    assert result is not None
    header, extra = result
    assert (header.op, header.credential, header.target) == (Op.END, "v1.svc.1.abc.def", "edge-1")
    assert extra + rest == b"payload"
    assert not header.is_local


@pytest.mark.parametrize("target, local", [("", True), ("0.0.0.0", True), ("a", False)])
def test_local_targets(target: str, local: bool) -> None:
    header, _ = HeaderParser().feed(encode_header("cred", target))  # type: ignore[misc]
    assert header.is_local is local


def _fixed(**kw: int) -> bytes:
    v = {"version": 1, "mode": 0, "op": 1, "flags": 0, "cred": 4, "target": 0} | kw
    return HEADER_FIXED.pack(MAGIC, v["version"], v["mode"], v["op"], v["flags"], v["cred"], v["target"])


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET / HTTP/1.1\r\n", Status.BAD_HEADER),
        (b"CLX", Status.BAD_HEADER),
        (_fixed(version=2), Status.UNSUPPORTED_VERSION),
        (_fixed(mode=1), Status.UNSUPPORTED_MODE),
        (_fixed(op=9), Status.BAD_HEADER),
        (_fixed(cred=0), Status.BAD_HEADER),
        (_fixed(cred=MAX_CREDENTIAL_LEN + 1), Status.BAD_HEADER),
        (_fixed(cred=60000), Status.BAD_HEADER),
        (_fixed(target=65), Status.BAD_HEADER),
        (_fixed(cred=4) + b"\xff\xfe\xfd\xfc", Status.BAD_HEADER),
        (_fixed(cred=4, target=3) + b"credA_B", Status.BAD_TARGET),
    ],
)
def test_bad_headers_are_refused_as_soon_as_visible(data: bytes, status: Status) -> None:
    with pytest.raises(ProtocolError) as err:
        HeaderParser().feed(data)
    assert err.value.status == status
    assert err.value.message


def test_oversized_length_refused_before_body_arrives() -> None:
    # only the fixed part: the parser must not wait for 60000 bytes
    with pytest.raises(ProtocolError):
        HeaderParser().feed(_fixed(cred=60000))
    assert MAX_HEADER_LEN < 300


def test_encode_refuses_oversized_fields() -> None:
    with pytest.raises(ValueError):
        encode_header("x" * (MAX_CREDENTIAL_LEN + 1))
    with pytest.raises(ValueError):
        encode_header("")


def test_reply_roundtrip_and_partial() -> None:
    raw = encode_reply(Status.SESSION_ENDED, "gone", 0x01) + b"tail"
    assert parse_reply(raw[:5]) is None
    reply, rest = parse_reply(raw)  # type: ignore[misc]
    assert reply == Reply(Status.SESSION_ENDED, "gone", 0x01)
    assert reply.resumed and not reply.ok and rest == b"tail"
    assert struct.unpack("!4s", raw[:4])[0] == b"CLSR"
    long = encode_reply(Status.OK, "x" * 1000)
    assert len(long) == 8 + 255


def test_mode2_header_carries_the_received_count_and_reply_the_offsets() -> None:
    raw = encode_header("v1.svc.1.abc.def", "a", Op.ATTACH, Mode.RESUMABLE, 0, 2**40 + 7) + b"x"
    parser = HeaderParser()
    for i in range(len(raw) - 2):  # byte by byte: nothing until the 8-byte count is complete
        assert parser.feed(raw[i : i + 1]) is None
    header, rest = parser.feed(raw[-2:])  # type: ignore[misc]
    assert (header.mode, header.down_received, header.target, rest) == (Mode.RESUMABLE, 2**40 + 7, "a", b"x")
    assert header.encode(target="") == encode_header("v1.svc.1.abc.def", "", Op.ATTACH, Mode.RESUMABLE, 0, 2**40 + 7)
    wire = encode_reply(Status.OK, "resumed", REPLY_RESUMED, (123, 2**33)) + b"data"
    assert parse_reply(wire[:-5]) is None  # the offsets are part of the reply
    reply, rest = parse_reply(wire)  # type: ignore[misc]
    assert (reply.up_received, reply.down_start, reply.resumed, rest) == (123, 2**33, True, b"data")
    assert reply.encode() == wire[:-4]
    plain, _ = parse_reply(encode_reply(Status.OK, "resumed"))  # type: ignore[misc]
    assert plain.up_received is None and plain.down_start is None

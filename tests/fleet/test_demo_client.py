"""fleet/demo_client.py: the byte checks the demo's verdict rests on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_client", ROOT / "fleet" / "demo_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_client"] = module
    spec.loader.exec_module(module)
    return module


def service_blob(n: int) -> bytes:
    """What demo.c's do_blob sends: 64 KiB chunks, each starting the 62-character pattern afresh."""
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    chunk = bytes(pattern[i % len(pattern)] for i in range(65536))
    return (chunk * (n // 65536 + 1))[:n]


@pytest.mark.parametrize("size", [0, 1, 62, 65536, 65537, 3 * 65536 + 100])
def test_a_correct_blob_has_no_wrong_bytes(demo, size):
    assert demo.blob_errors(service_blob(size)) == 0


def test_every_wrong_byte_is_counted(demo):
    data = bytearray(service_blob(200_000))
    for i in (0, 65535, 65536, 199_999):
        data[i] ^= 0x20
    assert demo.blob_errors(bytes(data)) == 4


def test_stream_lines_parse_strictly(demo):
    assert demo.MSG_RE.fullmatch(b"MSG 12 1795670638770077460").groups() == (b"12", b"1795670638770077460")
    for broken in (b"SG 12 1795670638770077460", b"MSG 12", b"MSG 12 17956 extra", b"34 1795670638770077460"):
        assert demo.MSG_RE.fullmatch(broken) is None

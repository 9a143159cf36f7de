"""The demo service's protocol (docs/demo-service.md), on the binary compiled from the package data,
and the idempotence of `cloudlet image build-demo`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloudlet.images import DEMO_IMAGE, SOURCE_LABEL, demo_source_dir, image_source_hash, source_hash
from support.controller import free_port, podman_env, read_line


@pytest.fixture(scope="module")
def demo_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (make deps installs gcc and libc6-dev)")
    out = tmp_path_factory.mktemp("demo") / "cloudlet-demo"
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(out), str(demo_source_dir() / "demo.c")], check=True)
    return out


@pytest.fixture
async def demo(demo_binary: Path) -> AsyncIterator[int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(str(demo_binary), env={"PORT": str(port)},
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert b"listening on port" in await asyncio.wait_for(proc.stderr.readline(), 10)
        yield port
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # SIGTERM exits at once, cleanly


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await read_line(reader)).startswith("HELLO cloudlet-demo 1 host=")
    return reader, writer


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> str:
    writer.write(line.encode() + b"\n")
    return await read_line(reader)


async def test_state_is_per_connection(demo: int) -> None:
    r1, w1 = await connect(demo)
    r2, w2 = await connect(demo)
    assert [await ask(r1, w1, "INCR") for _ in range(3)] == ["COUNT 1", "COUNT 2", "COUNT 3"]
    assert await ask(r2, w2, "INCR") == "COUNT 1"
    assert await ask(r1, w1, "SET k hello world") == "OK"
    assert await ask(r1, w1, "GET k") == "VALUE hello world"
    assert await ask(r2, w2, "GET k") == "NOTFOUND"
    assert await ask(r1, w1, "PING") == "PONG"
    assert await ask(r1, w1, "ECHO a b  c") == "a b  c"
    assert (await ask(r1, w1, "STATS")).startswith("STATS conn=1 commands=8 ")
    assert (await ask(r1, w1, "INFO")).startswith("INFO version=1 ")
    assert await ask(r1, w1, "NOPE") == "ERR unknown command NOPE"
    assert await ask(r1, w1, "QUIT") == "BYE"
    assert await r1.read() == b""
    for w in (w1, w2):
        w.close()


async def test_stream_numbers_and_timestamps(demo: int) -> None:
    reader, writer = await connect(demo)
    writer.write(b"STREAM 2000 50\n")
    lines = [await read_line(reader) for _ in range(51)]
    msgs = [line.split() for line in lines[:50]]
    assert [int(m[1]) for m in msgs] == list(range(1, 51))
    stamps = [int(m[2]) for m in msgs]
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] >= 49 * 2000 * 1000  # absolute deadlines: never faster than the rate
    assert lines[50] == "END 50"
    assert (await ask(reader, writer, "STREAM 10 0")).startswith("ERR usage: STREAM")
    writer.close()


async def test_blob_and_limits(demo: int) -> None:
    reader, writer = await connect(demo)
    writer.write(b"BLOB 100000\n")
    assert await read_line(reader) == "DATA 100000"
    data = await asyncio.wait_for(reader.readexactly(100000), 10)
    assert data[:12] == b"0123456789ab" and len(set(data)) == 62
    assert await ask(reader, writer, "SET " + "k" * 65 + " v") == "ERR key or value too long (max 64/256 bytes)"
    writer.write(b"x" * 2000)
    assert await read_line(reader) == "ERR line too long (max 1023 bytes)"
    assert await reader.read() == b""
    writer.close()


@pytest.mark.podman
def test_build_demo_is_idempotent(demo_image: str) -> None:
    assert image_source_hash(DEMO_IMAGE) == source_hash()
    proc = subprocess.run([sys.executable, "-m", "cloudlet", "image", "build-demo", "--json"],
                          capture_output=True, text=True, env=podman_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"image": DEMO_IMAGE, "source_hash": source_hash(), "built": False,
                      "seconds": result["seconds"]}
    assert "up to date" in proc.stderr and SOURCE_LABEL == "cloudlet.source-hash"
    assert os.path.isfile(demo_source_dir() / "Containerfile")

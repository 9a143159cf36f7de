"""Fixtures for the controller tests: a private podman API service, the demo image, unique names.

Everything runs against real podman (runc, CONTAINERS_CONF=etc/containers.conf). Each test gets its
own cloudlet name ``cltest-<random>``, so its containers and network are its own; the finalizer
removes them whatever the test did.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = str(REPO / "etc" / "containers.conf")
os.environ.setdefault("CONTAINERS_CONF", CONTAINERS_CONF)


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = CONTAINERS_CONF
    return env


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), check=check)


def _wait_unix_http(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(path)
                    s.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"podman system service did not answer on {path} within {timeout} s")


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make deps installs it)")
    path = str(tmp_path_factory.mktemp("podman") / "podman.sock")
    log = open(Path(path).with_suffix(".log"), "wb")
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{path}"],
        env=podman_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_unix_http(path)
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def demo_image() -> str:
    from cloudlet.images import build_demo

    return build_demo(log=lambda msg: None).image


def _cleanup_cloudlet(name: str) -> None:
    ids = podman("ps", "-aq", "--filter", f"label=cloudlet.cloudlet={name}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)
    podman("network", "rm", "-f", f"cloudlet-{name}", check=False)


@pytest.fixture
def cloudlet_name() -> Iterator[str]:
    name = f"cltest-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        _cleanup_cloudlet(name)


def containers_of(cloudlet: str) -> list[str]:
    """Names of every container (any state) labelled with ``cloudlet``."""
    out = podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"label=cloudlet.cloudlet={cloudlet}").stdout
    return sorted(out.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_line(reader: asyncio.StreamReader, timeout: float = 10.0) -> str:
    return (await asyncio.wait_for(reader.readline(), timeout)).decode().rstrip("\n")

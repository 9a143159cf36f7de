"""Every fixture of the test suite, in one place; the helpers behind them live in tests/support/."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cloudlet_bench.harness.sshd import TunnelSshd
from support.ansible_fleet import Fleet as AnsibleFleet
from support.ansible_fleet import start_fleet
from support.backends import EchoServer
from support.controller import Stack, cleanup_cloudlet, podman_env, wait_unix_http
from support.sessiond import SECRET, Backend, DaemonFactory, InProcessSessionds

# -- sessiond -------------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.secret"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = await Backend().start()
    yield b
    await b.stop()


@pytest.fixture
async def echo_backend() -> AsyncIterator[Backend]:
    b = await Backend(echo=True).start()
    yield b
    await b.stop()


@pytest.fixture
async def make_sessiond(tmp_path: Path, secret_file: Path) -> AsyncIterator[DaemonFactory]:
    """``await make_sessiond("a", grace_seconds=..., peers={...})`` -> a started in-process Sessiond."""
    daemons = InProcessSessionds(tmp_path, secret_file)
    yield daemons.make
    await daemons.stop()


# -- podman and the controller --------------------------------------------------------------------


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private ``podman system service`` for the whole run."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make deps installs it)")
    path = str(tmp_path_factory.mktemp("podman") / "podman.sock")
    log = open(Path(path).with_suffix(".log"), "wb")
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{path}"],
        env=podman_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_unix_http(path)
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


@pytest.fixture
def cloudlet_name() -> Iterator[str]:
    """A cloudlet name of this test's own; its containers and network are removed afterwards."""
    name = f"cltest-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        cleanup_cloudlet(name)


@pytest.fixture
async def stack(tmp_path: Path, podman_socket: str, demo_image: str, cloudlet_name: str) -> AsyncIterator[Stack]:
    s = Stack(tmp_path, cloudlet_name, podman_socket)
    try:
        await s.start_sessiond()
        await s.start_controller()
        yield s
    finally:
        await s.close()


# -- tunnels --------------------------------------------------------------------------------------


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sshd_factory() -> Iterator[object]:
    made: list[TunnelSshd] = []

    def make(endpoint: str, **kwargs: object) -> TunnelSshd:
        s = TunnelSshd(endpoint=endpoint, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.cleanup()


@pytest.fixture
def sshd(echo: EchoServer, sshd_factory) -> TunnelSshd:  # type: ignore[no-untyped-def]
    return sshd_factory(f"127.0.0.1:{echo.port}")


# -- Ansible --------------------------------------------------------------------------------------


@pytest.fixture
async def fleet2(tmp_path: Path, podman_socket: str, demo_image: str) -> AsyncIterator[AnsibleFleet]:
    """Two cloudlets in the inventory group ``cloudlets``."""
    async for fleet in start_fleet(tmp_path, podman_socket, 2):
        yield fleet


@pytest.fixture
async def fleet1(tmp_path: Path, podman_socket: str, demo_image: str) -> AsyncIterator[AnsibleFleet]:
    """One cloudlet in the inventory group ``cloudlets``."""
    async for fleet in start_fleet(tmp_path, podman_socket, 1):
        yield fleet

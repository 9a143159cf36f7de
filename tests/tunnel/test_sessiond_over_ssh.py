"""Two session daemons (in-process) forwarding through a real SSH tunnel to a private sshd."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol import credentials
from cloudlet.protocol.wire import Status
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.daemon import Sessiond
from cloudlet_bench.harness.sshd import TunnelSshd

pytestmark = pytest.mark.sshd

SECRET = b"cloudlet-tunnel-test-secret-000000000001"
FAST = {"connect_timeout": 2.0, "backoff_initial": 0.05, "backoff_max": 0.5, "keepalive_interval": 1.0}


class Echo:
    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()


async def _daemon(tmp: Path, name: str, peers: dict[str, Any]) -> Sessiond:
    d = tmp / name
    d.mkdir()
    (d / "secret").write_bytes(SECRET)
    cfg = SessiondConfig.from_dict({"sessiond": {
        "cloudlet": name, "secret_file": str(d / "secret"), "control_socket": str(d / "sock"),
        "state_dir": str(d / "state"), "peer_listen": "127.0.0.1:0", "metrics_listen": "", "grace_seconds": 30,
    }, "peers": peers})
    daemon = Sessiond(cfg)
    await daemon.start()
    return daemon


@pytest.fixture
async def pair(tmp_path: Path, sshd_factory: Any) -> AsyncIterator[tuple[Sessiond, Sessiond, TunnelSshd, str]]:
    echo = Echo()
    backend = await echo.start()
    a = await _daemon(tmp_path, "a", {})
    assert a.peer_address is not None
    sshd: TunnelSshd = sshd_factory(f"127.0.0.1:{a.peer_address[1]}")
    b = await _daemon(tmp_path, "b", {"a": sshd.peer_table("a", **FAST)})
    await a.put_service("echo", backend, 0, "127.0.0.1")
    await b.put_service("echo", "127.0.0.1:9", 0, "127.0.0.1")
    try:
        yield a, b, sshd, backend
    finally:
        await b.stop()
        await a.stop()
        assert echo.server is not None
        echo.server.close()


def _port(daemon: Sessiond, service: str = "echo") -> int:
    assert daemon.manager is not None
    entry = daemon.manager.services[service]
    assert entry.server is not None
    return int(entry.server.sockets[0].getsockname()[1])


async def _echo(client: SessionClient, size: int) -> None:
    data = os.urandom(size)
    sender = asyncio.create_task(client.send(data))
    got = await asyncio.wait_for(client.recv_exactly(size), 30)
    await sender
    assert got == data


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _peer_state(daemon: Sessiond) -> dict[str, Any]:
    status = daemon._connector.status()  # type: ignore[union-attr]
    return next(p for p in status if p["name"] == "a")


async def test_handover_through_ssh_tunnel_then_tunnel_dies_and_comes_back(pair: Any) -> None:
    a, b, sshd, _ = pair
    await _wait(lambda: _peer_state(b)["state"] == "up", 15, "tunnel b -> a")
    cred = credentials.issue(SECRET, "echo", "a").token
    client = SessionClient("127.0.0.1", _port(a), cred)
    await client.open()
    await _echo(client, 300_000)
    await client.handover("127.0.0.1", _port(b), target="a")
    await _echo(client, 2_000_000)
    assert _peer_state(b)["channels"] == 1
    assert a.manager.metrics.handovers.labels("in")._value.get() == 1  # type: ignore[union-attr]

    # the tunnel dies under a forwarded session: the client's connection is reset (the path broke;
    # a FIN would say "the session is over", and it is not), never hangs
    sshd.kill()
    assert client.reader is not None
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(client.reader.read(65536), 15)
    await _wait(lambda: _peer_state(b)["state"] != "up", 10, "tunnel down")
    started = time.monotonic()
    with pytest.raises(SessionRefused) as info:
        await SessionClient("127.0.0.1", _port(b), cred, target="a").open()
    assert info.value.status == Status.PEER_UNAVAILABLE
    assert time.monotonic() - started < 1.0

    # sshd back: the tunnel reconnects by itself and the session (kept by anchor a) resumes via b
    sshd.start()
    await _wait(lambda: _peer_state(b)["state"] == "up", 15, "tunnel back up")
    await client.close()
    client = SessionClient("127.0.0.1", _port(b), cred, target="a")
    await client.open()
    await _echo(client, 500_000)
    assert _peer_state(b)["reconnects"] == 1
    await client.end()

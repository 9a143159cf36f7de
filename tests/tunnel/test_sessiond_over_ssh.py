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


async def test_a_reload_keeps_the_warm_tunnel_of_an_unchanged_peer(pair: Any) -> None:
    """Adding a peer (a fourth cloudlet) through a reload: the SSH tunnel to ``a`` and the session
    forwarded over it stay as they are; changing ``a``'s own table replaces that tunnel only."""
    a, b, sshd, _ = pair
    await _wait(lambda: _peer_state(b)["state"] == "up", 15, "tunnel b -> a")
    cred = credentials.issue(SECRET, "echo", "a").token
    client = SessionClient("127.0.0.1", _port(a), cred)
    await client.open()
    await client.handover("127.0.0.1", _port(b), target="a")
    await _echo(client, 200_000)
    def tunnel_to_a() -> Any:
        ssh = next(c for c in b._connector.connectors if hasattr(c, "tunnels"))  # type: ignore[union-attr]
        return ssh.tunnels["a"]

    tunnel = tunnel_to_a()
    up_since = tunnel.up_since

    table = sshd.peer_table("a", **FAST)
    new = b.config.model_copy(update={"peers": {"a": table, "d": {"transport": "tcp", "address": "127.0.0.1:9"}}})
    applied = await b.reload(SessiondConfig.from_dict({"sessiond": new.model_dump(exclude={"peers"}),
                                                      "peers": new.peers}))
    assert applied.peers_added == ("d",) and not applied.peers_changed
    assert tunnel_to_a() is tunnel and tunnel.up_since == up_since
    await _echo(client, 200_000)  # the same forwarded connection
    assert _peer_state(b)["channels"] == 1 and _peer_state(b)["reconnects"] == 0
    assert sorted(p["name"] for p in b.peers_status()) == ["a", "d"]

    changed = {**table, "keepalive_interval": 2.0}
    applied = await b.reload(SessiondConfig.from_dict({"sessiond": new.model_dump(exclude={"peers"}),
                                                      "peers": {"a": changed}}))
    assert applied.peers_changed == ("a",) and applied.peers_removed == ("d",)
    assert tunnel_to_a() is not tunnel
    await _wait(lambda: _peer_state(b)["state"] == "up", 15, "the new tunnel to a")
    await client.close()


async def test_a_reload_makes_a_down_tunnel_retry_at_once(tmp_path: Path, sshd_factory: Any) -> None:
    """An operator fixed the peer (here: its sshd is back) and reloads: no wait for the backoff."""
    a = await _daemon(tmp_path, "a", {})
    assert a.peer_address is not None
    sshd: TunnelSshd = sshd_factory(f"127.0.0.1:{a.peer_address[1]}")
    slow = {**FAST, "backoff_initial": 60.0, "backoff_max": 60.0}
    sshd.kill()
    b = await _daemon(tmp_path, "b", {"a": sshd.peer_table("a", **slow)})
    try:
        await _wait(lambda: _peer_state(b)["connect_failures"] >= 1, 15, "a first failed connect")
        sshd.start()
        await asyncio.sleep(0.5)
        assert _peer_state(b)["state"] != "up"  # the next try is a minute away
        applied = await b.reload(b.config)
        assert not applied.peers and not applied.changed
        await _wait(lambda: _peer_state(b)["state"] == "up", 10, "the tunnel up right after the reload")
    finally:
        await b.stop()
        await a.stop()

"""The tunnel fast path against an in-process asyncssh server (no root, no OpenSSH): the contract.

The fast path builds, encrypts, decrypts and accounts SSH channel data packets itself, over
asyncssh's private state (sequence numbers, GCM counters, windows, rekey byte counts). Here the
other end is asyncssh's own server, which checks every packet the client's fast path sends and
sends packets the fast path must decrypt: any drift in asyncssh's internals shows up as a MAC
failure, a protocol error or corrupted bytes. The same streams run with the fast path off, with a
cipher it does not implement and with an untested asyncssh version (where it must stay out), and
through many re-keys. tests/tunnel/test_tunnel.py runs the same client against OpenSSH's sshd.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cloudlet.tunnel import _fastpath
from cloudlet.tunnel.connector import SshPeerConnector
from cloudlet_bench.harness.sshd import wait_tunnels_up
from support.backends import EchoServer

GCM = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"


class Server(asyncssh.SSHServer):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return dest_host == "127.0.0.1"  # asyncssh connects the channel to the destination itself


class InProcessSshd:
    """An asyncssh server on loopback that accepts one client key and forwards channels to 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = directory / "client_key"
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(self.client_key_path))
        os.chmod(self.client_key_path, 0o600)
        self.authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        self.server: Any = None
        self.port = 0

    async def start(self, ciphers: list[str], rekey_bytes: int = 1 << 30) -> None:
        self.server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self.host_key], authorized_client_keys=self.authorized,
            encryption_algs=ciphers, rekey_bytes=rekey_bytes)
        self.port = self.server.sockets[0].getsockname()[1]
        known = self.dir / "known_hosts"
        known.write_text(f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode()}")

    def table(self, endpoint_port: int, **extra: object) -> dict[str, object]:
        return {"transport": "ssh", "host": "127.0.0.1", "port": self.port, "user": "cltunnel",
                "client_key": str(self.client_key_path), "known_hosts": str(self.dir / "known_hosts"),
                "endpoint": f"127.0.0.1:{endpoint_port}", "connect_timeout": 5.0, "keepalive_interval": 1.0, **extra}

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[InProcessSshd]:
    s = InProcessSshd(tmp_path)
    yield s
    await s.stop()


async def stream_both_ways(connector: SshPeerConnector, size: int, sessions: int = 3) -> None:
    """``sessions`` channels at once, each echoing ``size`` random bytes; every byte checked."""

    async def one(i: int) -> None:
        reader, writer = await connector.open("p")
        data = os.urandom(size)

        async def send() -> None:
            for off in range(0, size, 100_003):  # odd chunks: packets split across reads and windows
                writer.write(data[off:off + 100_003])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.read(-1), 120)
        await sender
        assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), f"channel {i}"
        writer.close()

    await asyncio.gather(*(one(i) for i in range(sessions)))


async def connect(sshd: InProcessSshd, echo: EchoServer, **extra: object) -> SshPeerConnector:
    c = SshPeerConnector.from_config({"p": sshd.table(echo.port, **extra)})
    await c.start()
    assert await wait_tunnels_up(c, 15), c.status()
    return c


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "asyncssh-path"])
async def test_aes_gcm_streams_are_exact_through_many_rekeys(sshd: InProcessSshd, echo: EchoServer,
                                                              fast_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    kexinits: list[bool] = []  # which side started each key exchange (True: the client)
    original = asyncssh.connection.SSHConnection._send_kexinit

    def counting(self: Any) -> None:
        kexinits.append(self.is_client())
        original(self)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "_send_kexinit", counting)
    # both ends re-key every 2 MiB while data flows both ways
    await sshd.start([GCM], rekey_bytes=2 << 20)
    c = await connect(sshd, echo, ciphers=[GCM], fast_path=fast_path, rekey_bytes=2 << 20)
    try:
        (st,) = c.status()
        assert st["cipher"] == GCM and st["fast_path"] is fast_path
        # TCP_QUICKACK is re-armed on every read, around the direct receive path too: otherwise the
        # peer's small packets wait for delayed ACKs (40 ms stalls in every handover over SSH)
        assert getattr(c.tunnels["p"]._conn.data_received, "quickack", False)
        before = len(kexinits)
        await stream_both_ways(c, 12 << 20)
        (st,) = c.status()
        assert st["state"] == "up" and st["reconnects"] == 0  # no MAC or protocol error dropped it
        assert len(kexinits) - before >= 20, kexinits  # the streams crossed many re-keys
    finally:
        await c.close()


async def test_fast_path_stays_out_for_a_cipher_it_does_not_implement(sshd: InProcessSshd, echo: EchoServer) -> None:
    await sshd.start([CHACHA])
    c = await connect(sshd, echo, ciphers=[CHACHA])
    try:
        (st,) = c.status()
        assert st["cipher"] == CHACHA and st["fast_path"] is False and "has no fast path" in st["fast_path_off"]
        await stream_both_ways(c, 4 << 20, sessions=2)
    finally:
        await c.close()


async def test_fast_path_stays_out_for_an_untested_asyncssh(sshd: InProcessSshd, echo: EchoServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fastpath.asyncssh_tested()  # the installed release is one the contract covers
    monkeypatch.setattr(_fastpath, "TESTED_ASYNCSSH", ("0.1",))
    await sshd.start([GCM])
    c = await connect(sshd, echo, ciphers=[GCM])
    try:
        (st,) = c.status()
        assert st["fast_path"] is False and f"asyncssh {asyncssh.__version__} is not a tested release" in st["fast_path_off"]
        await stream_both_ways(c, 2 << 20, sessions=1)
    finally:
        await c.close()


def test_version_allowlist_matches_the_pin() -> None:
    """The pin in pyproject.toml and the allowlist name the same releases."""
    pyproject = (Path(__file__).resolve().parents[2] / "cloudlet_pkg" / "pyproject.toml").read_text()
    pin = next(line for line in pyproject.splitlines() if '"asyncssh' in line)
    for tested in _fastpath.TESTED_ASYNCSSH:
        assert f">={tested}" in pin, pin
    assert _fastpath.asyncssh_tested("2.24.1") and not _fastpath.asyncssh_tested("2.25.0")
    assert not _fastpath.asyncssh_tested("2.240")

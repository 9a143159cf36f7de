"""SshPeerConnector against a real OpenSSH sshd started by the test (own config, keys, port)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path

import asyncssh
import pytest
from cloudlet.protocol.wire import Status
from cloudlet.relay.hop import PeerError
from cloudlet.tunnel.channel import READER_LIMIT
from cloudlet.tunnel.connector import SshPeerConnector
from cloudlet.common.config import ConfigError
from cloudlet.tunnel.errors import PeerUnavailable
from cloudlet_bench.harness.sshd import TunnelSshd, wait_tunnels_up
from prometheus_client import CollectorRegistry, generate_latest

pytestmark = pytest.mark.sshd

FAST = {"connect_timeout": 2.0, "backoff_initial": 0.05, "backoff_max": 0.5, "keepalive_interval": 1.0,
        "rtt_interval": 0.2}


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    async def send() -> None:
        for i in range(0, len(data), 300_000):
            writer.write(data[i:i + 300_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.read(-1), 60)
    await sender
    return got


async def connector_for(*tables: tuple[str, dict[str, object]]) -> SshPeerConnector:
    c = SshPeerConnector.from_config({name: dict(table) for name, table in tables})
    await c.start()
    return c


# -- configuration --------------------------------------------------------------------------------

def test_config_errors_are_clear(tmp_path: Path) -> None:
    good = {"transport": "ssh", "host": "10.0.0.1", "user": "t", "client_key": "/k", "known_hosts": "/kh",
            "endpoint": "127.0.0.1:7700"}
    SshPeerConnector.from_config({"a": good})
    with pytest.raises(ConfigError, match="peers.a.known_hosts: required key is missing"):
        SshPeerConnector.from_config({"a": {k: v for k, v in good.items() if k != "known_hosts"}})
    with pytest.raises(ConfigError, match="peers.a.kepalive_interval: unknown key"):
        SshPeerConnector.from_config({"a": {**good, "kepalive_interval": 3}})
    with pytest.raises(ConfigError, match="peers.a.endpoint: address 'localhost' is not HOST:PORT"):
        SshPeerConnector.from_config({"a": {**good, "endpoint": "localhost"}})
    with pytest.raises(ConfigError, match="peers.a.connect_timeout: Input should be a valid number"):
        SshPeerConnector.from_config({"a": {**good, "connect_timeout": "5"}})
    with pytest.raises(ConfigError, match="peers.a.port: Input should be less than or equal to 65535"):
        SshPeerConnector.from_config({"a": {**good, "port": 70000}})
    c = SshPeerConnector.from_config({"a": {**good, "ciphers": ["chacha20-poly1305@openssh.com"], "port": 2222}})
    cfg = c.tunnels["a"].config
    assert cfg.ciphers == ("chacha20-poly1305@openssh.com",) and cfg.port == 2222
    assert (cfg.endpoint_host, cfg.endpoint_port) == ("127.0.0.1", 7700)


async def test_unknown_peer_is_refused_with_unknown_peer() -> None:
    c = SshPeerConnector.from_config({})
    with pytest.raises(PeerError) as info:
        await c.open("nobody")
    assert info.value.status == Status.UNKNOWN_PEER


# -- the data path ---------------------------------------------------------------------------------

async def test_channel_carries_bytes_both_ways_with_half_close(sshd: TunnelSshd, echo) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    c = await connector_for(("a", sshd.peer_table("a", **FAST)))
    c.metrics(registry)
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        data = os.urandom(6 * 1024 * 1024 + 17)
        reader, writer = await c.open("a")
        assert isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter)
        assert c.status()[0]["channels"] == 1
        got = await roundtrip(reader, writer, data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        # several channels at once on the one warm connection, each with its own bytes
        pairs = [await c.open("a") for _ in range(8)]
        payloads = [os.urandom(200_000 + i) for i in range(8)]
        results = await asyncio.gather(*(roundtrip(r, w, p) for (r, w), p in zip(pairs, payloads, strict=True)))
        assert results == payloads
        for _, w in pairs:
            w.close()
        for _ in range(200):
            if c.status()[0]["channels"] == 0:
                break
            await asyncio.sleep(0.02)
        st = c.status()[0]
        assert st["state"] == "up" and st["channels"] == 0 and st["channels_opened"] == 9
        assert st["cipher"] == "aes128-gcm@openssh.com" and st["fast_path"] is True
        for _ in range(100):
            if c.status()[0]["rtt_ms"] is not None:
                break
            await asyncio.sleep(0.05)
        assert 0 < c.status()[0]["rtt_ms"] < 1000
        text = generate_latest(registry).decode()
        assert 'cloudlet_tunnel_up{peer="a"} 1.0' in text
        assert 'cloudlet_tunnel_channels{peer="a"} 0.0' in text
        assert 'cloudlet_tunnel_channels_opened_total{peer="a"} 9.0' in text
        assert 'cloudlet_tunnel_reconnects_total{peer="a"} 0.0' in text
        assert 'cloudlet_tunnel_rtt_seconds{peer="a"}' in text
        assert echo.connections == 9
    finally:
        await c.close()
    assert c.status()[0]["state"] == "down"


async def test_without_fast_path_the_bytes_are_the_same(sshd: TunnelSshd) -> None:
    c = await connector_for(("a", sshd.peer_table("a", fast_path=False, ciphers=["chacha20-poly1305@openssh.com"])))
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        data = os.urandom(1_000_003)
        assert await roundtrip(*await c.open("a"), data) == data
        st = c.status()[0]
        assert st["fast_path"] is False and st["cipher"] == "chacha20-poly1305@openssh.com"
    finally:
        await c.close()


async def test_fast_path_survives_many_rekeys(sshd: TunnelSshd) -> None:
    """Key re-exchange every 256 KiB while data flows both ways on the direct AES-GCM path."""
    c = await connector_for(("a", sshd.peer_table("a", rekey_bytes=256 * 1024, **FAST)))
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        conn = c.tunnels["a"]._conn
        kexinits = []
        original = conn._send_kexinit

        def counting_kexinit() -> None:
            kexinits.append(time.monotonic())
            original()

        conn._send_kexinit = counting_kexinit
        pairs = [await c.open("a") for _ in range(3)]
        payloads = [os.urandom(3_000_000 + i) for i in range(3)]
        results = await asyncio.gather(*(roundtrip(r, w, p) for (r, w), p in zip(pairs, payloads, strict=True)))
        assert results == payloads
        assert c.status()[0]["state"] == "up" and c.status()[0]["fast_path"] is True
        assert conn is c.tunnels["a"]._conn  # the same connection: rekeyed, never dropped
        assert len(kexinits) >= 10, len(kexinits)
        assert "rekey" not in (c.status()[0]["last_error"] or "")
    finally:
        await c.close()


async def test_slow_reader_gets_every_byte_in_order_with_bounded_buffering(sshd_factory) -> None:  # type: ignore[no-untyped-def]
    """The peer pushes 24 MB; the reader stalls, then drains: back-pressure through the SSH window."""
    blob = hashlib.sha256(b"seed").digest() * (24 * 1024 * 1024 // 32)

    async def push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for i in range(0, len(blob), 1 << 20):
                writer.write(blob[i:i + (1 << 20)])
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        writer.close()

    pusher = await asyncio.start_server(push, "127.0.0.1", 0)
    sshd = sshd_factory(f"127.0.0.1:{pusher.sockets[0].getsockname()[1]}")
    c = await connector_for(("a", sshd.peer_table("a", window=1 << 20, **FAST)))
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        reader, writer = await c.open("a")
        chan = writer.transport.get_extra_info("ssh_channel")
        await asyncio.sleep(1.0)  # the reader does not read: the peer must stop at the window
        buffered = len(reader._buffer) + sum(len(d) for d, _ in chan._recv_buf)  # type: ignore[attr-defined]
        assert buffered <= (1 << 20) + 2 * READER_LIMIT + 64 * 1024, buffered  # window + reader limit
        got = bytearray()
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
            got += chunk
        assert len(got) == len(blob) and hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        writer.close()
    finally:
        await c.close()
        pusher.close()


# -- the restricted tunnel account -------------------------------------------------------------------

async def _raw_connect(sshd: TunnelSshd) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(sshd.listen_host, port=sshd.port, username=sshd.user,
                                  client_keys=[str(sshd.client_key)], known_hosts=str(sshd.known_hosts),
                                  config=None, agent_path=None)


@pytest.mark.parametrize("server_permitopen", [True, False], ids=["key+sshd", "key-alone"])
async def test_key_reaches_only_the_peer_endpoint(echo, sshd_factory, server_permitopen: bool) -> None:  # type: ignore[no-untyped-def]
    other = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    other_port = other.sockets[0].getsockname()[1]
    sshd = sshd_factory(f"127.0.0.1:{echo.port}", server_permitopen=server_permitopen)
    try:
        async with await _raw_connect(sshd) as conn:
            r, w = await conn.open_connection("127.0.0.1", echo.port)  # the endpoint: allowed
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
            for host, port in (("127.0.0.1", other_port), ("127.0.0.1", sshd.port), ("localhost", echo.port)):
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.open_connection(host, port)
                assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            # no shell and no command: the account's sessions only ever run nologin
            result = await asyncio.wait_for(conn.run("id; echo reached-a-shell"), 20)
            assert "reached-a-shell" not in (result.stdout or "")
            assert result.exit_status != 0
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.start_sftp_client()  # subsystems forced to nologin too: no sftp
            # remote forwarding (listening on the peer) is not allowed either
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
    finally:
        other.close()
    log_text = sshd.log_text()
    assert log_text.count("but the request was denied") >= 3, log_text


async def test_root_and_password_logins_are_refused(sshd: TunnelSshd) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(sshd.listen_host, port=sshd.port, username="root", client_keys=[str(sshd.client_key)],
                               known_hosts=str(sshd.known_hosts), config=None, agent_path=None)


# -- host keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["changed", "unknown"])
async def test_wrong_host_key_refuses_the_tunnel(sshd: TunnelSshd, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 case: str) -> None:
    known_hosts = tmp_path / "known_hosts"
    if case == "changed":
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        known_hosts.write_text(sshd.known_hosts_line(other) + "\n")
    else:
        known_hosts.write_text(f"[192.0.2.1]:22 {sshd.host_public_key}\n")
    caplog.set_level(logging.INFO, logger="cloudlet.tunnel")
    c = await connector_for(("a", sshd.peer_table("a", known_hosts=str(known_hosts), **FAST)))
    try:
        for _ in range(300):
            if c.tunnels["a"].connect_failures >= 2:
                break
            await asyncio.sleep(0.02)
        st = c.status()[0]
        assert st["state"] != "up" and st["reconnects"] == 0
        assert "host key not verified" in st["last_error"]
        refused = [r for r in caplog.records if r.getMessage() == "tunnel refused: peer host key unknown or changed"]
        assert refused and refused[0].levelno == logging.ERROR
        assert refused[0].fields["peer"] == "a" and refused[0].fields["port"] == sshd.port  # type: ignore[attr-defined]
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="host key not verified") as info:
            await c.open("a")
        assert info.value.status == Status.PEER_UNAVAILABLE
        assert time.monotonic() - started < 0.5
        assert "Accepted publickey" not in sshd.log_text()
    finally:
        await c.close()


# -- failures -------------------------------------------------------------------------------------

async def test_sshd_killed_and_restarted_tunnel_comes_back(sshd: TunnelSshd) -> None:
    c = await connector_for(("a", sshd.peer_table("a", **FAST)))
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        reader, writer = await c.open("a")
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        sshd.kill()
        # the forwarded channel ends cleanly: EOF or a connection error, never a hang
        try:
            rest = await asyncio.wait_for(reader.read(-1), 15)
            assert rest == b""
        except ConnectionError:
            pass
        for _ in range(500):
            if c.status()[0]["state"] != "up":
                break
            await asyncio.sleep(0.01)
        assert c.status()[0]["channels"] == 0
        started = time.monotonic()
        with pytest.raises(PeerUnavailable):
            await c.open("a")
        assert time.monotonic() - started < 0.5
        sshd.start()
        assert await wait_tunnels_up(c, 15), c.status()
        data = os.urandom(500_000)
        assert await roundtrip(*await c.open("a"), data) == data
        st = c.status()[0]
        assert st["reconnects"] == 1 and st["state"] == "up" and st["last_error"] is None
    finally:
        await c.close()


async def test_frozen_peer_is_detected_by_keepalives_and_replaced(sshd: TunnelSshd) -> None:
    """The peer's connection process stops answering (SIGSTOP, no FIN): keepalives declare it dead."""
    import signal

    table = sshd.peer_table("a", **{**FAST, "keepalive_interval": 0.3, "keepalive_count_max": 2, "rtt_interval": 0})
    c = await connector_for(("a", table))
    frozen: list[int] = []
    try:
        assert await wait_tunnels_up(c, 15), c.status()
        for _ in range(500):  # the monitor forks the session process just after authentication
            frozen = sshd._descendants()
            if len(frozen) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(frozen) >= 2, f"per-connection sshd processes not found: {frozen}"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        for _ in range(1000):
            if c.status()[0]["state"] != "up":
                break
            await asyncio.sleep(0.01)
        assert c.status()[0]["state"] != "up"
        assert time.monotonic() - started < 5.0
        with pytest.raises(PeerUnavailable):
            await c.open("a")
        assert await wait_tunnels_up(c, 15), c.status()  # a new connection to the (still running) listener
        data = os.urandom(100_000)
        assert await roundtrip(*await c.open("a"), data) == data
        assert c.status()[0]["reconnects"] == 1
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        await c.close()


async def test_silent_peer_does_not_stall_the_others(sshd: TunnelSshd) -> None:
    """A peer that accepts TCP but never speaks SSH: its opens fail fast, other peers work."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep it open, say nothing

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    mute_table = sshd.peer_table("mute", **{**FAST, "connect_timeout": 1.0})
    mute_table["port"] = silent_port
    c = await connector_for(("mute", mute_table), ("good", sshd.peer_table("good", **FAST)))
    try:
        assert await wait_tunnels_up(c, 15, ["good"])
        for _ in range(200):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted, "the silent peer was never dialled"
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="'mute'"):
            await c.open("mute")
        data = os.urandom(300_000)
        assert await roundtrip(*await c.open("good"), data) == data
        assert time.monotonic() - started < 2.0
        for _ in range(300):
            if c.tunnels["mute"].connect_failures:
                break
            await asyncio.sleep(0.02)
        assert "no SSH handshake within 1 s" in (c.status()[1 if c.status()[1]["name"] == "mute" else 0]["last_error"] or "")
        assert c.tunnels["good"].state == "up"
    finally:
        await c.close()
        silent.close()
        for w in accepted:
            w.close()


async def test_missing_client_key_is_reported_and_retried(sshd: TunnelSshd, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    c = await connector_for(("a", sshd.peer_table("a", client_key=str(key), **FAST)))
    try:
        for _ in range(300):
            if c.tunnels["a"].connect_failures >= 2:
                break
            await asyncio.sleep(0.02)
        assert str(key) in (c.status()[0]["last_error"] or "")
        key.write_bytes(sshd.client_key.read_bytes())
        key.chmod(0o600)
        assert await wait_tunnels_up(c, 15), c.status()  # the key appeared: the tunnel comes up by itself
    finally:
        await c.close()

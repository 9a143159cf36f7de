"""Reaching another cloudlet's sessiond: the one small interface for the forwarding hop.

``PeerConnector.open(peer)`` returns a bidirectional byte stream to the peer's *peer endpoint*
(its ``peer_listen``). :class:`TcpPeerConnector` dials the address from the config; the SSH tunnel
(:class:`cloudlet.tunnel.connector.SshPeerConnector`) opens a channel on a warm SSH connection.
The relay only ever sees this interface; the sessiond composes the connectors (``cloudlet.sessiond.peers``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cloudlet.common.addresses import parse_hostport
from cloudlet.protocol.wire import Status

log = logging.getLogger(__name__)


class PeerError(Exception):
    """The peer cannot be reached; ``status`` is UNKNOWN_PEER or PEER_UNAVAILABLE."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class PeerConnector(Protocol):
    async def open(self, peer: str) -> tuple[Any, Any]:
        """Return ``(reader, writer)`` to ``peer``'s peer endpoint; raise ``PeerError``."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _TcpPeer:
    name: str
    host: str
    port: int
    state: str = "down"
    channels: int = 0
    rtt_ms: float | None = None
    reconnects: int = 0
    failures: int = 0


@dataclass
class TcpPeerConnector:
    """Plain TCP to each peer's ``address`` (a loopback or private address map in the config)."""

    peers: dict[str, _TcpPeer] = field(default_factory=dict)
    connect_timeout: float = 3.0
    probe_interval: float = 15.0
    _probe_task: asyncio.Task[None] | None = None

    @classmethod
    def from_addresses(cls, addresses: dict[str, str], connect_timeout: float = 3.0) -> TcpPeerConnector:
        """``{"b": "127.0.0.1:7700", ...}`` (validated by the sessiond config) -> a connector."""
        table = {}
        for name, address in addresses.items():
            host, port = parse_hostport(address, f"peer {name!r} address")
            table[name] = _TcpPeer(name, host, port)
        return cls(table, connect_timeout)

    def set_addresses(self, addresses: dict[str, str]) -> None:
        """Config reload: add new peers, drop removed ones; a peer whose address is the same keeps its state."""
        table = {}
        for name, address in addresses.items():
            host, port = parse_hostport(address, f"peer {name!r} address")
            old = self.peers.get(name)
            table[name] = old if old is not None and (old.host, old.port) == (host, port) else _TcpPeer(name, host, port)
        self.peers = table

    async def start(self) -> None:
        """Probe every peer once now and then every ``probe_interval`` s, for ``GET /v1/peers``."""
        await self.probe()
        if self.probe_interval > 0:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.probe()

    async def probe(self) -> None:
        """Connect and close (no header: the peer endpoint ignores such probes) to learn up/down."""

        async def one(p: _TcpPeer) -> None:
            started = time.monotonic()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(p.host, p.port), self.connect_timeout)
            except (OSError, asyncio.TimeoutError):
                if p.state == "up":
                    p.reconnects += 1
                p.state = "down"
                return
            p.rtt_ms = round((time.monotonic() - started) * 1000, 3)
            p.state = "up"
            writer.close()

        await asyncio.gather(*(one(p) for p in self.peers.values()))

    async def open(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        p = self.peers.get(peer)
        if p is None:
            raise PeerError(Status.UNKNOWN_PEER, f"no peer named {peer!r} in this cloudlet's config")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(p.host, p.port)
        except (OSError, asyncio.TimeoutError) as exc:
            p.failures += 1
            if p.state == "up":
                p.reconnects += 1
            p.state = "down"
            raise PeerError(Status.PEER_UNAVAILABLE, f"peer {peer!r} at {p.host}:{p.port} unreachable: {exc or 'timeout'}") from None
        p.state = "up"
        p.rtt_ms = round((time.monotonic() - started) * 1000, 3)
        p.channels += 1
        writer.transport.set_write_buffer_limits(high=256 * 1024)
        return reader, writer

    def channel_closed(self, peer: str) -> None:
        p = self.peers.get(peer)
        if p is not None and p.channels > 0:
            p.channels -= 1

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None

    def status(self) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "transport": "tcp", "state": p.state, "channels": p.channels,
             "rtt_ms": p.rtt_ms, "reconnects": p.reconnects, "address": f"{p.host}:{p.port}"}
            for p in self.peers.values()
        ]

"""``SshPeerConnector``: the relay's ``PeerConnector`` over warm SSH tunnels, one per peer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cloudlet.protocol.wire import Status
from cloudlet.relay.hop import PeerError
from cloudlet.tunnel.config import SshPeerConfig
from cloudlet.tunnel.metrics import _TunnelCollector
from cloudlet.tunnel.peer import PeerTunnel


class SshPeerConnector:
    """``PeerConnector`` over warm SSH connections (one per peer)."""

    def __init__(self, configs: list[SshPeerConfig]) -> None:
        self.tunnels: dict[str, PeerTunnel] = {c.name: PeerTunnel(c) for c in configs}
        self._started = False

    @classmethod
    def from_config(cls, peers: dict[str, dict[str, Any]]) -> "SshPeerConnector":
        """Build from the ``[peers.NAME]`` TOML tables (``transport = "ssh"``); ``ConfigError`` if bad."""
        return cls([SshPeerConfig.from_table(name, dict(table)) for name, table in peers.items()])

    async def start(self) -> None:
        """Start one connection task per peer; returns at once (tunnels come up in the background)."""
        if self._started:
            return
        self._started = True
        quiet = logging.getLogger("asyncssh")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)  # asyncssh logs every channel at INFO
        for t in self.tunnels.values():
            t.start()

    async def set_peers(self, configs: list[SshPeerConfig]) -> None:
        """Config reload: tunnels of unchanged peers stay up (their channels too) and those that are
        down retry at once; removed or changed ones close (their channels end), new ones start."""
        wanted = {c.name: c for c in configs}
        gone = [t for name, t in self.tunnels.items() if wanted.get(name) != t.config]
        for t in gone:
            del self.tunnels[t.name]
        for name, config in wanted.items():
            if name in self.tunnels:
                self.tunnels[name].retry_now()
            else:
                tunnel = PeerTunnel(config)
                self.tunnels[name] = tunnel
                if self._started:
                    tunnel.start()
        await asyncio.gather(*(t.close() for t in gone))

    async def open(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        tunnel = self.tunnels.get(peer)
        if tunnel is None:
            raise PeerError(Status.UNKNOWN_PEER, f"no SSH peer named {peer!r} in this cloudlet's config")
        return await tunnel.open()

    def channel_closed(self, peer: str) -> None:
        """Part of the hop interface; SSH channels count themselves when they close."""

    async def close(self) -> None:
        await asyncio.gather(*(t.close() for t in self.tunnels.values()))

    def status(self) -> list[dict[str, Any]]:
        return [t.status() for t in self.tunnels.values()]

    def metrics(self, registry: Any) -> None:
        """Register the tunnel metrics on ``registry`` (a ``prometheus_client.CollectorRegistry``)."""
        registry.register(_TunnelCollector(self.tunnels.values))

    bind_metrics = metrics

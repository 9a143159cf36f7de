"""The sessiond's peer connector: one per transport (tcp, ssh), behind the relay's ``PeerConnector``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from cloudlet.common.logs import event
from cloudlet.protocol.wire import Status
from cloudlet.relay.hop import PeerConnector, PeerError, TcpPeerConnector
from cloudlet.sessiond.config import TcpPeer, peer_configs
from cloudlet.tunnel.config import SshPeerConfig

log = logging.getLogger(__name__)



class CompositeConnector:
    """Dispatches ``open(peer)`` to the connector of that peer's transport; never hangs.

    :meth:`update` applies a new ``[peers.*]`` set in place (config reload): peers whose table did
    not change keep their warm tunnel and its channels; removed or changed ones are closed.
    """

    def __init__(self, routes: dict[str, PeerConnector], connectors: list[PeerConnector], open_timeout: float = 5.0) -> None:
        self.routes = routes
        self.connectors = connectors
        self.open_timeout = open_timeout
        self._registry: Any = None
        self._started = False

    async def start(self) -> None:
        self._started = True
        for c in self.connectors:
            start = getattr(c, "start", None)
            if start is not None:
                await start()

    async def update(self, peers: Mapping[str, Any], connect_timeout: float) -> None:
        """Make the peer set ``peers`` (validated models or raw tables) the one this connector serves."""
        configs = peer_configs(peers)
        tcp = {n: p.address for n, p in configs.items() if isinstance(p, TcpPeer)}
        ssh = [p for p in configs.values() if isinstance(p, SshPeerConfig)]
        tcp_conn = next((c for c in self.connectors if isinstance(c, TcpPeerConnector)), None)
        ssh_conn = next((c for c in self.connectors if not isinstance(c, TcpPeerConnector)), None)
        added: list[PeerConnector] = []
        if tcp_conn is None and tcp:
            tcp_conn = TcpPeerConnector.from_addresses({}, connect_timeout)
            added.append(tcp_conn)
        if tcp_conn is not None:
            tcp_conn.connect_timeout = connect_timeout
            tcp_conn.set_addresses(tcp)
        if ssh_conn is None and ssh:
            from cloudlet.tunnel.connector import SshPeerConnector  # lazy: asyncssh only where SSH peers exist

            ssh_conn = SshPeerConnector([])
            added.append(ssh_conn)
        if ssh_conn is not None:
            await ssh_conn.set_peers(ssh)  # type: ignore[attr-defined]
        self.routes = {**{n: tcp_conn for n in tcp if tcp_conn is not None},
                       **{p.name: ssh_conn for p in ssh if ssh_conn is not None}}
        self.open_timeout = connect_timeout + 2.0
        for c in added:
            self.connectors.append(c)
            hook = getattr(c, "metrics", None)
            if hook is not None and self._registry is not None:
                hook(self._registry)
            start = getattr(c, "start", None)
            if start is not None and self._started:
                await start()

    async def open(self, peer: str) -> tuple[Any, Any]:
        conn = self.routes.get(peer)
        if conn is None:
            raise PeerError(Status.UNKNOWN_PEER, f"no peer named {peer!r} in this cloudlet's config")
        try:
            async with asyncio.timeout(self.open_timeout):
                return await conn.open(peer)
        except PeerError:
            raise
        except asyncio.TimeoutError:
            raise PeerError(Status.PEER_UNAVAILABLE, f"peer {peer!r}: no channel within {self.open_timeout:g} s") from None
        except Exception as exc:  # a tunnel's own errors (asyncssh.Error, OSError, ...)
            event(log, logging.WARNING, "peer open failed", peer=peer, error=str(exc) or type(exc).__name__)
            raise PeerError(Status.PEER_UNAVAILABLE, f"peer {peer!r} unavailable: {exc or type(exc).__name__}") from None

    def channel_closed(self, peer: str) -> None:
        conn = self.routes.get(peer)
        closed = getattr(conn, "channel_closed", None)
        if closed is not None:
            closed(peer)

    async def close(self) -> None:
        for c in self.connectors:
            try:
                await c.close()
            except Exception as exc:  # closing must go on for the others
                event(log, logging.WARNING, "peer connector close failed", error=str(exc))

    def status(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in self.connectors:
            st = getattr(c, "status", None)
            if st is not None:
                out.extend(st())
        return sorted(out, key=lambda p: p["name"])

    def metrics(self, registry: Any) -> None:
        self._registry = registry
        for c in self.connectors:
            hook = getattr(c, "metrics", None)
            if hook is not None:
                hook(registry)


def make_connector(peers: Mapping[str, Any], connect_timeout: float = 3.0) -> CompositeConnector:
    """Build the connector for the ``[peers.*]`` tables (validated models, or raw tables to validate)."""
    configs = peer_configs(peers)
    tcp = {n: p.address for n, p in configs.items() if isinstance(p, TcpPeer)}
    ssh = [p for p in configs.values() if isinstance(p, SshPeerConfig)]
    routes: dict[str, PeerConnector] = {}
    connectors: list[PeerConnector] = []
    if tcp:
        tcp_conn = TcpPeerConnector.from_addresses(tcp, connect_timeout)
        connectors.append(tcp_conn)
        routes.update({n: tcp_conn for n in tcp})
    if ssh:
        from cloudlet.tunnel.connector import SshPeerConnector  # lazy: asyncssh only where SSH peers exist

        ssh_conn = SshPeerConnector(ssh)
        connectors.append(ssh_conn)
        routes.update({p.name: ssh_conn for p in ssh})
    return CompositeConnector(routes, connectors, open_timeout=connect_timeout + 2.0)

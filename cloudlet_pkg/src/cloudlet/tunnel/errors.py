"""Errors of the SSH tunnels."""

from __future__ import annotations

from cloudlet.protocol.wire import Status
from cloudlet.relay.hop import PeerError


class PeerUnavailable(PeerError):
    """The SSH tunnel to the peer is down, connecting, or refused the channel."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.PEER_UNAVAILABLE, message)

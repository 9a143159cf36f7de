"""Prometheus collector of the tunnels' state (read at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cloudlet.tunnel.peer import STATES, PeerTunnel


class _TunnelCollector:
    """Prometheus collector reading the tunnels' state at scrape time."""

    def __init__(self, tunnels: Callable[[], Iterable[PeerTunnel]]) -> None:
        self._tunnels = tunnels

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("cloudlet_tunnel_up", "1 if the SSH tunnel to the peer is up, else 0", labels=["peer"])
        state = GaugeMetricFamily("cloudlet_tunnel_state", "Tunnel state (1 for the current one)", labels=["peer", "state"])
        channels = GaugeMetricFamily("cloudlet_tunnel_channels", "Open channels (forwarded sessions) on the tunnel",
                                     labels=["peer"])
        rtt = GaugeMetricFamily("cloudlet_tunnel_rtt_seconds", "Last measured SSH round trip (global request)",
                                labels=["peer"])
        reconnects = CounterMetricFamily("cloudlet_tunnel_reconnects", "Times the tunnel came back up after being down",
                                         labels=["peer"])
        failures = CounterMetricFamily("cloudlet_tunnel_connect_failures", "Failed SSH connection attempts",
                                       labels=["peer"])
        opened = CounterMetricFamily("cloudlet_tunnel_channels_opened", "Channels opened on the tunnel", labels=["peer"])
        refused = CounterMetricFamily("cloudlet_tunnel_channel_open_failures",
                                      "Channel opens refused (tunnel down or peer refused)", labels=["peer"])
        for t in self._tunnels():
            up.add_metric([t.name], 1.0 if t.state == "up" else 0.0)
            for s in STATES:
                state.add_metric([t.name, s], 1.0 if t.state == s else 0.0)
            channels.add_metric([t.name], float(t.channels))
            if t.rtt_ms is not None:
                rtt.add_metric([t.name], t.rtt_ms / 1000.0)
            reconnects.add_metric([t.name], float(t.reconnects))
            failures.add_metric([t.name], float(t.connect_failures))
            opened.add_metric([t.name], float(t.channels_opened))
            refused.add_metric([t.name], float(t.open_failures))
        yield from (up, state, channels, rtt, reconnects, failures, opened, refused)

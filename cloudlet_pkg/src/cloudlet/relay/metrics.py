"""Prometheus metrics of one sessiond (its own ``CollectorRegistry``, no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from cloudlet._version import VERSION as __version__
from cloudlet.common.admission import Admission
from cloudlet.common.admission_metrics import AdmissionCollector


@dataclass
class SessiondMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _admissions: AdmissionCollector | None = None

    def __post_init__(self) -> None:
        r = self.registry
        Gauge("cloudlet_build_info", "The running code: version (release+src.<hash of the package>)",
              ["version", "component"], registry=r).labels(__version__, "sessiond").set(1)
        self.sessions = Gauge("cloudlet_sessions", "Sessions by state (attached, detached, forwarded)", ["state"],
                              registry=r)
        self.sessions_started = Counter("cloudlet_sessions_started_total", "Sessions started on this cloudlet (anchor)", registry=r)
        self.sessions_ended = Counter("cloudlet_sessions_ended_total", "Sessions ended, by reason", ["reason"], registry=r)
        self.resumes = Counter("cloudlet_session_resumes_total", "Detached sessions resumed by a new connection", registry=r)
        self.takeovers = Counter("cloudlet_session_takeovers_total",
                                 "Attached sessions taken over by a new connection (no FIN)", registry=r)
        self.handovers = Counter(
            "cloudlet_handovers_total",
            "Forwarded connections: out = this cloudlet forwarded to a peer, in = arrived on the peer endpoint",
            ["direction"], registry=r,
        )
        self.bytes = Counter("cloudlet_session_bytes_total", "Bytes relayed (up = client to backend)", ["direction"], registry=r)
        self.refusals = Counter("cloudlet_refusals_total", "Connections refused, by status code", ["code"], registry=r)
        self.pings = Counter("cloudlet_pings", "Nearness probes answered (op PING)", registry=r)
        self.header_errors = Counter("cloudlet_header_errors_total", "Malformed, oversized, truncated or slow headers", registry=r)
        self.reloads = Counter("cloudlet_sessiond_reloads_total", "Config reloads, by result (applied, refused)", ["result"],
                               registry=r)
        self.services = Gauge("cloudlet_services", "Services this sessiond listens for", registry=r)
        self.splice_upgrades = Counter("cloudlet_splice_upgrades_total", "Attachments moved to the splice fast path", registry=r)
        self.replayed_bytes = Counter("cloudlet_replayed_bytes_total",
                                      "Backend bytes written again to a resumable session's new connection (mode 2)",
                                      registry=r)
        self.buffered = Gauge("cloudlet_buffered_bytes", "Backend bytes held for detached sessions", registry=r)
        self.held_budget = Gauge("cloudlet_held_budget_bytes",
                                 "Backend bytes all detached sessions together may hold (held_bytes_budget)", registry=r)
        self.held_budget_reached = Counter(
            "cloudlet_held_budget_reached", "Times the held-bytes budget was spent and detached backends were paused",
            registry=r)
        for s in ("attached", "detached", "forwarded"):
            self.sessions.labels(s)
        for d in ("up", "down"):
            self.bytes.labels(d)
        for d in ("in", "out"):
            self.handovers.labels(d)

    def watch_admission(self, listener: str, admission: Admission) -> None:
        """Export one admission's state: open and pending connections, evictions and refusals."""
        if self._admissions is None:
            self._admissions = AdmissionCollector()
            self.registry.register(self._admissions)
        self._admissions.add(admission, {"listener": listener})

"""Prometheus metrics of one controller (its own ``CollectorRegistry``, no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cloudlet._version import VERSION as __version__
from cloudlet.common.admission import Admission
from cloudlet.common.admission_metrics import AdmissionCollector


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        Gauge("cloudlet_build_info", "The running code: version (release+src.<hash of the package>)",
              ["version", "component"], registry=r).labels(__version__, "controller").set(1)
        self.requests = Counter(
            "cloudlet_controller_requests_total", "API requests by route and HTTP status", ["method", "route", "status"],
            registry=r,
        )
        self.launches = Counter(
            "cloudlet_controller_launches_total",
            "Service creations by result (created, unchanged, conflict, or an error code)", ["result"], registry=r,
        )
        self.launch_seconds = Histogram(
            "cloudlet_controller_launch_seconds", "Time from create request to a registered, reachable service",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60), registry=r,
        )
        self.deletes = Counter("cloudlet_controller_deletes_total", "Services deleted", registry=r)
        self.sessions_issued = Counter("cloudlet_controller_sessions_issued_total", "Session credentials issued", registry=r)
        self.auth_refusals = Counter(
            "cloudlet_controller_auth_refusals", "API requests refused: bad or missing token, device revoked, expired, "
            "out of scope, forbidden route, another device's session", ["code"], registry=r)
        self.services = Gauge("cloudlet_controller_services", "Services of this cloudlet by state", ["state"], registry=r)
        self.reconciles = Counter(
            "cloudlet_controller_reconciles_total", "Reconcile passes by result (ok, error)", ["result"], registry=r
        )
        self.repairs = Counter(
            "cloudlet_controller_repairs_total",
            "Repairs made by reconcile (registered, unregistered, restarted)", ["action"], registry=r,
        )
        self.reconcile_passes = Counter(
            "cloudlet_controller_reconcile_passes_total",
            "Reconcile passes by what started them (start, interval, event, resync)", ["trigger"], registry=r,
        )
        self.runtime_events = Counter(
            "cloudlet_controller_runtime_events_total",
            "Container events of this cloudlet's services seen on the runtime's event stream", ["action"], registry=r,
        )
        self.event_stream_connects = Counter(
            "cloudlet_controller_event_stream_connects_total",
            "Connects (first and reconnects) of the runtime's event stream", registry=r,
        )
        self.event_stream_up = Gauge(
            "cloudlet_controller_event_stream_up", "1 while the runtime's event stream is connected", registry=r
        )
        for s in ("running", "starting", "failed"):
            self.services.labels(s)
        for res in ("ok", "error"):
            self.reconciles.labels(res)
        for trigger in ("start", "interval", "event", "resync"):
            self.reconcile_passes.labels(trigger)

    def watch_admission(self, admission: Admission) -> None:
        """Export the API's connection admission (open, pending, evicted, refused)."""
        self.registry.register(AdmissionCollector(admission, {"listener": "api"}))

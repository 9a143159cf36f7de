"""Prometheus view of an :class:`~cloudlet.common.admission.Admission` (node side: prometheus-client)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cloudlet.common.admission import REASONS, Admission


class AdmissionCollector:
    """``cloudlet_connections_open``, ``cloudlet_connections_pending`` and ``cloudlet_connection_limit_total``,
    read at scrape time, with ``labels`` (for example the listener) on every sample."""

    def __init__(self, admission: Admission, labels: dict[str, str] | None = None) -> None:
        self.admission = admission
        self.labels = dict(labels or {})

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        a, names, values = self.admission, list(self.labels), list(self.labels.values())
        open_ = GaugeMetricFamily("cloudlet_connections_open", "Client connections open", labels=names)
        open_.add_metric(values, float(a.open))
        pending = GaugeMetricFamily("cloudlet_connections_pending",
                                    "Connections that have not yet sent their first request (session header, HTTP head)",
                                    labels=names)
        pending.add_metric(values, float(a.pending))
        limited = CounterMetricFamily(
            "cloudlet_connection_limit",
            "Connections evicted (the oldest pending ones, in total or of one source) or refused (max_connections)",
            labels=[*names, "reason"])
        for reason in REASONS:
            limited.add_metric([*values, reason], float(a.counts[reason]))
        yield from (open_, pending, limited)

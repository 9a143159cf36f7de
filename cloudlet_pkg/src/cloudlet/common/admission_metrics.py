"""Prometheus view of an :class:`~cloudlet.common.admission.Admission` (node side: prometheus-client)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cloudlet.common.admission import REASONS, Admission


class AdmissionCollector:
    """``cloudlet_connections_open``, ``cloudlet_connections_pending`` and ``cloudlet_connection_limit_total``,
    read at scrape time, with ``labels`` (for example the listener) on every sample.

    One collector holds every admission of a registry (:meth:`add`): each family is emitted once,
    with one sample per admission (two collectors would repeat a family's HELP, which the text
    format does not allow; ``promtool check metrics`` refuses it)."""

    def __init__(self, admission: Admission | None = None, labels: dict[str, str] | None = None) -> None:
        self.watched: list[tuple[Admission, dict[str, str]]] = []
        if admission is not None:
            self.add(admission, labels)

    def add(self, admission: Admission, labels: dict[str, str] | None = None) -> None:
        labels = dict(labels or {})
        if self.watched and list(labels) != list(self.watched[0][1]):
            raise ValueError("every admission of one collector needs the same label names")
        self.watched.append((admission, labels))

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        names = list(self.watched[0][1]) if self.watched else []
        open_ = GaugeMetricFamily("cloudlet_connections_open", "Client connections open", labels=names)
        pending = GaugeMetricFamily("cloudlet_connections_pending",
                                    "Connections that have not yet sent their first request (session header, HTTP head)",
                                    labels=names)
        limited = CounterMetricFamily(
            "cloudlet_connection_limit",
            "Connections evicted (the oldest pending ones, in total or of one source) or refused (max_connections)",
            labels=[*names, "reason"])
        for a, labels in self.watched:
            values = list(labels.values())
            open_.add_metric(values, float(a.open))
            pending.add_metric(values, float(a.pending))
            for reason in REASONS:
                limited.add_metric([*values, reason], float(a.counts[reason]))
        yield from (open_, pending, limited)

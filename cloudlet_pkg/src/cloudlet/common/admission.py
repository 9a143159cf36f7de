"""Admission of new connections under a flood: bounded, fair to newcomers, cheap, quiet.

A connection that has not yet finished its first request (a session header, an HTTP request head)
is *pending*. Pending connections are bounded in total and per source address; when a new one
would pass a bound, the **oldest** pending connection (of that source, or of all) is evicted, not
the new one. A legitimate client sends its request at once, so it is never the oldest for long: a
flood of idle or slow connections keeps evicting itself while real clients get through. Accepted
connections are bounded too (``max_open``, below the descriptor limit): beyond it new ones are
refused at once. Everything is counted (``counts``) and logged at most once per interval.

Used by the sessiond's service and peer ports (``cloudlet.relay.connection``) and by every HTTP
server of the daemons and the agent (``cloudlet.common.httpserver``).
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from cloudlet.common.logs import Throttle

log = logging.getLogger(__name__)

EVICTED_TOTAL, EVICTED_SOURCE, REFUSED_OPEN = "evicted_total", "evicted_source", "refused_open"
REASONS = (EVICTED_TOTAL, EVICTED_SOURCE, REFUSED_OPEN)


def nofile_limit() -> int:
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def default_limits(nofile: int | None = None) -> tuple[int, int, int]:
    """``(max_open, max_pending, max_pending_per_source)`` for a descriptor limit (each connection may
    need two descriptors: a session holds its client and its backend)."""
    n = nofile if nofile is not None else nofile_limit()
    max_open = max(16, (n - 64) // 2)
    max_pending = max(8, min(4096, max_open // 4))
    return max_open, max_pending, max(4, max_pending // 2)


@dataclass
class Admission:
    """The bounds of one listener (or of several sharing them); see the module docstring."""

    name: str
    max_open: int
    max_pending: int
    max_pending_per_source: int
    log_interval: float = 10.0
    open: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _pending: OrderedDict[Hashable, tuple[str, Callable[[], None]]] = field(default_factory=OrderedDict)
    _by_source: dict[str, OrderedDict[Hashable, None]] = field(default_factory=dict)
    _throttle: Throttle = field(init=False)

    def __post_init__(self) -> None:
        if min(self.max_open, self.max_pending, self.max_pending_per_source) < 1:
            raise ValueError(f"{self.name}: admission limits must be at least 1")
        self._throttle = Throttle(log, self.log_interval)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def accept(self, key: Hashable, source: str, evict: Callable[[], None]) -> bool:
        """A new connection: False if it must be refused now (``max_open``); else it is pending."""
        if self.open >= self.max_open:
            self._count(REFUSED_OPEN, source)
            return False
        self.open += 1
        mine = self._by_source.setdefault(source, OrderedDict())
        if len(mine) >= self.max_pending_per_source:
            self._evict(next(iter(mine)), EVICTED_SOURCE)
        elif len(self._pending) >= self.max_pending:
            self._evict(next(iter(self._pending)), EVICTED_TOTAL)
        self._pending[key] = (source, evict)
        self._by_source.setdefault(source, OrderedDict())[key] = None
        return True

    def started(self, key: Hashable) -> None:
        """The connection finished its first request: it is no longer pending."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._forget_source(key, entry[0])

    def closed(self, key: Hashable) -> None:
        """The connection is gone (whatever its state); call exactly once per accepted connection."""
        self.started(key)
        self.open = max(0, self.open - 1)

    def _evict(self, key: Hashable, reason: str) -> None:
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        source, evict = entry
        self._forget_source(key, source)
        self._count(reason, source)
        evict()  # aborts the connection; its closed() follows when the transport goes

    def _forget_source(self, key: Hashable, source: str) -> None:
        mine = self._by_source.get(source)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_source[source]

    def _count(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        self._throttle.event(logging.WARNING, f"{self.name}: connection flood: {reason.replace('_', ' ')}", reason,
                             source=source, open=self.open, pending=len(self._pending), max_open=self.max_open,
                             max_pending=self.max_pending, max_pending_per_source=self.max_pending_per_source)

    def snapshot(self) -> dict[str, Any]:
        return {"open": self.open, "pending": len(self._pending), "max_open": self.max_open,
                "max_pending": self.max_pending, "max_pending_per_source": self.max_pending_per_source,
                **self.counts, "at": round(time.time(), 3)}

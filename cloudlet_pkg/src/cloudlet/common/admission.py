"""Admission of new connections under a flood: bounded, fair to newcomers, cheap, quiet.

A connection that has not yet finished its first request (a session header, an HTTP request head)
is *pending*. Pending connections are bounded in total and per source address; when a new one
would pass a bound, the **oldest silent** pending connection (of that source, or of all) is
evicted, not the new one. A legitimate client sends its request at once, so it is never the
oldest silent one: a flood of idle or slow connections keeps evicting itself while real clients
get through. Accepted connections are bounded too (``max_open``, below the descriptor limit):
beyond it a pending one makes room the same way, or the new one is refused at once. Everything is
counted (``counts``) and logged at most once per interval.

Used by the sessiond's service and peer ports (``cloudlet.relay.connection``) and by every HTTP
server of the daemons and the agent (``cloudlet.common.httpserver``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from cloudlet.common.logs import Throttle

log = logging.getLogger(__name__)

EVICTED_TOTAL, EVICTED_SOURCE = "evicted_total", "evicted_source"
REFUSED_OPEN, REFUSED_PENDING = "refused_open", "refused_pending"
REASONS = (EVICTED_TOTAL, EVICTED_SOURCE, REFUSED_OPEN, REFUSED_PENDING)


def nofile_limit() -> int:
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def default_limits(nofile: int | None = None) -> tuple[int, int, int]:
    """``(max_open, max_pending, max_pending_per_source)`` for a descriptor limit (each connection may
    need two descriptors: a session holds its client and its backend)."""
    n = nofile if nofile is not None else nofile_limit()
    max_open = max(16, (n - 64) // 2)
    max_pending = max(8, min(4096, max_open // 4))
    return max_open, max_pending, max(4, max_pending // 2)


@dataclass(slots=True)
class _Pending:
    source: str
    evict: Callable[[], None]
    since: float
    talking: bool


@dataclass
class Admission:
    """The bounds of one listener (or of several sharing them); see the module docstring.

    Among pending connections, silent ones (no byte received yet) go first, oldest first; a
    talking one (its request is arriving) only once it has been at it for ``min_age`` seconds. A
    client's request arrives at once, so it is talking within a moment of its accept (often already
    at accept, seen with ``FIONREAD``). Over a pending bound, a silent connection younger than
    ``burst_age`` is not evicted either (one accept batch can hold a thousand connections, accepted
    before any of their data is read): the newcomer is admitted over the bound and the excess goes
    as soon as it has aged (two evictions per newcomer, and a sweep). ``max_open`` is hard: there
    the oldest silent connection makes room whatever its age, or the newcomer is refused.
    """

    name: str
    max_open: int
    max_pending: int
    max_pending_per_source: int
    log_interval: float = 10.0
    min_age: float = 0.25  # a talking connection is evicted only after this long at its request
    burst_age: float = 0.05  # over a pending bound, a silent one is evicted only after this long
    clock: Callable[[], float] = time.monotonic
    open: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _pending: dict[Hashable, _Pending] = field(default_factory=dict)
    # (source or None for all, talking) -> keys, oldest first
    _queues: dict[tuple[str | None, bool], OrderedDict[Hashable, None]] = field(default_factory=dict)
    _throttle: Throttle = field(init=False)
    _released: set[Hashable] = field(default_factory=set)
    _sweep: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        if min(self.max_open, self.max_pending, self.max_pending_per_source) < 1:
            raise ValueError(f"{self.name}: admission limits must be at least 1")
        self._throttle = Throttle(log, self.log_interval)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _count_of(self, source: str | None) -> int:
        return sum(len(self._queues.get((source, t), ())) for t in (False, True))

    def _victim(self, scope: str | None, now: float, silent_age: float) -> Hashable | None:
        """Whom to evict: the oldest silent connection at least ``silent_age`` old, else the oldest
        talking one that has been at its request for ``min_age`` (a client sends a request in one
        go; one that drips it is an attack)."""
        q = self._queues.get((scope, False))
        if q:
            key = next(iter(q))
            if now - self._pending[key].since >= silent_age:
                return key
        q = self._queues.get((scope, True))
        if q:
            key = next(iter(q))
            if now - self._pending[key].since >= self.min_age:
                return key
        return None

    def _over(self, scope: str | None) -> bool:
        if scope is None:
            return len(self._pending) >= self.max_pending
        return self._count_of(scope) >= self.max_pending_per_source

    def accept(self, key: Hashable, source: str, evict: Callable[[], None], talking: bool = False) -> bool:
        """A new connection: False if it must be refused now; else it is pending.

        ``talking``: bytes of its request have already arrived (seen at accept time).
        """
        now = self.clock()
        if self.open >= self.max_open:  # the hard bound: make room with the oldest silent one, or refuse
            victim = self._victim(None, now, 0.0)
            if victim is None:
                self._count(REFUSED_OPEN, source)
                return False
            self._evict(victim, EVICTED_TOTAL)
            self.open -= 1  # its slot is the newcomer's now (its closed() comes later)
            self._released.add(victim)
        for scope, reason in ((source, EVICTED_SOURCE), (None, EVICTED_TOTAL)):
            for _ in range(2):  # two per newcomer while over: a burst's excess goes as it ages
                if not self._over(scope):
                    break
                victim = self._victim(scope, now, self.burst_age)
                if victim is None:
                    self._schedule_sweep()
                    break
                self._evict(victim, reason)
        self.open += 1
        self._pending[key] = _Pending(source, evict, now, talking)
        for scope_ in (None, source):
            self._queues.setdefault((scope_, talking), OrderedDict())[key] = None
        return True

    def _schedule_sweep(self) -> None:
        if self._sweep is None:
            try:
                self._sweep = asyncio.get_running_loop().call_later(self.burst_age, self.sweep)
            except RuntimeError:  # no running loop: the next accept trims instead
                pass

    def sweep(self) -> None:
        """Evict what a burst left over the pending bounds, once it is old enough."""
        self._sweep = None
        now = self.clock()
        again = False
        for scope, reason in [*((src, EVICTED_SOURCE) for src in {e.source for e in self._pending.values()}),
                              (None, EVICTED_TOTAL)]:
            while self._over(scope) and (self._count_of(scope) if scope is not None else len(self._pending)) > (
                    self.max_pending_per_source if scope is not None else self.max_pending):
                victim = self._victim(scope, now, self.burst_age)
                if victim is None:
                    again = True
                    break
                self._evict(victim, reason)
        if again:
            self._schedule_sweep()

    def talking(self, key: Hashable) -> None:
        """The pending connection sent its first bytes: it goes after the silent ones."""
        entry = self._pending.get(key)
        if entry is None or entry.talking:
            return
        self._unqueue(key, entry)
        entry.talking = True
        for scope in (None, entry.source):
            self._queues.setdefault((scope, True), OrderedDict())[key] = None

    def started(self, key: Hashable) -> None:
        """The connection finished its first request: it is no longer pending."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._unqueue(key, entry)

    def closed(self, key: Hashable) -> None:
        """The connection is gone (whatever its state); call exactly once per accepted connection."""
        self.started(key)
        if key in self._released:  # its slot was already handed to a newcomer
            self._released.discard(key)
            return
        self.open = max(0, self.open - 1)

    def _evict(self, key: Hashable, reason: str) -> None:
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        self._unqueue(key, entry)
        self._count(reason, entry.source)
        entry.evict()  # aborts the connection; its closed() follows when the transport goes

    def _unqueue(self, key: Hashable, entry: _Pending) -> None:
        for scope in (None, entry.source):
            q = self._queues.get((scope, entry.talking))
            if q is not None:
                q.pop(key, None)
                if not q:
                    del self._queues[(scope, entry.talking)]

    def _count(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        self._throttle.event(logging.WARNING, f"{self.name}: connection flood: {reason.replace('_', ' ')}", reason,
                             source=source, open=self.open, pending=len(self._pending), max_open=self.max_open,
                             max_pending=self.max_pending, max_pending_per_source=self.max_pending_per_source)

    def snapshot(self) -> dict[str, Any]:
        return {"open": self.open, "pending": len(self._pending), "max_open": self.max_open,
                "max_pending": self.max_pending, "max_pending_per_source": self.max_pending_per_source,
                **self.counts, "at": round(time.time(), 3)}


def bytes_waiting(sock: Any) -> int:
    """Bytes already received on ``sock`` (``FIONREAD``), without reading them; 0 if unknown."""
    import fcntl
    import struct
    import termios

    try:
        fd = sock.fileno()
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError, AttributeError):
        return 0

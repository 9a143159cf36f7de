"""Which cloudlet is nearest: round-trip samples per cloudlet and a switching policy with hysteresis.

Pure (no I/O, the clock is passed in), so the policy is tested sample by sample. The agent feeds it
one probe result per cloudlet and period (``observe``: an RTT in seconds, or ``None`` for no answer)
and asks ``decide`` where its sessions should be.

Policy ``auto`` (the default):

- a cloudlet's estimate is the median of its last ``window`` answered probes (one slow probe does
  not move anything); it is *down* after ``down_after`` probes in a row without an answer;
- the current cloudlet down: move at once to the best cloudlet that is up, without FIN (the link
  is gone; protocol mode 2 loses nothing) - reason ``current_down``;
- otherwise move to the best other cloudlet only if it has been better than the current one by the
  margin - ``max(margin_ms, margin_ratio * current)`` - for ``hold_seconds`` without a break, and
  the last move is at least ``min_dwell_seconds`` old: a clean move with FIN - reason ``nearer``.

Policy ``pinned``: never move by itself (only a manual switch moves), even if the current cloudlet is
down (connections that break heal through the best reachable cloudlet meanwhile, see the agent).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["auto", "pinned"]


@dataclass(frozen=True)
class NearnessConfig:
    policy: Policy = "auto"
    interval_seconds: float = 0.25  # one probe to every cloudlet per interval
    timeout_seconds: float = 1.0  # a probe not answered within this is a miss
    window: int = 3  # the estimate: median of the last N answered probes
    down_after: int = 2  # consecutive misses that make a cloudlet down
    margin_ms: float = 1.0  # a better cloudlet must be better by at least this ...
    margin_ratio: float = 0.2  # ... and by this fraction of the current RTT (the larger of the two)
    hold_seconds: float = 0.75  # ... for this long without a break
    min_dwell_seconds: float = 2.0  # no move by nearness sooner than this after the previous move

    def __post_init__(self) -> None:
        for name in ("interval_seconds", "timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("margin_ms", "margin_ratio", "hold_seconds", "min_dwell_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.window < 1 or self.down_after < 1:
            raise ValueError("window and down_after must be >= 1")
        if self.policy not in ("auto", "pinned"):
            raise ValueError(f"policy must be auto or pinned, not {self.policy!r}")


@dataclass
class Link:
    """What the probes said about one cloudlet."""

    samples: deque[float]
    misses: int = 0  # consecutive
    probes: int = 0
    answered: int = 0
    last_rtt: float | None = None

    @property
    def estimate(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def up(self, down_after: int) -> bool:
        return bool(self.samples) and self.misses < down_after


@dataclass(frozen=True)
class Decision:
    to: str
    fin: bool
    reason: str  # nearer | current_down


@dataclass
class Nearness:
    current: str
    config: NearnessConfig = field(default_factory=NearnessConfig)
    links: dict[str, Link] = field(default_factory=dict)
    last_move: float = float("-inf")
    _better_since: dict[str, float] = field(default_factory=dict)
    last_reason: str = "start"

    def set_cloudlets(self, names: list[str]) -> None:
        """The cloudlets of the fleet map (a cloudlet that left the map is forgotten)."""
        for name in names:
            self.links.setdefault(name, Link(deque(maxlen=self.config.window)))
        for gone in set(self.links) - set(names):
            del self.links[gone]
            self._better_since.pop(gone, None)

    def observe(self, name: str, rtt: float | None) -> None:
        link = self.links.get(name)
        if link is None:
            return
        link.probes += 1
        if rtt is None:
            link.misses += 1
            return
        link.misses = 0
        link.answered += 1
        link.last_rtt = rtt
        link.samples.append(rtt)

    def is_up(self, name: str) -> bool:
        link = self.links.get(name)
        return link is not None and link.up(self.config.down_after)

    def ranked(self, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Cloudlets that are up, nearest first; then the others (never answered or down), by name."""
        up = [(lnk.estimate, n) for n, lnk in self.links.items()
              if n not in exclude and lnk.up(self.config.down_after)]
        rest = sorted(n for n, lnk in self.links.items() if n not in exclude and not lnk.up(self.config.down_after))
        return [n for _, n in sorted(up)] + rest

    def best(self) -> str | None:
        ranked = [n for n in self.ranked() if self.is_up(n)]
        return ranked[0] if ranked else None

    def moved(self, to: str, now: float, reason: str) -> None:
        """A move happened (by this policy, a manual switch, or a heal)."""
        self.current = to
        self.last_move = now
        self.last_reason = reason
        self._better_since.clear()

    def decide(self, now: float) -> Decision | None:
        """Where to move now, or None to stay. Call after each round of ``observe``."""
        cfg = self.config
        if cfg.policy == "pinned":
            return None
        cur = self.links.get(self.current)
        if cur is None or not cur.up(cfg.down_after):
            if cur is not None and not cur.samples and cur.misses < cfg.down_after:
                return None  # not measured yet
            best = self.best()
            if best is not None and best != self.current:
                return Decision(best, fin=False, reason="current_down")
            return None
        cur_est = cur.estimate
        assert cur_est is not None
        margin = max(cfg.margin_ms / 1000.0, cfg.margin_ratio * cur_est)
        for name, link in self.links.items():
            est = link.estimate
            if name == self.current or est is None or not link.up(cfg.down_after) or est > cur_est - margin:
                self._better_since.pop(name, None)
            else:
                self._better_since.setdefault(name, now)
        if now - self.last_move < cfg.min_dwell_seconds:
            return None
        held = [(self.links[n].estimate, n) for n, since in self._better_since.items() if now - since >= cfg.hold_seconds]
        if not held:
            return None
        _, to = min(held)
        return Decision(to, fin=True, reason="nearer")

    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, link in sorted(self.links.items()):
            est = link.estimate
            out[name] = {"rtt_ms": round(est * 1000, 3) if est is not None else None,
                         "last_rtt_ms": round(link.last_rtt * 1000, 3) if link.last_rtt is not None else None,
                         "up": link.up(self.config.down_after), "misses": link.misses,
                         "probes": link.probes, "answered": link.answered}
        return out

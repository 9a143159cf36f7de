"""Added latency that holds still: paths interleaved sample by sample, per-round differences, and
confidence intervals, so that a figure is either a measurement or said to be noise.

One *round* is one ping-pong on each path, back to back, in an order that rotates from round to
round (so no path always goes first, right after an idle gap). A path's added latency against the
baseline is the **median of the per-round differences** (relay minus direct of the same round):
both samples saw the same moment of the machine. Its 95 % confidence interval is distribution-free
(the order statistics of the binomial around the median). The tail, ``p99``, is the p99 of one path
minus the p99 of the baseline over the same interleaved rounds, with a bootstrap interval over
rounds. A negative estimate, or an interval that reaches below zero, is not an added latency: the
result is ``None`` with a note saying the difference is within the noise.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interleave(pingers: dict[str, Callable[[], float]], rounds: int, warmup: int = 100) -> dict[str, list[float]]:
    """``rounds`` rounds of one sample per path (microseconds), the order rotating every round."""
    names = list(pingers)
    for _ in range(warmup):
        for name in names:
            pingers[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(pingers[name]())
    return out


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(median, low, high): the distribution-free 95 % interval of the median (order statistics)."""
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(ordered), ordered[lo], ordered[hi]


def p99_ci(path: Sequence[float], base: Sequence[float], resamples: int = 300,
           seed: int = 1) -> tuple[float, float, float]:
    """(p99(path) - p99(base), low, high): bootstrap over rounds (each round keeps its pair)."""
    n = len(path)
    estimate = _pct(path, 0.99) - _pct(base, 0.99)
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(_pct([path[i] for i in idx], 0.99) - _pct([base[i] for i in idx], 0.99))
    diffs.sort()
    return estimate, diffs[int(0.025 * resamples)], diffs[min(resamples - 1, int(0.975 * resamples))]


def added(path: Sequence[float], base: Sequence[float], name: str) -> dict[str, Any]:
    """The added latency of ``path`` over ``base`` (same rounds), or ``None`` with a note if it is noise."""
    if len(path) != len(base) or not path:
        raise ValueError("the same number of interleaved rounds on both paths is needed")
    p50, p50_lo, p50_hi = median_ci([a - b for a, b in zip(path, base, strict=True)])
    p99, p99_lo, p99_hi = p99_ci(path, base)
    out: dict[str, Any] = {
        f"{name}_us_p50": round(p50, 1), f"{name}_us_p50_ci95": [round(p50_lo, 1), round(p50_hi, 1)],
        f"{name}_us_p99": round(p99, 1), f"{name}_us_p99_ci95": [round(p99_lo, 1), round(p99_hi, 1)],
    }
    notes = []
    for key, est, lo in ((f"{name}_us_p50", p50, p50_lo), (f"{name}_us_p99", p99, p99_lo)):
        if est < 0 or lo < 0:
            out[key] = None
            notes.append(f"{key}: estimate {est:.1f} us with a 95 % interval from {lo:.1f} us: not "
                         "distinguishable from noise on this machine, so no figure")
    if notes:
        out[f"{name}_note"] = "; ".join(notes)
    return out

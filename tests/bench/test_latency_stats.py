"""The added-latency statistics: per-round differences, intervals, and no negative figure."""

from __future__ import annotations

import random

from cloudlet_bench.latency_stats import added, interleave, median_ci


def test_interleave_rotates_the_order_so_no_path_always_goes_first() -> None:
    order: list[str] = []
    pingers = {n: (lambda n=n: order.append(n) or 1.0) for n in ("a", "b", "c")}
    out = interleave(pingers, rounds=3, warmup=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_real_difference_is_found_within_its_interval() -> None:
    rng = random.Random(7)
    base = [10 + rng.expovariate(0.5) for _ in range(4000)]
    path = [b + 20 + rng.gauss(0, 2) for b in base]  # the relay adds 20 us to the same moment
    r = added(path, base, "x")
    lo, hi = r["x_us_p50_ci95"]
    assert lo <= r["x_us_p50"] <= hi and 19 < r["x_us_p50"] < 21 and hi - lo < 1
    assert r["x_us_p99"] is not None and r["x_us_p99"] > 0
    assert "x_note" not in r


def test_no_difference_is_reported_as_noise_not_as_a_negative_figure() -> None:
    rng = random.Random(3)
    base = [10 + rng.expovariate(0.5) for _ in range(2000)]
    path = [10 + rng.expovariate(0.5) for _ in range(2000)]  # the same distribution: nothing added
    r = added(path, base, "x")
    assert r["x_us_p50"] is None and "noise" in r["x_note"]
    assert r["x_us_p50_ci95"][0] <= 0 <= r["x_us_p50_ci95"][1]


def test_median_interval_narrows_with_more_rounds() -> None:
    rng = random.Random(5)
    few = [rng.gauss(0, 1) for _ in range(100)]
    many = [rng.gauss(0, 1) for _ in range(10000)]
    _, lo1, hi1 = median_ci(few)
    _, lo2, hi2 = median_ci(many)
    assert hi2 - lo2 < (hi1 - lo1) / 5

"""The agent's switching policy, probe by probe (cloudlet.client.nearness is pure: the clock is passed in)."""

from __future__ import annotations

import pytest
from cloudlet.client.nearness import Decision, Nearness, NearnessConfig

CFG = NearnessConfig(interval_seconds=0.25, window=3, down_after=2, margin_ms=1.0, margin_ratio=0.2,
                     hold_seconds=0.75, min_dwell_seconds=2.0)


def run(n: Nearness, rounds: list[dict[str, float | None]], start: float = 10.0, step: float = 0.25
        ) -> list[tuple[float, Decision]]:
    """Feed one round of probe results per step; apply every decision as the agent would."""
    out = []
    t = start
    for rtts in rounds:
        for name, rtt in rtts.items():
            n.observe(name, rtt)
        d = n.decide(t)
        if d is not None:
            out.append((t, d))
            n.moved(d.to, t, d.reason)
        t += step
    return out


def fresh(current: str = "a") -> Nearness:
    n = Nearness(current, CFG)
    n.set_cloudlets(["a", "b", "c"])
    return n


def test_a_nearer_cloudlet_wins_only_after_the_hold_time() -> None:
    n = fresh()
    steady = [{"a": 0.010, "b": 0.030, "c": 0.050}] * 12
    assert run(n, steady) == []
    drive = [{"a": 0.030, "b": 0.010, "c": 0.050}] * 12
    moves = run(n, drive, start=13.0)
    assert [(d.to, d.fin, d.reason) for _, d in moves] == [("b", True, "nearer")]
    # the median needs two of three samples (0.25 s), then b must stay better for 0.75 s
    assert moves[0][0] - 13.0 == pytest.approx(1.0)


def test_one_slow_probe_or_a_difference_inside_the_margin_moves_nothing() -> None:
    n = fresh()
    rounds = [{"a": 0.010, "b": 0.0095, "c": 0.050}] * 20  # b better by 0.5 ms: inside the 1 ms / 20 % margin
    rounds[5] = {"a": 0.200, "b": 0.0095, "c": 0.050}  # one spike of a
    rounds[6] = {"a": 0.010, "b": 0.0095, "c": 0.050}
    assert run(n, rounds) == []
    n2 = fresh()
    # 20 % of a 100 ms RTT is 20 ms: b better by 15 ms does not move a device on a slow link
    assert run(n2, [{"a": 0.100, "b": 0.085, "c": 0.3}] * 20) == []
    assert run(n2, [{"a": 0.100, "b": 0.070, "c": 0.3}] * 20, start=20.0)[0][1].to == "b"


def test_an_interrupted_advantage_starts_the_hold_again() -> None:
    n = fresh()
    better, worse = {"a": 0.010, "b": 0.002, "c": 0.05}, {"a": 0.010, "b": 0.030, "c": 0.05}
    flapping = ([better] * 2 + [worse] * 3) * 4  # the median says b for 0.5 s at most, each time broken off
    assert run(n, flapping) == []


def test_no_move_by_nearness_within_the_dwell_time() -> None:
    n = fresh()
    n.moved("a", 10.0, "manual")
    moves = run(n, [{"a": 0.030, "b": 0.005, "c": 0.05}] * 16, start=10.0)
    assert moves and moves[0][0] >= 12.0  # min_dwell_seconds = 2


def test_a_silent_current_cloudlet_is_left_at_once_without_fin_for_the_best_up() -> None:
    n = fresh()
    run(n, [{"a": 0.005, "b": 0.020, "c": 0.010}] * 4)
    n.moved("a", 0.0, "start")  # long ago: dwell does not apply to a dead link anyway
    moves = run(n, [{"a": None, "b": 0.020, "c": 0.010}] * 3, start=11.0)
    assert [(d.to, d.fin, d.reason) for _, d in moves] == [("c", False, "current_down")]
    assert moves[0][0] == pytest.approx(11.25)  # after down_after = 2 misses
    assert not n.is_up("a") and n.ranked() == ["c", "b", "a"]


def test_pinned_never_moves_by_itself() -> None:
    n = Nearness("a", NearnessConfig(policy="pinned"))
    n.set_cloudlets(["a", "b"])
    assert run(n, [{"a": None, "b": 0.001}] * 10) == []
    assert n.best() == "b"  # it still measures (status, and where broken connections heal)


def test_cloudlets_leaving_the_map_are_forgotten_and_bad_settings_refused() -> None:
    n = fresh()
    run(n, [{"a": 0.01, "b": 0.02, "c": 0.03}] * 2)
    n.set_cloudlets(["a", "b"])
    assert set(n.status()) == {"a", "b"}
    for bad in ({"window": 0}, {"margin_ratio": -1}, {"interval_seconds": 0}, {"policy": "random"}):
        with pytest.raises(ValueError):
            NearnessConfig(**bad)  # type: ignore[arg-type]

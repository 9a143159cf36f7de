"""The admission policy, driven with a fake clock (no sockets): who is evicted, who is refused."""

from __future__ import annotations

from cloudlet.common.admission import Admission, default_limits


def make(**kw: int) -> tuple[Admission, list[str], list[float]]:
    now = [0.0]
    evicted: list[str] = []
    a = Admission("t", max_open=kw.get("max_open", 100), max_pending=kw.get("max_pending", 10),
                  max_pending_per_source=kw.get("per_source", 5), clock=lambda: now[0])
    return a, evicted, now


def add(a: Admission, evicted: list[str], key: str, source: str = "x", talking: bool = False) -> bool:
    return a.accept(key, source, lambda: evicted.append(key), talking=talking)


def test_the_oldest_silent_connection_of_the_source_goes_first() -> None:
    a, evicted, now = make()
    for i in range(5):
        add(a, evicted, f"s{i}")
        now[0] += 0.1
    add(a, evicted, "t0", talking=True)  # talking: protected while silent ones remain
    now[0] += 0.1
    assert evicted == ["s0"] and a.pending == 5
    add(a, evicted, "n1")
    assert evicted == ["s0", "s1"]
    assert add(a, evicted, "other", source="y") and a.pending == 6  # another source has its own room


def test_a_burst_cannot_push_out_a_connection_accepted_a_moment_ago() -> None:
    a, evicted, now = make(per_source=3)
    add(a, evicted, "legit")  # silent at accept; its request is on its way
    for i in range(20):  # a burst in the same instant (one accept batch)
        add(a, evicted, f"b{i}")
    assert "legit" not in evicted and a.pending == 21  # admitted over the bound for now
    a.talking("legit")
    now[0] += 0.06  # past burst_age: the excess goes, silent ones only, oldest first
    a.sweep()
    assert "legit" not in evicted and a.pending == 3 and set(evicted) == {f"b{i}" for i in range(18)}


def test_slow_talkers_go_once_they_have_dripped_for_min_age() -> None:
    a, evicted, now = make(per_source=2)
    add(a, evicted, "slow1", talking=True)
    add(a, evicted, "slow2", talking=True)
    now[0] += 0.1
    add(a, evicted, "new")  # only young talking ones: admitted over the bound, nobody evicted yet
    assert evicted == [] and a.pending == 3
    now[0] += 0.2  # slow1 has been at its request for 0.3 s > min_age
    add(a, evicted, "new2")
    assert evicted == ["new", "slow1"]  # the silent one first, then the talker that dripped longest


def test_max_open_is_hard_the_oldest_silent_makes_room_else_refused() -> None:
    a, evicted, now = make(max_open=3, max_pending=10, per_source=10)
    add(a, evicted, "a", talking=True)
    add(a, evicted, "b")
    add(a, evicted, "c", talking=True)
    assert add(a, evicted, "d") and evicted == ["b"] and a.open == 3  # b's slot went to d
    a.closed("b")  # its close comes later and does not free a second slot
    assert a.open == 3
    a.started("a"), a.started("c"), a.started("d")  # all past their request: nothing to evict
    assert not add(a, evicted, "e") and a.counts["refused_open"] == 1
    a.closed("a")
    assert add(a, evicted, "e")


def test_default_limits_follow_the_descriptor_limit() -> None:
    assert default_limits(1024) == (480, 120, 60)
    max_open, max_pending, per_source = default_limits(65536)
    assert max_open == 32736 and max_pending == 4096 and per_source == 2048

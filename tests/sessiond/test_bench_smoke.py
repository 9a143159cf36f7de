"""The benchmark commands run end to end and report what they promise (tiny sizes; no timing asserts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cloudlet", "bench", *args, "--json"], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_proxy_reports_every_figure() -> None:
    if not shutil.which("socat"):
        pytest.skip("socat not installed (Debian package socat): it is the baseline")
    r = bench("proxy", "--gib", "0.03", "--rounds", "1", "--pings", "50", "--idle", "200")
    for key in ("direct_gbps", "socat_gbps", "session_gbps", "ratio_vs_direct", "ratio_vs_socat", "idle_session_kib"):
        assert isinstance(r[key], (int, float)), key
    assert r["latency_rounds"] == 50
    for key in ("added_latency_us_p50", "added_latency_us_p99"):
        lo, hi = r[key + "_ci95"]
        assert lo <= hi
        # a figure is never negative: it is a measurement within its interval, or null and said to be noise
        if r[key] is None:
            assert key in r["added_latency_note"] and "noise" in r["added_latency_note"]
        else:
            assert r[key] >= 0 and lo >= 0
    assert r["direct_gbps"] > 0 and r["session_gbps"] > 0 and r["socat_gbps"] > 0
    assert r["idle_sessions"] == 200


def test_bench_handover_storm_moves_every_session_and_loses_nothing() -> None:
    r = bench("handover", "--moves", "2", "--interval", "0.05", "--storm", "30", "--bystanders", "5",
              "--storm-seconds", "1", "--storm-rate", "10")
    storm = r["storm"]
    for key in ("sessions", "moves_per_s", "gap_ms_p50", "gap_ms_p99", "bytes_lost", "bytes_duplicated",
                "bystander_stall_ms_max"):
        assert storm[key] is not None, key
    assert storm["sessions"] == 30 and storm["moves"] == 30 + 10  # the train, then 1 s at 10 moves/s
    assert storm["bytes_lost"] == 0 and storm["bytes_duplicated"] == 0
    assert storm["gap_ms_p50"] >= storm["record_period_ms"] * 0.5  # a gap spans at least about one period
    assert storm["records_received"] > 35 * 20  # every session kept streaming (10 records/s for 3 s and more)


def test_bench_handover_fin_moves_lose_nothing() -> None:
    r = bench("handover", "--moves", "4", "--interval", "0.05")
    assert r["kinds"]["fin"]["moves"] == 4 and r["kinds"]["no_fin"]["moves"] == 4
    assert r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0
    assert r["kinds"]["no_fin"]["bytes_duplicated"] == 0
    for key in ("gap_ms_p50", "gap_ms_p99", "gap_ms_max"):
        assert r[key] > 0


@pytest.mark.skipif(not shutil.which("redis-benchmark") or not shutil.which("redis-server"),
                    reason="redis-server/redis-benchmark not installed (Debian packages redis-server, redis-tools)")
def test_bench_mobility_follows_the_drive_and_loses_nothing() -> None:
    r = bench("mobility", "--phase-seconds", "3")
    for key in ("switches", "app_errors", "bytes_lost", "bytes_duplicated", "latency_ms_p50", "latency_ms_p99",
                "oracle_latency_ms_p50", "stay_latency_ms_p50", "switch_delay_s_max"):
        assert r[key] is not None, key
    assert r["switches"] == 2 and r["runs"]["stay"]["switches"] == 0  # a -> b -> c by itself; stay stays
    assert r["app_errors"] == 0 and r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0
    assert all(run["app_errors"] == 0 and run["bytes_duplicated"] == 0 for run in r["runs"].values())
    assert r["runs"]["follow"]["requests"] > 50
    assert len(r["runs"]["follow"]["switch_delays_s"]) == 2
    assert r["switch_delay_s_max"] < 3  # it moved within the phase it was meant to


def test_bench_restart_keeps_every_session_across_clean_restarts() -> None:
    r = bench("restart", "--sessions", "4", "--restarts", "2", "--interval", "0.5")
    clean, upgrade, kill9 = r["clean"], r["upgrade"], r["kill9"]
    for kind in (clean, upgrade, kill9):
        for key in ("restarts", "sessions", "sessions_kept", "bytes_lost", "bytes_duplicated", "connections_closed",
                    "stall_ms_p99"):
            assert key in kind, key
    assert clean["stall_ms_p99"] is not None  # (after kill -9 the connections may close before any gap is seen)
    assert clean["restarts"] == 2 and clean["sessions"] == 4
    assert clean["sessions_kept"] == 4 and clean["connections_closed"] == 0  # handed over, none closed
    assert clean["bytes_lost"] == 0 and clean["bytes_duplicated"] == 0
    assert upgrade["sessions_kept"] == 4 and upgrade["connections_closed"] == 0  # the successor took them over
    assert upgrade["bytes_lost"] == 0 and upgrade["bytes_duplicated"] == 0
    assert kill9["bytes_duplicated"] == 0 and kill9["connections_closed"] == 4  # refused clearly, never replaced

"""`cloudlet bench migrate`: its accounting, and one real FW-vs-LM run on podman (+ CRIU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cloudlet_bench.migrate import Lines, criu_version

REPO = Path(__file__).resolve().parents[2]


def feed_lines(rx: Lines, seqs: list[int], times: list[float]) -> None:
    for s, t in zip(seqs, times, strict=True):
        rx.feed(f"MSG {s} 0\n".encode(), t)


def test_lines_counts_lost_and_duplicated_across_split_reads() -> None:
    rx = Lines()
    rx.feed(b"HELLO x\nMSG 1 5\nMSG 2", 1.0)
    rx.feed(b" 6\nMSG 2 6\nMSG 5 9\n", 2.0)
    assert rx.seqs == [1, 2, 2, 5]
    assert rx.accounting() == (2, 1)  # 3 and 4 lost, 2 duplicated


def test_gap_around_a_move_is_the_longest_silence_in_its_window() -> None:
    rx = Lines()
    feed_lines(rx, list(range(1, 7)), [0.000, 0.001, 0.002, 0.050, 0.051, 0.052])
    # the move starts at 0.0025; the stall until 0.050 is the gap
    assert rx.gap_around(0.0025, 0.051) == pytest.approx(48.0)
    assert rx.max_gap(skip_first=0) == pytest.approx(48.0)


@pytest.mark.podman
@pytest.mark.slow
def test_bench_migrate_runs_both_methods_side_by_side() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make deps installs it)")
    env = dict(os.environ, CONTAINERS_CONF=str(REPO / "etc" / "containers.conf"))
    out = subprocess.run(
        [sys.executable, "-m", "cloudlet", "bench", "migrate", "--json", "--moves", "1", "--blob", str(4 << 20)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    fw = result["method_fw"]
    assert fw["moves"] == 1
    assert fw["lines_lost"] == 0 and fw["lines_duplicated"] == 0
    assert fw["bystander_lines_lost"] == 0
    assert fw["throughput_mbps_direct"] > 0 and fw["throughput_mbps_forwarded"] > 0
    lm = result["method_lm"]
    if criu_version() is None:
        assert "skipped" in lm
        pytest.skip("no CRIU 4 installed: the LM half was skipped (tools/install-criu.sh installs it)")
    assert lm["moves"] == 1
    assert lm["checkpoint_bytes"] > 0
    # a checkpoint freezes the whole container: the bystander waits as long as the mover
    assert lm["bystander_gap_ms_max"] >= 0.5 * lm["gap_ms_p50"]

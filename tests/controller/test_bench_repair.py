"""The repair bench runs end to end and reports its figures (no timing asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.controller import podman, podman_env

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def test_repair_bench_reports_both_paths_and_cleans_up(podman_socket: str, demo_image: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudlet_bench.repair", "--runs", "1", "--interval", "1", "--json",
         "--quiet", "--podman-socket", podman_socket],
        capture_output=True, text=True, env=podman_env(), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "repair" and result["runs"] == 1 and result["interval_seconds"] == 1.0
    for path in ("event", "periodic"):
        assert len(result[f"{path}_running_ms"]) == 1 and result[f"{path}_running_ms_p50"] > 0
        assert result[f"{path}_serving_ms_p50"] >= result[f"{path}_running_ms_p50"]
    assert len(result["event_event_seen_ms"]) == 1  # the controller logged the died event
    assert result["periodic_restarts_by_event"] == 0 and "periodic_event_seen_ms" not in result
    leftovers = podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in leftovers if n.startswith("cloudlet-clbench-")]
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith("cloudlet-clbench-")]


def test_repair_bench_rejects_bad_options() -> None:
    for args in (["--runs", "0"], ["--interval", "0.1"]):
        proc = subprocess.run([sys.executable, "-m", "cloudlet_bench.repair", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "must be" in proc.stderr

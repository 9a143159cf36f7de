"""`cloudlet bench launch` runs end to end and reports its figures (no timing asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.controller import podman, podman_env

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def test_bench_launch_reports_figures_and_cleans_up(podman_socket: str, demo_image: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudlet", "bench", "launch", "--runs", "1", "--json", "--quiet",
         "--podman-socket", podman_socket],
        capture_output=True, text=True, env=podman_env(), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runs"] == 1 and len(result["launch_ms"]) == 1 and len(result["podman_run_ms"]) == 1
    assert result["launch_ms_p50"] > 0 and result["podman_run_ms_p50"] > 0 and result["podman_api_ms_p50"] > 0
    assert len(result["podman_api_ms"]) == 1
    assert result["ratio"] == pytest.approx(result["launch_ms_p50"] / result["podman_run_ms_p50"], rel=0.01)
    leftovers = podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in leftovers if n.startswith(("clbench-", "cloudlet-clbench-"))]
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith("cloudlet-clbench-")]

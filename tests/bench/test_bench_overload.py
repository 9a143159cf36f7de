"""`cloudlet bench overload --json` runs end to end at a small size and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def test_bench_overload_reports_every_figure() -> None:
    out = subprocess.run([sys.executable, "-m", "cloudlet", "bench", "overload", "--hostile", "600", "--legit", "20",
                          "--daemon-nofile", "1024", "--quiet", "--json"], capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout)
    for key in ("hostile_connections", "legit_attempts", "legit_failures", "legit_latency_ms_p99",
                "baseline_latency_ms_p99", "api_latency_ms_p99", "baseline_api_latency_ms_p99", "rss_mib_max"):
        assert isinstance(result[key], (int, float)), key
    assert result["hostile_connections"] == 600 and result["legit_attempts"] == 40
    assert result["legit_failures"] == 0, result["legit_failure_samples"]
    assert result["hostile_held_peak"] > 0 and result["rss_mib_max"] > 0
    assert out.returncode == 0, out.stderr[-2000:]  # the targets were met

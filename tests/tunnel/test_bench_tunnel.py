"""`cloudlet bench tunnel --json` runs end to end (small sizes) and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


def test_bench_tunnel_json_reports_all_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloudlet", "bench", "tunnel", "--json", "--quiet", "--megabytes", "8",
         "--rounds", "1", "--opens", "10", "--colds", "2", "--no-cipher-compare"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("openssh_gbps", "asyncssh_gbps", "ratio_vs_openssh", "channel_open_ms_p50", "cold_connect_ms_p50",
                "asyncssh_no_fast_path_gbps"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result)
    assert result["ratio_vs_openssh"] == pytest.approx(result["asyncssh_gbps"] / result["openssh_gbps"], rel=0.02)
    assert result["cold_connect_ms_p50"] > result["channel_open_ms_p50"]  # the point of keeping tunnels warm
    assert result["cipher"] == "aes128-gcm@openssh.com" and result["megabytes"] == 8


def test_bench_tunnel_help_and_bad_arguments() -> None:
    helped = subprocess.run([sys.executable, "-m", "cloudlet", "bench", "tunnel", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "ratio" not in helped.stderr and "--megabytes" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "cloudlet", "bench", "tunnel", "--rounds", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr

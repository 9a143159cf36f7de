"""The `cloudlet` console script is installed and dispatches to every component."""

import subprocess
import sys

import cloudlet


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet", *args], capture_output=True, text=True, timeout=60)


def test_version_matches_package() -> None:
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cloudlet {cloudlet.__version__}"


def test_no_command_prints_help_and_fails() -> None:
    out = run()
    assert out.returncode == 2
    assert "usage: cloudlet" in out.stdout

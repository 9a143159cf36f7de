"""``cloudlet status`` against a real cloudlet on this machine (sessiond + controller with podman):
all up, then the controller stopped, which is reported down with its reason, not a failure."""

from __future__ import annotations

import json
import subprocess
import sys

import cloudlet
import pytest
from support.controller import Stack

pytestmark = pytest.mark.podman


def status(stack: Stack, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet", "status", "--sessiond-socket", stack.sessiond_socket,
                           "--controller-url", stack.controller_url, "--timeout", "3", *extra],
                          capture_output=True, text=True, timeout=60, check=False)


async def test_status_reports_both_daemons_and_a_stopped_one_as_down(stack: Stack) -> None:
    up = status(stack, "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    report = json.loads(up.stdout)
    assert report["cloudlet"] == stack.cloudlet and report["all_up"] is True
    assert report["sessiond"]["state"] == "up" and report["sessiond"]["version"] == cloudlet.__version__
    assert stack.sessiond_proc is not None and report["sessiond"]["pid"] == stack.sessiond_proc.pid
    assert report["controller"]["state"] == "up" and report["controller"]["runtime"] == "podman"
    table = status(stack).stdout
    assert table.splitlines()[0] == f"cloudlet {stack.cloudlet}"
    assert "  sessiond   up   " in table and "  controller up   " in table and "tunnels    none" in table

    assert stack.controller_proc is not None
    stack.controller_proc.terminate()
    stack.controller_proc.wait(20)
    down = status(stack, "--json")
    assert down.returncode == 1  # not all up, and still a report
    report = json.loads(down.stdout)
    assert report["sessiond"]["state"] == "up"
    assert report["controller"]["state"] == "down" and stack.controller_url in report["controller"]["error"]
    assert "  controller down" in status(stack).stdout

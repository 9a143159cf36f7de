"""Tests marked ``sshd`` need a real OpenSSH sshd; skip them, saying why, where it cannot run."""

from __future__ import annotations

import pytest
from cloudlet_bench.harness.sshd import sshd_argv_available


@pytest.fixture(autouse=True)
def _needs_sshd(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("sshd") is None:
        return
    reasons = sshd_argv_available()
    if reasons:
        pytest.skip("tunnel tests need a real sshd: " + "; ".join(reasons))

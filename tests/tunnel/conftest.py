"""The SSH tunnel tests need a real OpenSSH sshd; skip them, saying why, where it cannot run."""

from __future__ import annotations

import pytest
from cloudlet_bench.harness.sshd import sshd_argv_available


@pytest.fixture(autouse=True)
def _needs_sshd() -> None:
    reasons = sshd_argv_available()
    if reasons:
        pytest.skip("tunnel tests need a real sshd: " + "; ".join(reasons))

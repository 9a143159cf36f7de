"""Fixtures for the cloudlet.fleet integration tests (helpers in ansible_fleet.py).

``podman_socket`` and ``demo_image`` are the controller tests' fixtures (tests/controller/conftest.py);
``fleet1``/``fleet2`` are one or two real cloudlets in the inventory group ``cloudlets``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ansible_fleet import Fleet, demo_image, podman_socket, start_fleet

__all__ = ["demo_image", "podman_socket"]


@pytest.fixture
async def fleet2(tmp_path: Path, podman_socket: str, demo_image: str) -> AsyncIterator[Fleet]:
    """Two cloudlets in the inventory group ``cloudlets``."""
    async for fleet in start_fleet(tmp_path, podman_socket, 2):
        yield fleet


@pytest.fixture
async def fleet1(tmp_path: Path, podman_socket: str, demo_image: str) -> AsyncIterator[Fleet]:
    """One cloudlet in the inventory group ``cloudlets``."""
    async for fleet in start_fleet(tmp_path, podman_socket, 1):
        yield fleet

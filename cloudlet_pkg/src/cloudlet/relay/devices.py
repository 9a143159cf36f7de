"""What sessiond knows of devices: which may attach, until when (pushed by the local controller).

A session credential names the device it was issued to (``cloudlet.protocol.credentials``). Every
attach, forward and peer-endpoint arrival with such a credential is checked here: an unknown, a
revoked or an expired device is refused ``DEVICE_REFUSED``. The controller owns the device
registry (``cloudlet.controller.devices``, with the hashed device secrets) and pushes each device's
state to its sessiond through the control API; revocation reaches a running sessiond at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DeviceState:
    device: str
    expires: int  # Unix seconds
    revoked: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "expires": self.expires, "revoked": self.revoked}


class DeviceGate:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._devices: dict[str, DeviceState] = {}

    def refusal(self, device: str) -> str | None:
        """Why ``device`` may not attach now, or None if it may."""
        state = self._devices.get(device)
        if state is None:
            return f"device {device!r} is not known on this cloudlet"
        if state.revoked:
            return f"device {device!r} was revoked"
        if state.expires < self.clock():
            return f"device {device!r} expired"
        return None

    def put(self, state: DeviceState) -> bool:
        """Store a device's state; True if it changed."""
        changed = self._devices.get(state.device) != state
        self._devices[state.device] = state
        return changed

    def forget(self, device: str) -> bool:
        return self._devices.pop(device, None) is not None

    def load(self, states: Iterable[DeviceState]) -> None:
        self._devices = {s.device: s for s in states}

    def all(self) -> list[DeviceState]:
        return sorted(self._devices.values(), key=lambda s: s.device)

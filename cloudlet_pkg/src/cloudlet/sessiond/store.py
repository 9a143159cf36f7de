"""The services a sessiond listens for, saved across restarts (``state_dir/services.json``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cloudlet.common.logs import event
from cloudlet.relay.devices import DeviceState
from cloudlet.relay.interfaces import ServiceEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SavedService:
    name: str
    port: int
    listen: str
    backend: str


class ServiceStore:
    """Writes are atomic (a temporary file, then rename); a damaged file is reported, not fatal."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, services: Iterable[ServiceEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"services": [{"name": e.name, "port": e.port, "listen": e.listen, "backend": e.backend} for e in services]}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def load(self) -> list[SavedService]:
        if not self.path.exists():
            return []
        try:
            items = json.loads(self.path.read_text())["services"]
            if not isinstance(items, list):
                raise TypeError("services is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            event(log, logging.ERROR, "cannot read saved services; starting without them", path=str(self.path), error=str(exc))
            return []
        out = []
        for item in items:
            try:
                out.append(SavedService(str(item["name"]), int(item["port"]), str(item.get("listen", "0.0.0.0")),
                                        str(item["backend"])))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                event(log, logging.ERROR, "cannot restore service", service=item.get("name") if isinstance(item, dict) else None,
                      error=str(exc))
        return out


class DeviceStore:
    """The devices the controller pushed (``state_dir/devices.json``): their expiry and revocation."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, states: Iterable[DeviceState]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"devices": [d.to_json() for d in states]}, indent=2) + "\n")
        os.replace(tmp, self.path)

    def load(self) -> list[DeviceState]:
        if not self.path.exists():
            return []
        try:
            items = json.loads(self.path.read_text())["devices"]
            return [DeviceState(str(d["device"]), int(d["expires"]), bool(d.get("revoked", False))) for d in items]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            event(log, logging.ERROR, "cannot read saved devices; devices must be pushed again by the controller",
                  path=str(self.path), error=str(exc))
            return []

"""Device credentials: each device (or application) gets its own, limited, revocable credential.

A device credential is ``cd1.<device>.<secret>`` (``secret`` 32 random bytes, base64url). The
controller keeps only ``sha256(secret)`` with the device's scope (the services it may use), its
expiry and whether it was revoked, in ``state_dir/devices.json``. The same record is registered
on every cloudlet of the fleet (``cloudlet device issue`` on one, the ``cloudlet.fleet.device``
module on all), so the credential works everywhere; the secret itself never leaves the place it
was made except to the device. With it a device may create sessions of its services, read their
fleet map and end its own sessions, nothing else (``cloudlet.controller.app``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cloudlet.common.logs import event
from cloudlet.common.names import is_name

log = logging.getLogger(__name__)

PREFIX = "cd1"
MAX_SERVICES = 64
ALL = "*"  # a scope entry meaning every service


class DeviceAuthError(Exception):
    """A device credential was refused: ``status`` 401 or 403, ``code`` for the API and metrics."""

    def __init__(self, status: int, code: str, message: str, device: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.device = device


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def make_token(device: str, secret: str) -> str:
    return f"{PREFIX}.{device}.{secret}"


def split_token(token: str) -> tuple[str, str] | None:
    """``(device, secret)`` of a device credential, or None if ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not is_name(parts[1]) or not 20 <= len(parts[2]) <= 100:
        return None
    if not all(c.isalnum() or c in "-_" for c in parts[2]) or not parts[2].isascii():
        return None
    return parts[1], parts[2]


def is_device_token(token: str) -> bool:
    return token.startswith(PREFIX + ".")


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device: str
    sha256: str
    services: tuple[str, ...]
    expires: int
    revoked: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    description: str = ""

    def allows(self, service: str) -> bool:
        return ALL in self.services or service in self.services

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "sha256": self.sha256, "services": list(self.services), "expires": self.expires,
                "revoked": self.revoked, "created": self.created, "description": self.description}

    @classmethod
    def from_request(cls, device: str, body: Any, now: float | None = None) -> DeviceRecord:
        """Validate ``PUT /v1/devices/{device}`` (``ValueError`` naming the field)."""
        if not is_name(device):
            raise ValueError(f"invalid device id {device!r}: 1-32 characters of a-z, 0-9 and '-'")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        unknown = set(body) - {"sha256", "services", "expires", "description"}
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        sha = body.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("sha256 must be the hex SHA-256 of the device secret (64 lower-case hex digits)")
        services = body.get("services")
        if (not isinstance(services, list) or not services or len(services) > MAX_SERVICES
                or not all(s == ALL or is_name(s) for s in services)):
            raise ValueError(f"services must be a list of 1 to {MAX_SERVICES} service names (or \"*\" for all)")
        expires = body.get("expires")
        if not isinstance(expires, int) or isinstance(expires, bool):
            raise ValueError("expires must be Unix seconds (an integer)")
        if expires <= (time.time() if now is None else now):
            raise ValueError("expires is in the past")
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > 200:
            raise ValueError("description must be a string of at most 200 characters")
        return cls(device, sha, tuple(sorted(set(services))), expires, description=description)


class DeviceRegistry:
    """The devices of this cloudlet, persisted (only hashes, never secrets)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, DeviceRecord] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            items = json.loads(self.path.read_text())["devices"]
            self._records = {d["device"]: DeviceRecord(str(d["device"]), str(d["sha256"]), tuple(d["services"]),
                                                       int(d["expires"]), bool(d.get("revoked", False)),
                                                       int(d.get("created", 0)), str(d.get("description", "")))
                             for d in items}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            event(log, logging.ERROR, "cannot read the device registry; no device can authenticate",
                  path=str(self.path), error=str(exc))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"devices": [r.to_json() for r in self.all()]}, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def all(self) -> list[DeviceRecord]:
        return sorted(self._records.values(), key=lambda r: r.device)

    def get(self, device: str) -> DeviceRecord | None:
        return self._records.get(device)

    def put(self, record: DeviceRecord) -> str:
        """``created``, ``changed`` (a new secret, scope or expiry; a revoked device comes back) or ``unchanged``."""
        old = self._records.get(record.device)
        if old is not None and replace(old, created=record.created) == record:
            return "unchanged"
        if old is not None:
            record = replace(record, created=old.created)
        self._records[record.device] = record
        self._save()
        return "created" if old is None else "changed"

    def revoke(self, device: str) -> DeviceRecord | None:
        """Mark ``device`` revoked (kept until it expires, so every sessiond keeps refusing it)."""
        old = self._records.get(device)
        if old is None:
            return None
        if not old.revoked:
            self._records[device] = replace(old, revoked=True)
            self._save()
        return self._records[device]

    def authenticate(self, token: str, now: float | None = None) -> DeviceRecord:
        parts = split_token(token)
        if parts is None:
            raise DeviceAuthError(401, "unauthorized", "not a device credential (cd1.<device>.<secret>)")
        device, secret = parts
        record = self._records.get(device)
        if record is None or not hmac.compare_digest(digest(secret), record.sha256):
            raise DeviceAuthError(401, "unauthorized", "unknown device or wrong device secret", device)
        if record.revoked:
            raise DeviceAuthError(401, "device_revoked", f"device {device} was revoked", device)
        if record.expires < (time.time() if now is None else now):
            raise DeviceAuthError(401, "device_expired", f"device {device}'s credential expired", device)
        return record

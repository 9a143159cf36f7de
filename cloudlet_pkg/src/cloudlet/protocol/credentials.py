"""Session credentials: unguessable, bound to one service and one anchor, checked without shared state.

Format (docs/architecture.md): ``v2.<service>.<anchor>.<device>.<issued>.<nonce>.<mac>`` where
``device`` is the device the session was issued to (empty when an operator asked, with the admin
token) and ``mac`` is the first 16 bytes of HMAC-SHA256(fleet secret, everything before it),
base64url without padding. The controller of cloudlet ``anchor`` issues it; every sessiond of the fleet
verifies it with the same secret, and only the anchor ever starts a session with it (others forward
to the anchor), so the anchor alone decides whether its session lives or has ended.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cloudlet.common.names import is_name

VERSION = "v2"
MAX_CREDENTIAL_LEN = 160
_B64 = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch


class CredentialError(Exception):
    """A credential was refused; ``reason`` says why (maps to a wire status code)."""

    def __init__(self, reason: "Refusal", message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Refusal(Enum):
    BAD_CREDENTIAL = "bad_credential"
    WRONG_SERVICE = "wrong_service"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Credential:
    service: str
    anchor: str  # the cloudlet where the session lives (the issuing controller's)
    device: str  # the device it was issued to ("" when issued with the admin token)
    issued: int
    nonce: str
    token: str

    @property
    def session_id(self) -> str:
        """The public identifier used in logs, metrics and the control API (never the token)."""
        return self.nonce


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()[:16])


def load_secret(path: str | Path) -> bytes:
    """Read the fleet secret; refuse one that is too short to be a secret."""
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise ValueError(f"fleet secret {path} is too short ({len(data)} bytes, need at least 16)")
    return data


def issue(secret: bytes, service: str, anchor: str, now: float | None = None, device: str = "") -> Credential:
    """Make a new credential for ``service`` anchored at cloudlet ``anchor`` (called by its controller)."""
    if not is_name(service):
        raise ValueError(f"invalid service name {service!r}")
    if not is_name(anchor):
        raise ValueError(f"invalid anchor cloudlet name {anchor!r}")
    if device and not is_name(device):
        raise ValueError(f"invalid device id {device!r}")
    issued = int(time.time() if now is None else now)
    nonce = _b64(secrets.token_bytes(16))
    body = f"{VERSION}.{service}.{anchor}.{device}.{issued}.{nonce}"
    return Credential(service, anchor, device, issued, nonce, f"{body}.{_mac(secret, body)}")


def anchor_of(token: str) -> str | None:
    """The anchor a token names, read without the secret (for clients choosing a target); None if malformed."""
    parts = token.split(".")
    return parts[2] if len(parts) == 7 and parts[0] == VERSION and is_name(parts[2]) else None


def parse(secret: bytes, token: str) -> Credential:
    """Check the MAC and syntax of ``token``; no service, anchor, device or lifetime check."""
    if len(token) > MAX_CREDENTIAL_LEN:
        raise CredentialError(Refusal.BAD_CREDENTIAL, "credential too long")
    parts = token.split(".")
    if parts and parts[0] == "v1":
        raise CredentialError(Refusal.BAD_CREDENTIAL, "a v1 credential (no anchor): ask the controller for a new one")
    if len(parts) != 7 or parts[0] != VERSION:
        raise CredentialError(Refusal.BAD_CREDENTIAL, "not a v2 session credential")
    _, service, anchor, device, issued_s, nonce, mac = parts
    if (not is_name(service) or not is_name(anchor) or (device and not is_name(device)) or not issued_s.isascii()
            or not issued_s.isdigit() or not _B64.fullmatch(nonce) or not _B64.fullmatch(mac)):
        raise CredentialError(Refusal.BAD_CREDENTIAL, "malformed session credential")
    body = f"{VERSION}.{service}.{anchor}.{device}.{issued_s}.{nonce}"
    if not hmac.compare_digest(_mac(secret, body), mac):
        raise CredentialError(Refusal.BAD_CREDENTIAL, "session credential not issued by this fleet")
    return Credential(service, anchor, device, int(issued_s), nonce, token)


def verify(
    secret: bytes,
    token: str,
    service: str | None,
    lifetime_seconds: float,
    now: float | None = None,
) -> Credential:
    """Parse ``token`` and check that it belongs to ``service`` (if given) and is not expired."""
    cred = parse(secret, token)
    if service is not None and cred.service != service:
        raise CredentialError(
            Refusal.WRONG_SERVICE,
            f"credential belongs to service {cred.service!r}, not {service!r}",
        )
    current = time.time() if now is None else now
    if current - cred.issued > lifetime_seconds:
        raise CredentialError(Refusal.EXPIRED, "session credential expired")
    return cred

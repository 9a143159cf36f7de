"""One SSH peer's settings: the keys of a ``[peers.NAME]`` table with ``transport = "ssh"`` (docs/tunnels.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudlet.common.addresses import parse_hostport
from cloudlet.tunnel.errors import TunnelConfigError

# Measured with `cloudlet bench tunnel` (docs/bench.md): AES-GCM (AES-NI) is clearly faster than
# chacha20-poly1305 both in OpenSSH and in asyncssh on x86-64 here, so it is offered first.
DEFAULT_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)


_REQUIRED = ("host", "user", "client_key", "known_hosts", "endpoint")


@dataclass(frozen=True, slots=True)
class SshPeerConfig:
    """One SSH peer (keys of its ``[peers.NAME]`` table; documented in docs/tunnels.md)."""

    name: str
    host: str
    user: str
    client_key: str
    known_hosts: str
    endpoint_host: str
    endpoint_port: int
    port: int = 22
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3
    connect_timeout: float = 5.0
    open_timeout: float = 3.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    rtt_interval: float = 5.0
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    window: int = 2 * 1024 * 1024
    max_pktsize: int = 32768
    rekey_bytes: int = 1 << 30
    rekey_seconds: float = 3600.0
    fast_path: bool = True

    @classmethod
    def from_table(cls, name: str, table: dict[str, Any]) -> "SshPeerConfig":
        where = f"peer {name!r} (transport ssh)"
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "endpoint_host", "endpoint_port")}
        known |= {"endpoint", "transport"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise TunnelConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; see docs/tunnels.md")
        missing = [k for k in _REQUIRED if not table.get(k)]
        if missing:
            raise TunnelConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        try:
            ep_host, ep_port = parse_hostport(str(table["endpoint"]), f"{where} endpoint")
        except ValueError as exc:
            raise TunnelConfigError(str(exc)) from None
        kwargs: dict[str, Any] = {}
        numbers: dict[str, type] = {
            "port": int, "keepalive_interval": float, "keepalive_count_max": int, "connect_timeout": float,
            "open_timeout": float, "backoff_initial": float, "backoff_max": float, "rtt_interval": float,
            "window": int, "max_pktsize": int, "rekey_bytes": int, "rekey_seconds": float,
        }
        for key, kind in numbers.items():
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                    raise TunnelConfigError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
                if value < 0 or (key not in ("keepalive_interval", "rtt_interval") and value == 0):
                    raise TunnelConfigError(f"{where}: {key} must be positive, got {value!r}")
                kwargs[key] = kind(value)
        if "port" in kwargs and not 1 <= kwargs["port"] <= 65535:
            raise TunnelConfigError(f"{where}: port {kwargs['port']} out of range")
        if "ciphers" in table:
            ciphers = table["ciphers"]
            if isinstance(ciphers, str):
                ciphers = [c.strip() for c in ciphers.split(",") if c.strip()]
            if not isinstance(ciphers, list) or not ciphers or not all(isinstance(c, str) for c in ciphers):
                raise TunnelConfigError(f"{where}: ciphers must be a non-empty list of cipher names")
            kwargs["ciphers"] = tuple(ciphers)
        if "fast_path" in table:
            if not isinstance(table["fast_path"], bool):
                raise TunnelConfigError(f"{where}: fast_path must be true or false")
            kwargs["fast_path"] = table["fast_path"]
        for key in ("host", "user", "client_key", "known_hosts"):
            if not isinstance(table[key], str):
                raise TunnelConfigError(f"{where}: {key} must be a string")
        return cls(name=name, host=table["host"], user=table["user"], client_key=table["client_key"],
                   known_hosts=table["known_hosts"], endpoint_host=ep_host, endpoint_port=ep_port, **kwargs)

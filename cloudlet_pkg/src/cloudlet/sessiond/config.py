"""The sessiond's configuration: the ``[sessiond]`` table plus ``[peers.*]`` (docs/sessiond.md)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cloudlet.common.addresses import is_loopback, parse_hostport
from cloudlet.common.names import check_name


@dataclass
class SessiondConfig:
    """The ``[sessiond]`` table plus ``[peers.*]`` (every key documented in docs/sessiond.md)."""

    cloudlet: str
    secret_file: str
    control_socket: str = "/run/cloudlet/sessiond.sock"
    state_dir: str = "/var/lib/cloudlet/sessiond"
    peer_listen: str = "127.0.0.1:7700"
    metrics_listen: str = "127.0.0.1:9701"
    grace_seconds: float = 30.0
    buffer_bytes: int = 1048576
    replay_bytes: int = 2097152
    max_sessions: int = 100000
    header_timeout_seconds: float = 5.0
    credential_lifetime_seconds: float = 86400.0
    backend_connect_timeout_seconds: float = 5.0
    peer_connect_timeout_seconds: float = 3.0
    peer_listen_allow_remote: bool = False
    splice_threshold_bytes: int = 1048576
    log_level: str = "info"
    log_format: str = "json"
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessiondConfig":
        unknown_top = set(data) - {"sessiond", "peers"}
        if unknown_top:
            raise ValueError(f"unknown config table(s): {', '.join(sorted(unknown_top))}")
        table = dict(data.get("sessiond", {}))
        known = {f.name for f in fields(cls)} - {"peers"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"unknown [sessiond] key(s): {', '.join(sorted(unknown))}")
        for key in ("cloudlet", "secret_file"):
            if key not in table:
                raise ValueError(f"[sessiond] {key} is required")
        cfg = cls(**table, peers={str(k): dict(v) for k, v in data.get("peers", {}).items()})
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "SessiondConfig":
        with open(path, "rb") as fh:
            return cls.from_dict(tomllib.load(fh))

    def validate(self) -> None:
        check_name(self.cloudlet, "cloudlet name")
        for name in self.peers:
            check_name(name, "peer name")
        host, _ = parse_hostport(self.peer_listen, "peer_listen")
        if not self.peer_listen_allow_remote and not is_loopback(host):
            raise ValueError(f"peer_listen {self.peer_listen!r} is not a loopback address "
                             "(peers reach it through their tunnel; set peer_listen_allow_remote = true to override)")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        for key in ("grace_seconds", "header_timeout_seconds", "credential_lifetime_seconds",
                    "backend_connect_timeout_seconds", "peer_connect_timeout_seconds"):
            if float(getattr(self, key)) <= 0:
                raise ValueError(f"{key} must be positive")
        if int(self.buffer_bytes) < 1024 or int(self.max_sessions) < 1:
            raise ValueError("buffer_bytes must be at least 1024 and max_sessions at least 1")
        if int(self.replay_bytes) < 0:
            raise ValueError("replay_bytes must be >= 0 (0: resumable sessions replay nothing)")

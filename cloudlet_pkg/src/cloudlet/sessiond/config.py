"""The sessiond's configuration: the ``[sessiond]`` table plus ``[peers.*]`` (docs/sessiond.md).

One model, :class:`SessiondConfig`, validated by the common loader: every problem names its key
(``sessiond.grace_seconds``, ``peers.b.connect_timeout``) and all of them are reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from cloudlet.common.addresses import is_loopback, parse_hostport
from cloudlet.common.admission import default_limits
from cloudlet.common.config import ConfigError, HostPort, Name, Section, check_tables, read_toml, validate
from cloudlet.protocol import credentials
from cloudlet.tunnel.config import SshPeerConfig

Positive = Annotated[float, Field(gt=0)]
LOG_LEVELS = Literal["debug", "info", "warning", "error"]


class TcpPeer(Section):
    """A peer reached over plain TCP (``transport = "tcp"``): a loopback or private address map."""

    transport: Literal["tcp"] = "tcp"
    address: HostPort


def _transport(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("transport", "tcp"))
    return str(getattr(value, "transport", "tcp"))


Peer = Annotated[Annotated[TcpPeer, Tag("tcp")] | Annotated[SshPeerConfig, Tag("ssh")], Discriminator(_transport)]


class SessiondConfig(Section):
    """The keys of ``[sessiond]`` (every one documented in docs/sessiond.md) and the ``[peers.*]`` tables."""

    cloudlet: Name
    secret_file: Annotated[str, Field(min_length=1)]
    control_socket: str = "/run/cloudlet/sessiond.sock"
    state_dir: str = "/var/lib/cloudlet/sessiond"
    peer_listen_allow_remote: bool = False  # (before peer_listen: its check reads it)
    peer_listen: HostPort = "127.0.0.1:7700"
    metrics_listen: str = "127.0.0.1:9701"
    grace_seconds: Positive = 30.0
    buffer_bytes: Annotated[int, Field(ge=1024)] = 1048576
    held_bytes_budget: Annotated[int, Field(ge=1024)] = 268435456  # all detached sessions together
    replay_bytes: Annotated[int, Field(ge=0)] = 2097152  # 0: resumable sessions replay nothing
    max_sessions: Annotated[int, Field(ge=1)] = 100000
    max_sessions_per_device: Annotated[int, Field(ge=1)] = 256  # live sessions of one device credential here
    header_timeout_seconds: Positive = 5.0
    # on a clean stop under systemd (or any $NOTIFY_SOCKET fd store): hand the resumable sessions
    # over to the next process instead of ending them (sessiond/handoff.py, docs/sessiond.md)
    handoff: bool = True
    handoff_flush_seconds: Positive = 2.0
    credential_lifetime_seconds: Positive = 86400.0
    # sessions remembered (started, ended) until their credential expires; beyond it, credentials
    # older than the oldest remembered may not start a session (docs/sessiond.md)
    session_record_limit: Annotated[int, Field(ge=1000)] = 100000
    backend_connect_timeout_seconds: Positive = 5.0
    peer_connect_timeout_seconds: Positive = 3.0
    splice_threshold_bytes: int = 1048576  # < 0: never splice
    # connection admission (docs/sessiond.md); 0: derived from the descriptor limit
    max_connections: Annotated[int, Field(ge=0)] = 0
    max_pending_connections: Annotated[int, Field(ge=0)] = 0
    max_pending_per_source: Annotated[int, Field(ge=0)] = 0
    log_level: LOG_LEVELS = "info"
    log_format: Literal["json", "text"] = "json"
    peers: dict[Name, Peer] = Field(default_factory=dict)

    @field_validator("peer_listen")
    @classmethod
    def _loopback(cls, value: str, info: ValidationInfo) -> str:
        if not info.data.get("peer_listen_allow_remote") and not is_loopback(parse_hostport(value)[0]):
            raise ValueError("not a loopback address (peers reach it through their tunnel; "
                             "set peer_listen_allow_remote = true to override)")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, value: str) -> str:
        if value:  # "" turns the metrics port off
            parse_hostport(value, "address")
        return value

    def admission_limits(self) -> tuple[int, int, int]:
        """``(max_open, max_pending, max_pending_per_source)``: 0 in the file means derived from the descriptor limit."""
        auto_open, auto_pending, auto_source = default_limits()
        max_open = self.max_connections or auto_open
        max_pending = min(self.max_pending_connections or auto_pending, max_open)
        return max_open, max_pending, min(self.max_pending_per_source or auto_source, max_pending)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sessiond config") -> SessiondConfig:
        problems = check_tables(data, ("sessiond", "peers"), source)
        if problems:
            raise ConfigError(source, problems)
        table = dict(data.get("sessiond", {}))
        if "peers" in table:
            raise ConfigError(source, ["sessiond.peers: unknown key (peers are [peers.NAME] tables)"])
        cfg = validate(cls, {**table, "peers": data.get("peers", {})}, source, locate=_locate)
        return cfg.model_copy(update={"peers": peer_configs(cfg.peers)})

    @classmethod
    def load(cls, path: str | Path) -> SessiondConfig:
        return cls.from_dict(read_toml(path), str(path))


def _locate(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Errors on peers keep their path (``peers.b.port``, without the union's tag); the rest is ``[sessiond]``."""
    if loc and loc[0] == "peers":
        return tuple(p for i, p in enumerate(loc) if not (i == 2 and p in ("tcp", "ssh")))
    return ("sessiond", *loc)


# Keys a running sessiond cannot change in place: a reload that changes one is refused (nothing is
# applied) and names them; ``systemctl restart`` applies them and hands the sessions over.
RESTART_KEYS = ("cloudlet", "secret_file", "control_socket", "state_dir", "peer_listen", "peer_listen_allow_remote",
                "metrics_listen", "credential_lifetime_seconds", "session_record_limit", "log_format")


def check_files(config: SessiondConfig, keys: bool = True) -> list[str]:
    """What the file itself cannot show: the secret and (``keys``) the peers' key files.

    ``--check-config`` checks both; a start and a reload need only the secret (a tunnel whose key
    files are missing yet retries until they are there, as on a first rollout)."""
    problems = []
    try:
        credentials.load_secret(config.secret_file)
    except (OSError, ValueError) as exc:
        problems.append(f"sessiond.secret_file: {exc}")
    for name, peer in config.peers.items() if keys else ():
        for key in ("client_key", "known_hosts"):
            path = getattr(peer, key, None)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"peers.{name}.{key}: cannot read {path}")
    return problems


class _PeerTables(Section):
    peers: dict[Name, Peer]


def peer_configs(peers: Mapping[str, Any]) -> dict[str, TcpPeer | SshPeerConfig]:
    """``[peers.*]`` tables as models (those already validated pass through), SSH peers named."""
    if all(isinstance(p, (TcpPeer, SshPeerConfig)) for p in peers.values()):
        models: dict[str, TcpPeer | SshPeerConfig] = dict(peers)
    else:
        models = dict(validate(_PeerTables, {"peers": dict(peers)}, "[peers]", locate=_locate).peers)
    return {n: p.model_copy(update={"name": n}) if isinstance(p, SshPeerConfig) else p for n, p in models.items()}

"""One SSH peer's settings: the keys of a ``[peers.NAME]`` table with ``transport = "ssh"`` (docs/tunnels.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints

from cloudlet.common.addresses import parse_hostport
from cloudlet.common.config import HostPort, Section, validate

# Measured with `cloudlet bench tunnel` (docs/bench.md): AES-GCM (AES-NI) is clearly faster than
# chacha20-poly1305 both in OpenSSH and in asyncssh on x86-64 here, so it is offered first.
DEFAULT_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


def _ciphers(value: Any) -> Any:
    if isinstance(value, str):  # "a,b" is accepted too
        value = [c.strip() for c in value.split(",") if c.strip()]
    return tuple(value) if isinstance(value, list) else value


class SshPeerConfig(Section):
    """One SSH peer: the keys of its ``[peers.NAME]`` table (documented in docs/tunnels.md)."""

    transport: Literal["ssh"] = "ssh"
    name: str = ""  # the table's name (filled in from the key of ``[peers.NAME]``)
    host: NonEmpty
    user: NonEmpty
    client_key: NonEmpty
    known_hosts: NonEmpty
    endpoint: HostPort  # the peer's peer endpoint, as seen on the peer (its sessiond peer_listen)
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    keepalive_interval: Annotated[float, Field(ge=0)] = 5.0
    keepalive_count_max: PositiveInt = 3
    connect_timeout: Positive = 5.0
    open_timeout: Positive = 3.0
    backoff_initial: Positive = 0.2
    backoff_max: Positive = 10.0
    rtt_interval: Annotated[float, Field(ge=0)] = 5.0
    ciphers: Annotated[tuple[NonEmpty, ...], BeforeValidator(_ciphers), Field(min_length=1)] = DEFAULT_CIPHERS
    window: PositiveInt = 2 * 1024 * 1024
    max_pktsize: PositiveInt = 32768
    rekey_bytes: PositiveInt = 1 << 30
    rekey_seconds: Positive = 3600.0
    fast_path: bool = True

    @property
    def endpoint_host(self) -> str:
        return parse_hostport(self.endpoint)[0]

    @property
    def endpoint_port(self) -> int:
        return parse_hostport(self.endpoint)[1]

    @classmethod
    def from_table(cls, name: str, table: dict[str, Any]) -> SshPeerConfig:
        """Validate one ``[peers.NAME]`` table (``ConfigError`` naming every key at fault)."""
        cfg = validate(cls, {**table, "transport": table.get("transport", "ssh")}, f"[peers.{name}]",
                       locate=lambda loc: ("peers", name, *loc))
        return cfg.model_copy(update={"name": name})

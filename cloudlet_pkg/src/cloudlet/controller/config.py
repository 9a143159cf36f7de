"""Controller configuration (TOML). Every key is documented in docs/controller.md.

```toml
[controller]
cloudlet = "a"
listen = "127.0.0.1:8700"
token_file = "/etc/cloudlet/controller.token"
secret_file = "/etc/cloudlet/fleet.secret"
runtime = "podman"                      # or "kubernetes"
sessiond_socket = "/run/cloudlet/sessiond.sock"
session_host = "127.0.0.1"              # the address clients are told to connect to
session_listen = "0.0.0.0"              # where sessiond listens for a service's session port
port_range = [31000, 31999]
ready_timeout_seconds = 30
reconcile_interval_seconds = 5
runtime_events = true                   # reconcile at once on container events (podman)
event_debounce_seconds = 0.05           # a burst of events within this gives one pass
max_services = 500

[podman]
socket = "/run/podman/podman.sock"
network = ""                            # default: cloudlet-<cloudlet>

[kubernetes]
kubeconfig = "/etc/rancher/k3s/k3s.yaml" # "in-cluster" inside a Pod
namespace = "default"
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from cloudlet.common.addresses import is_loopback, parse_hostport
from cloudlet.common.config import ConfigError, HostPort, Name, Section, TomlTuple, check_tables, read_toml, validate

__all__ = ["ConfigError", "ControllerConfig", "FleetConfig", "FleetMember", "KubernetesConfig", "PodmanConfig",
           "from_dict", "load"]

Positive = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class PodmanConfig(Section):
    """``[podman]``: the podman runtime."""

    socket: str = "/run/podman/podman.sock"
    network: str = ""  # default: cloudlet-<cloudlet>


class KubernetesConfig(Section):
    """``[kubernetes]``: the kubernetes runtime."""

    kubeconfig: str = "/etc/rancher/k3s/k3s.yaml"  # "in-cluster" inside a Pod
    namespace: str = "default"
    context: str = ""


class FleetMember(Section):
    """Another cloudlet of the fleet: its name and its controller's API."""

    name: Name
    api: Annotated[str, Field(pattern=r"^https?://[^/\s]+$")]  # http(s)://HOST:PORT


class FleetConfig(Section):
    """``[fleet]``: the other cloudlets (written by the roles from the inventory), for the fleet map."""

    members: list[FleetMember] = Field(default_factory=list)
    ca_file: str = ""  # the fleet CA that signs the members' API certificates (https members)
    map_timeout_seconds: Positive = 2.0  # per member
    map_cache_seconds: Annotated[float, Field(ge=0)] = 2.0


class ControllerConfig(Section):
    """The keys of ``[controller]`` (every one documented in docs/controller.md), ``[podman]`` and ``[kubernetes]``."""

    cloudlet: Name
    listen: HostPort = "127.0.0.1:8700"  # HTTPS when tls_cert_file is set
    local_listen: str = "127.0.0.1:8701"  # plain HTTP for local tools, loopback only ("" = none)
    tls_cert_file: str = ""  # this controller's certificate (signed by the fleet CA), PEM, chain included
    tls_key_file: str = ""
    # plain HTTP on a non-loopback `listen` (a lab behind its own TLS proxy); never for a real fleet
    insecure_plain_http: bool = False
    token_file: str = "/etc/cloudlet/controller.token"
    secret_file: str = "/etc/cloudlet/fleet.secret"
    runtime: Literal["podman", "kubernetes"] = "podman"
    sessiond_socket: str = "/run/cloudlet/sessiond.sock"
    session_host: str = "127.0.0.1"
    session_listen: str = "0.0.0.0"
    port_range: Annotated[tuple[Port, Port], TomlTuple] = (31000, 31999)
    ready_timeout_seconds: Positive = 30.0
    reconcile_interval_seconds: Positive = 5.0
    runtime_events: bool = True
    event_debounce_seconds: Annotated[float, Field(ge=0, le=10)] = 0.05
    max_services: Annotated[int, Field(ge=1)] = 500
    # the API under a flood (docs/controller.md); 0: derived from the descriptor limit
    max_connections: Annotated[int, Field(ge=0)] = 0
    max_pending_connections: Annotated[int, Field(ge=0)] = 0
    max_pending_per_source: Annotated[int, Field(ge=0)] = 0
    header_timeout_seconds: Positive = 10.0  # the first request head must arrive within this
    keepalive_timeout_seconds: Positive = 15.0  # idle keep-alive connections are closed after this
    state_dir: str = "/var/lib/cloudlet/controller"  # the device registry (devices.json)
    device_lifetime_days_max: Annotated[int, Field(ge=1)] = 366  # the longest expiry a device credential may get
    podman: PodmanConfig = Field(default_factory=PodmanConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)

    @field_validator("local_listen")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if value:
            host, _ = parse_hostport(value, "address")
            if not is_loopback(host):
                raise ValueError("plain HTTP is served on loopback only (tls_cert_file serves the API elsewhere)")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ControllerConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        host, _ = parse_hostport(self.listen, "address")
        if not self.tls_cert_file and not self.insecure_plain_http and not is_loopback(host or "0.0.0.0"):
            raise ValueError(f"listen {self.listen} is not loopback: serve it over TLS (tls_cert_file, tls_key_file; "
                             "the roles make them from the fleet CA) or set insecure_plain_http = true")
        return self

    @field_validator("port_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > value[1]:
            raise ValueError("must be [first, last] with first <= last")
        return value

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, port = parse_hostport(self.listen, "controller.listen")
        return host or "0.0.0.0", port


def _locate(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    return loc if loc and loc[0] in ("podman", "kubernetes", "fleet") else ("controller", *loc)


def from_dict(data: dict[str, Any], source: str = "controller config") -> ControllerConfig:
    tables = ("controller", "podman", "kubernetes", "fleet")
    problems = check_tables(data, tables, source)
    controller = data.get("controller", {})
    if isinstance(controller, dict):
        problems += [f"controller.{k}: unknown key" for k in ("podman", "kubernetes", "fleet") if k in controller]
    if problems:
        raise ConfigError(source, problems)
    merged = {**controller, **{k: data[k] for k in ("podman", "kubernetes", "fleet") if k in data}}
    return validate(ControllerConfig, merged, source, locate=_locate)


def load(path: str | Path) -> ControllerConfig:
    return from_dict(read_toml(path), str(path))

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

from pydantic import Field, field_validator

from cloudlet.common.addresses import parse_hostport
from cloudlet.common.config import ConfigError, HostPort, Name, Section, TomlTuple, check_tables, read_toml, validate

__all__ = ["ConfigError", "ControllerConfig", "KubernetesConfig", "PodmanConfig", "from_dict", "load"]

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


class ControllerConfig(Section):
    """The keys of ``[controller]`` (every one documented in docs/controller.md), ``[podman]`` and ``[kubernetes]``."""

    cloudlet: Name
    listen: HostPort = "127.0.0.1:8700"
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
    podman: PodmanConfig = Field(default_factory=PodmanConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

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
    return loc if loc and loc[0] in ("podman", "kubernetes") else ("controller", *loc)


def from_dict(data: dict[str, Any], source: str = "controller config") -> ControllerConfig:
    tables = ("controller", "podman", "kubernetes")
    problems = check_tables(data, tables, source)
    controller = data.get("controller", {})
    if isinstance(controller, dict):
        problems += [f"controller.{k}: unknown key" for k in ("podman", "kubernetes") if k in controller]
    if problems:
        raise ConfigError(source, problems)
    merged = {**controller, **{k: data[k] for k in ("podman", "kubernetes") if k in data}}
    return validate(ControllerConfig, merged, source, locate=_locate)


def load(path: str | Path) -> ControllerConfig:
    return from_dict(read_toml(path), str(path))

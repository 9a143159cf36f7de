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

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.common.names import NAME_RULE, is_name


class ConfigError(ValueError):
    """The config file is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class PodmanConfig:
    socket: str = "/run/podman/podman.sock"
    network: str = ""


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    kubeconfig: str = "/etc/rancher/k3s/k3s.yaml"
    namespace: str = "default"
    context: str = ""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    cloudlet: str
    listen: str = "127.0.0.1:8700"
    token_file: str = "/etc/cloudlet/controller.token"
    secret_file: str = "/etc/cloudlet/fleet.secret"
    runtime: str = "podman"
    sessiond_socket: str = "/run/cloudlet/sessiond.sock"
    session_host: str = "127.0.0.1"
    session_listen: str = "0.0.0.0"
    port_range: tuple[int, int] = (31000, 31999)
    ready_timeout_seconds: float = 30.0
    reconcile_interval_seconds: float = 5.0
    runtime_events: bool = True
    event_debounce_seconds: float = 0.05
    max_services: int = 500
    podman: PodmanConfig = field(default_factory=PodmanConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_host_port(self.listen, "controller.listen")


def split_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port_s)


def _section(data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table")
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    return section


def _typed(section: dict[str, Any], prefix: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in section:
        return default
    value = section[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{prefix}.{key} has the wrong type ({type(value).__name__})")
    return value


def from_dict(data: dict[str, Any]) -> ControllerConfig:
    unknown = set(data) - {"controller", "podman", "kubernetes"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    d = ControllerConfig.__dataclass_fields__
    c = _section(data, "controller", {n for n in d if n not in ("podman", "kubernetes")})
    p = _section(data, "podman", set(PodmanConfig.__dataclass_fields__))
    k = _section(data, "kubernetes", set(KubernetesConfig.__dataclass_fields__))
    cloudlet = c.get("cloudlet")
    if not is_name(cloudlet):
        raise ConfigError(f"controller.cloudlet is required and must be a name: {NAME_RULE}")
    defaults = ControllerConfig(cloudlet=cloudlet)
    values: dict[str, Any] = {"cloudlet": cloudlet}
    for key in ("listen", "token_file", "secret_file", "runtime", "sessiond_socket", "session_host", "session_listen"):
        values[key] = _typed(c, "controller", key, str, getattr(defaults, key))
    for key in ("ready_timeout_seconds", "reconcile_interval_seconds"):
        values[key] = float(_typed(c, "controller", key, (int, float), getattr(defaults, key)))
        if values[key] <= 0:
            raise ConfigError(f"controller.{key} must be > 0")
    debounce = c.get("event_debounce_seconds", defaults.event_debounce_seconds)
    if not isinstance(debounce, (int, float)) or isinstance(debounce, bool) or not 0 <= debounce <= 10:
        raise ConfigError("controller.event_debounce_seconds must be a number 0..10")
    values["event_debounce_seconds"] = float(debounce)
    events = c.get("runtime_events", defaults.runtime_events)
    if not isinstance(events, bool):
        raise ConfigError("controller.runtime_events must be true or false")
    values["runtime_events"] = events
    values["max_services"] = _typed(c, "controller", "max_services", int, defaults.max_services)
    if values["max_services"] < 1:
        raise ConfigError("controller.max_services must be >= 1")
    pr = c.get("port_range", list(defaults.port_range))
    if (
        not isinstance(pr, list) or len(pr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pr)
        or not 1 <= pr[0] <= pr[1] <= 65535
    ):
        raise ConfigError("controller.port_range must be [first, last] with 1 <= first <= last <= 65535")
    values["port_range"] = (pr[0], pr[1])
    if values["runtime"] not in ("podman", "kubernetes"):
        raise ConfigError(f"controller.runtime must be \"podman\" or \"kubernetes\", got {values['runtime']!r}")
    split_host_port(values["listen"], "controller.listen")
    pd, kd = PodmanConfig(), KubernetesConfig()
    values["podman"] = PodmanConfig(
        socket=_typed(p, "podman", "socket", str, pd.socket),
        network=_typed(p, "podman", "network", str, pd.network),
    )
    values["kubernetes"] = KubernetesConfig(
        kubeconfig=_typed(k, "kubernetes", "kubeconfig", str, kd.kubeconfig),
        namespace=_typed(k, "kubernetes", "namespace", str, kd.namespace),
        context=_typed(k, "kubernetes", "context", str, kd.context),
    )
    return ControllerConfig(**values)


def load(path: str | Path) -> ControllerConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return from_dict(data)

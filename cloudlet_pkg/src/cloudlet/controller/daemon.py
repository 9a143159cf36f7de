"""One controller instance: runtime + sessiond client + service manager + HTTP server.

Used by ``cloudlet controller`` and, in-process, by tests and benchmarks (no global state: every
instance has its own metrics registry and HTTP session pools).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.common.admission import Admission, default_limits
from cloudlet.common.httpserver import HttpServer
from cloudlet.common.logs import event
from cloudlet.controller.app import build_app
from cloudlet.controller.config import ConfigError, ControllerConfig
from cloudlet.controller.metrics import ControllerMetrics
from cloudlet.controller.runtime.base import Runtime
from cloudlet.controller.service import ServiceManager
from cloudlet.controller.sessiond_client import SessiondClient
from cloudlet.protocol import credentials

log = logging.getLogger(__name__)


def make_runtime(config: ControllerConfig) -> Runtime:
    if config.runtime == "podman":
        from cloudlet.controller.runtime.podman import PodmanRuntime

        return PodmanRuntime(config.cloudlet, config.podman.socket, config.podman.network or None)
    if config.runtime == "kubernetes":
        from cloudlet.controller.runtime.kubernetes import KubernetesRuntime

        return KubernetesRuntime.from_config(config.cloudlet, config.kubernetes)
    raise ConfigError("controller config", [f"controller.runtime: unknown runtime {config.runtime!r}"])


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("controller config", [f"controller.token_file: cannot read {path}: {exc.strerror or exc}"]) from exc
    if len(token) < 16:
        raise ConfigError("controller config", [f"controller.token_file: {path} holds a token shorter than 16 characters"])
    return token


def read_secret(path: str) -> bytes:
    try:
        return credentials.load_secret(path)
    except (OSError, ValueError) as exc:
        raise ConfigError("controller config", [f"controller.secret_file: cannot use {path}: {exc}"]) from exc


@dataclass
class ControllerDaemon:
    config: ControllerConfig
    runtime: Runtime | None = None
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)
    manager: ServiceManager | None = None
    _http: HttpServer | None = None
    address: tuple[str, int] | None = None

    async def start(self, reconcile: bool = True) -> None:
        token = read_token(self.config.token_file)
        secret = read_secret(self.config.secret_file)
        runtime = self.runtime or make_runtime(self.config)
        self.runtime = runtime
        sessiond = SessiondClient(self.config.sessiond_socket)
        self.manager = ServiceManager(self.config, runtime, sessiond, secret, self.metrics)
        app = build_app(self.manager, token)
        cfg = self.config
        auto_open, auto_pending, auto_source = default_limits()
        max_open = cfg.max_connections or auto_open
        max_pending = min(cfg.max_pending_connections or auto_pending, max_open)
        admission = Admission("controller API", max_open, max_pending,
                              min(cfg.max_pending_per_source or auto_source, max_pending))
        self.metrics.watch_admission(admission)
        self._http = HttpServer(app, "controller API", admission=admission, header_timeout=cfg.header_timeout_seconds,
                                keepalive_timeout=cfg.keepalive_timeout_seconds)
        host, port = self.config.listen_host_port
        self.address = await self._http.start_tcp(host, port)
        if reconcile:
            self.manager.start()
        event(log, logging.INFO, "controller listening", cloudlet=self.config.cloudlet,
              address=f"{self.address[0]}:{self.address[1]}", runtime=runtime.name,
              sessiond=self.config.sessiond_socket)

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}"

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
            await self.manager.sessiond.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.runtime is not None:
            await self.runtime.close()
        event(log, logging.INFO, "controller stopped", cloudlet=self.config.cloudlet)

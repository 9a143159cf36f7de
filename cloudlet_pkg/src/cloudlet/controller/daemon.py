"""One controller instance: runtime + sessiond client + service manager + HTTP server.

Used by ``cloudlet controller`` and, in-process, by tests and benchmarks (no global state: every
instance has its own metrics registry and HTTP session pools).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.common.addresses import parse_hostport
from cloudlet.common.admission import Admission, default_limits
from cloudlet.common.httpserver import HttpServer
from cloudlet.common.logs import event
from cloudlet.controller.app import build_app
from cloudlet.controller.config import ConfigError, ControllerConfig
from cloudlet.controller.devices import DeviceRegistry
from cloudlet.controller.fleetmap import FleetMap
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


def tls_context(config: ControllerConfig) -> ssl.SSLContext | None:
    """The API's server TLS context (``tls_cert_file``/``tls_key_file``), or None for plain HTTP."""
    if not config.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("controller config", [f"controller.tls_cert_file: cannot load {config.tls_cert_file} "
                                                f"with its key: {exc}"]) from exc
    return ctx


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
    _local: HttpServer | None = None
    local_address: tuple[str, int] | None = None
    devices: DeviceRegistry | None = None
    fleet: FleetMap | None = None
    address: tuple[str, int] | None = None

    async def start(self, reconcile: bool = True) -> None:
        token = read_token(self.config.token_file)
        secret = read_secret(self.config.secret_file)
        runtime = self.runtime or make_runtime(self.config)
        self.runtime = runtime
        sessiond = SessiondClient(self.config.sessiond_socket)
        self.manager = ServiceManager(self.config, runtime, sessiond, secret, self.metrics)
        self.devices = DeviceRegistry(Path(self.config.state_dir) / "devices.json")
        self.devices.load()
        self.manager.devices = self.devices
        self.fleet = FleetMap(self.config, token)
        app = build_app(self.manager, token, self.devices, self.fleet)
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
        self.address = await self._http.start_tcp(host, port, ssl_context=tls_context(cfg))
        if cfg.local_listen and cfg.local_listen != cfg.listen:
            local_host, local_port = parse_hostport(cfg.local_listen, "controller.local_listen")
            self._local = HttpServer(build_app(self.manager, token, self.devices, self.fleet), "controller local API",
                                     header_timeout=cfg.header_timeout_seconds,
                                     keepalive_timeout=cfg.keepalive_timeout_seconds)
            self.local_address = await self._local.start_tcp(local_host, local_port)
        await self.manager.sync_devices()  # sessiond refuses devices it was not told about
        if reconcile:
            self.manager.start()
        event(log, logging.INFO, "controller listening", cloudlet=self.config.cloudlet,
              address=f"{self.address[0]}:{self.address[1]}", tls=bool(cfg.tls_cert_file),
              local=f"{self.local_address[0]}:{self.local_address[1]}" if self.local_address else None,
              runtime=runtime.name, sessiond=self.config.sessiond_socket, devices=len(self.devices.all()),
              fleet=[m.name for m in cfg.fleet.members])

    @property
    def url(self) -> str:
        assert self.address is not None
        scheme = "https" if self.config.tls_cert_file else "http"
        return f"{scheme}://{self.address[0]}:{self.address[1]}"

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
            await self.manager.sessiond.close()
        for server in (self._http, self._local):
            if server is not None:
                await server.close()
        self._http = self._local = None
        if self.fleet is not None:
            await self.fleet.close()
        if self.runtime is not None:
            await self.runtime.close()
        event(log, logging.INFO, "controller stopped", cloudlet=self.config.cloudlet)

"""Helpers for the session daemon tests: backends, daemons, control API, subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cloudlet.protocol import credentials
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.daemon import Sessiond

SECRET = b"cloudlet-test-fleet-secret-0123456789"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.secret"
    path.write_bytes(SECRET)
    return path


def issue(service: str, now: float | None = None) -> str:
    return credentials.issue(SECRET, service, now).token


@dataclass
class BackendConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_exactly(self, n: int, timeout: float = 10) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)


@dataclass
class Backend:
    """A TCP backend whose connections the test drives by hand (or echoes, if ``echo``)."""

    echo: bool = False
    server: asyncio.AbstractServer | None = None
    conns: list[BackendConn] = field(default_factory=list)
    new: asyncio.Queue[BackendConn] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = BackendConn(reader, writer)
        self.conns.append(conn)
        if self.echo:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()
        else:
            await self.new.put(conn)

    async def next_conn(self, timeout: float = 10) -> BackendConn:
        return await asyncio.wait_for(self.new.get(), timeout)

    async def start(self) -> "Backend":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.conns:
            c.writer.close()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = await Backend().start()
    yield b
    await b.stop()


@pytest.fixture
async def echo_backend() -> AsyncIterator[Backend]:
    b = await Backend(echo=True).start()
    yield b
    await b.stop()


DaemonFactory = Callable[..., Any]


@pytest.fixture
async def make_sessiond(tmp_path: Path, secret_file: Path) -> AsyncIterator[DaemonFactory]:
    """``await make_sessiond("a", grace_seconds=..., peers={...})`` -> a started in-process Sessiond."""
    daemons: list[Sessiond] = []

    async def factory(cloudlet: str = "a", **options: Any) -> Sessiond:
        peers = options.pop("peers", {})
        d = tmp_path / f"sessiond-{cloudlet}-{len(daemons)}"
        d.mkdir()
        table = {
            "cloudlet": cloudlet,
            "secret_file": str(secret_file),
            "control_socket": str(d / "sessiond.sock"),
            "state_dir": str(d / "state"),
            "peer_listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "grace_seconds": 30,
        }
        table.update(options)
        daemon = Sessiond(SessiondConfig.from_dict({"sessiond": table, "peers": peers}))
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield factory
    for daemon in daemons:
        if not daemon.stopped.is_set():
            await daemon.stop()


async def api(socket_path: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to a control API on a Unix socket; returns ``(status, json-or-None)``."""
    conn = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=conn) as http:
        async with http.request(method, f"http://sessiond{path}", json=body) as resp:
            data = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, data


def peer_addr(daemon: Sessiond) -> str:
    assert daemon.peer_address is not None
    return f"{daemon.peer_address[0]}:{daemon.peer_address[1]}"


async def raw_connect(port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port), 10)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class SessiondProcess:
    proc: subprocess.Popen[bytes]
    control_socket: str
    config_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(path: Path, table: dict[str, Any], peers: dict[str, dict[str, Any]] | None = None) -> None:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["[sessiond]"] + [f"{k} = {val(v)}" for k, v in table.items()]
    for name, cfg in (peers or {}).items():
        lines += ["", f"[peers.{name}]"] + [f"{k} = {val(v)}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")


async def start_sessiond_process(tmp: Path, secret_file: Path, cloudlet: str = "a", **options: Any) -> SessiondProcess:
    """Start ``cloudlet sessiond --config`` as a real subprocess and wait until its API answers."""
    tmp.mkdir(parents=True, exist_ok=True)
    peers = options.pop("peers", None)
    table = {
        "cloudlet": cloudlet,
        "secret_file": str(secret_file),
        "control_socket": str(tmp / "sessiond.sock"),
        "state_dir": str(tmp / "state"),
        "peer_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        **options,
    }
    cfg = tmp / "sessiond.toml"
    write_config(cfg, table, peers)
    log_path = tmp / "sessiond.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg)],
                                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sp = SessiondProcess(proc, table["control_socket"], cfg, log_path)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"sessiond exited with {proc.returncode}: {sp.log()}")
        try:
            status, _ = await api(sp.control_socket, "GET", "/v1/health")
            if status == 200:
                return sp
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"sessiond did not come up: {sp.log()}")
        await asyncio.sleep(0.05)


def stop_process(sp: SessiondProcess) -> None:
    if sp.proc.poll() is None:
        sp.proc.terminate()
        try:
            sp.proc.wait(10)
        except subprocess.TimeoutExpired:
            sp.proc.kill()
            sp.proc.wait(5)

"""The sessiond side of the tests: backends driven by hand, in-process daemons, the control API.

Subprocess daemons come from the one sessiond harness, ``cloudlet_bench.harness.sessiond``
(``start_sessiond``), which the benchmarks use too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.protocol import credentials
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.daemon import Sessiond
from cloudlet.sessiond.peers import make_connector
from cloudlet_bench.harness.sessiond import SessiondProcess, control, start_sessiond

SECRET = b"cloudlet-test-fleet-secret-0123456789"


def issue(service: str, now: float | None = None, anchor: str = "a") -> str:
    """A credential of the test fleet for ``service``, anchored at cloudlet ``anchor``."""
    return credentials.issue(SECRET, service, anchor, now).token


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


DaemonFactory = Callable[..., Any]


async def api(socket_path: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to a control API on a Unix socket; returns ``(status, json-or-None)``."""
    return await control(socket_path, method, path, body)


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




class InProcessSessionds:
    """``await make("a", grace_seconds=..., peers={...})`` -> a started in-process ``Sessiond``."""

    def __init__(self, tmp_path: Path, secret_file: Path) -> None:
        self.tmp_path = tmp_path
        self.secret_file = secret_file
        self.daemons: list[Sessiond] = []

    async def make(self, cloudlet: str = "a", **options: Any) -> Sessiond:
        peers = options.pop("peers", {})
        d = self.tmp_path / f"sessiond-{cloudlet}-{len(self.daemons)}"
        d.mkdir()
        table = {
            "cloudlet": cloudlet,
            "secret_file": str(self.secret_file),
            "control_socket": str(d / "sessiond.sock"),
            "state_dir": str(d / "state"),
            "peer_listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "grace_seconds": 30,
        }
        table.update(options)
        daemon = Sessiond(SessiondConfig.from_dict({"sessiond": table, "peers": peers}))
        await daemon.start()
        self.daemons.append(daemon)
        return daemon

    async def stop(self) -> None:
        for daemon in self.daemons:
            if not daemon.stopped.is_set():
                await daemon.stop()


async def start_sessiond_process(tmp: Path, secret_file: Path, cloudlet: str = "a", **options: Any) -> SessiondProcess:
    """``cloudlet sessiond`` as a subprocess (the harness's ``start_sessiond``), with a metrics port."""
    options.setdefault("metrics_listen", "127.0.0.1:0")
    return await start_sessiond(tmp, secret_file, cloudlet, timeout=30, **options)


async def fleet(make_sessiond: DaemonFactory, backend: Backend, names: tuple[str, ...] = ("a", "b", "c")
                ) -> tuple[dict[str, Sessiond], dict[str, int]]:
    """Start one sessiond per name, each with every other as a tcp peer, and the service on all."""
    daemons = {}
    for n in names:
        daemons[n] = await make_sessiond(n)
    for n, d in daemons.items():
        peers = {o: {"transport": "tcp", "address": peer_addr(od)} for o, od in daemons.items() if o != n}
        d.manager.connector = make_connector(peers, 2.0)
    ports = {}
    for n, d in daemons.items():
        entry, _ = await d.put_service("svc", backend.address)
        ports[n] = entry.port
    return daemons, ports

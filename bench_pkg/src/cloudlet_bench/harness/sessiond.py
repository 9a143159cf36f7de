"""``cloudlet sessiond`` as a real subprocess: its config, its control API, its lifetime.

The one sessiond harness of the benchmarks and the tests. :func:`start_sessiond` writes a config,
starts ``python -m cloudlet sessiond --config ...`` and waits until its control API answers;
:class:`Fleet` is a temporary directory with a fleet secret and any number of them on loopback.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cloudlet.protocol import credentials


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def control(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to a control API on a Unix socket; ``(status, JSON body or None)``."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock),
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.request(method, f"http://sessiond{path}", json=body) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else None)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, table: dict[str, Any], peers: dict[str, dict[str, Any]] | None = None) -> None:
    """A sessiond.toml: ``[sessiond]`` from ``table``, one ``[peers.NAME]`` per entry of ``peers``."""
    lines = ["[sessiond]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, cfg in (peers or {}).items():
        lines += ["", f"[peers.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class SessiondProcess:
    name: str
    proc: subprocess.Popen[bytes]
    control_socket: str
    config_path: Path
    log_path: Path
    peer_listen: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await control(self.control_socket, method, path, body)

    async def put_service(self, name: str, backend: str) -> int:
        status, svc = await self.api("PUT", f"/v1/services/{name}", {"backend": backend, "listen": "127.0.0.1"})
        if status != 200:
            raise RuntimeError(f"sessiond {self.name}: PUT service failed: {svc}")
        return int(svc["port"])

    async def wait_peers_up(self, timeout: float = 30.0) -> None:
        """Until every peer of this sessiond reports ``up`` (an SSH tunnel connects at start)."""
        deadline = time.monotonic() + timeout
        while True:
            _, peers = await self.api("GET", "/v1/peers")
            items = peers.get("peers", peers) if isinstance(peers, dict) else peers
            if items and all(p.get("state") == "up" for p in items):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sessiond {self.name}: peers not up: {items}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def peer_table(addr: str | dict[str, Any]) -> dict[str, Any]:
    """A ``[peers.NAME]`` table: a tcp address, or a whole table as given."""
    return dict(addr) if isinstance(addr, dict) else {"transport": "tcp", "address": addr}


async def start_sessiond(
    directory: Path,
    secret_file: Path,
    cloudlet: str = "a",
    *,
    peers: dict[str, str | dict[str, Any]] | None = None,
    loop: str = "auto",
    timeout: float = 60.0,
    nofile: int | None = None,
    **options: Any,
) -> SessiondProcess:
    """Write ``directory/sessiond.toml`` and start ``cloudlet sessiond`` on it, on loopback.

    ``options`` are more ``[sessiond]`` keys (they override the defaults here: any free peer port,
    no metrics port). ``peers`` maps a name to a tcp address or a whole ``[peers.NAME]`` table.
    ``nofile``: the daemon's descriptor limit (soft and hard), as a unit's ``LimitNOFILE=`` sets it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {
        "cloudlet": cloudlet,
        "secret_file": str(secret_file),
        "control_socket": str(directory / "sessiond.sock"),
        "state_dir": str(directory / "state"),
        "peer_listen": "127.0.0.1:0",
        "metrics_listen": "",
        **options,
    }
    cfg = directory / "sessiond.toml"
    write_config(cfg, table, {n: peer_table(a) for n, a in (peers or {}).items()})
    log_path = directory / "sessiond.log"
    with open(log_path, "ab") as log:
        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        proc = subprocess.Popen([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg), "--loop", loop],
                                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=limit if nofile is not None else None)
    sp = SessiondProcess(cloudlet, proc, str(table["control_socket"]), cfg, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sessiond {cloudlet} exited with {proc.returncode}: {sp.log()[-2000:]}")
        try:
            status, health = await sp.api("GET", "/v1/health")
            if status == 200:
                sp.peer_listen = str(health["peer_listen"])
                return sp
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sessiond {cloudlet} did not come up within {timeout:g} s: {sp.log()[-2000:]}")
        await asyncio.sleep(0.05)


class Fleet:
    """A temporary directory with a fleet secret and sessiond subprocesses on loopback."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
        self.secret = os.urandom(32).hex().encode()
        self.secret_file = self.dir / "fleet.secret"
        self.secret_file.write_bytes(self.secret)
        self.daemons: list[SessiondProcess] = []

    def credential(self, service: str, anchor: str = "a") -> str:
        return credentials.issue(self.secret, service, anchor).token

    async def start(self, name: str, peers: dict[str, str | dict[str, Any]] | None = None, loop: str = "auto",
                    **options: Any) -> SessiondProcess:
        options.setdefault("log_level", "warning")
        sp = await start_sessiond(self.dir / name, self.secret_file, name, peers=peers, loop=loop, **options)
        self.daemons.append(sp)
        return sp

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

"""Helpers shared by the benchmarks: a temporary fleet secret and sessiond subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudlet.protocol import credentials


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def control(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:
        async with http.request(method, f"http://sessiond{path}", json=body) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else None)


@dataclass
class SessiondProc:
    name: str
    proc: subprocess.Popen[bytes]
    socket: str
    peer_listen: str = ""

    async def put_service(self, name: str, backend: str) -> int:
        status, svc = await control(self.socket, "PUT", f"/v1/services/{name}", {"backend": backend, "listen": "127.0.0.1"})
        if status != 200:
            raise RuntimeError(f"sessiond {self.name}: PUT service failed: {svc}")
        return int(svc["port"])

    async def wait_peers_up(self, timeout: float = 30.0) -> None:
        """Until every peer of this sessiond reports ``up`` (an SSH tunnel connects at start)."""
        deadline = time.monotonic() + timeout
        while True:
            _, peers = await control(self.socket, "GET", "/v1/peers")
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
                self.proc.wait()


class Fleet:
    """A temporary directory with a fleet secret and sessiond subprocesses on loopback."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
        self.secret = os.urandom(32).hex().encode()
        (self.dir / "fleet.secret").write_bytes(self.secret)
        self.daemons: list[SessiondProc] = []

    def credential(self, service: str) -> str:
        return credentials.issue(self.secret, service).token

    async def start(self, name: str, peers: dict[str, str | dict[str, Any]] | None = None, loop: str = "auto",
                    **options: Any) -> SessiondProc:
        """Start a sessiond; ``peers`` maps a name to a tcp address or to a whole ``[peers.NAME]`` table."""
        d = self.dir / name
        d.mkdir(exist_ok=True)
        lines = ["[sessiond]", f'cloudlet = "{name}"', f'secret_file = "{self.dir / "fleet.secret"}"',
                 f'control_socket = "{d / "sessiond.sock"}"', f'state_dir = "{d / "state"}"',
                 'peer_listen = "127.0.0.1:0"', 'metrics_listen = ""', 'log_level = "warning"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
        for peer, addr in (peers or {}).items():
            lines.append(f"[peers.{peer}]")
            if isinstance(addr, dict):
                lines += [f"{k} = {json.dumps(v)}" for k, v in addr.items()]
            else:
                lines += ['transport = "tcp"', f'address = "{addr}"']
        (d / "sessiond.toml").write_text("\n".join(lines) + "\n")
        log = open(d / "sessiond.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(d / "sessiond.toml"),
                                 "--loop", loop], stdout=log, stderr=log)
        sp = SessiondProc(name, proc, str(d / "sessiond.sock"))
        self.daemons.append(sp)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sessiond {name} exited: {(d / 'sessiond.log').read_text()[-2000:]}")
            try:
                status, health = await control(sp.socket, "GET", "/v1/health")
                if status == 200:
                    sp.peer_listen = health["peer_listen"]
                    return sp
            except OSError:
                pass
            except Exception:  # aiohttp.ClientError while the socket appears
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sessiond {name} did not start")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

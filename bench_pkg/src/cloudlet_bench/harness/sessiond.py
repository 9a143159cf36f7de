"""``cloudlet sessiond`` as a real subprocess: its config, its control API, its lifetime.

The one sessiond harness of the benchmarks and the tests. :func:`start_sessiond` writes a config,
starts ``python -m cloudlet sessiond --config ...`` and waits until its control API answers;
:class:`Fleet` is a temporary directory with a fleet secret and any number of them on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cloudlet.protocol import credentials


class FdStore:
    """systemd's file descriptor store for a sessiond that is not run by systemd (tests, benchmarks).

    The same protocol as systemd's: the daemon sends ``FDSTORE=1`` / ``FDNAME=`` datagrams with the
    descriptors (SCM_RIGHTS) to ``$NOTIFY_SOCKET``, ``FDSTOREREMOVE=1`` to drop one; the next
    process started with :meth:`child_setup` gets them as ``$LISTEN_FDS``/``$LISTEN_FDNAMES`` from
    descriptor 3 on, in the order they were stored. Molecule checks the real systemd.
    """

    def __init__(self, directory: Path) -> None:
        import socket
        import threading

        self.path = str(directory / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.fds: dict[str, int] = {}  # insertion order = LISTEN_FDS order
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        import socket

        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            except OSError:
                return
            text = data.decode(errors="replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._lock:
                self.messages.append(f"{text} fds={len(fds)}")
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        old = self.fds.pop(name, None)
                        if old is not None:
                            os.close(old)
                        self.fds[name] = fd
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    old = self.fds.pop(name, None)
                    if old is not None:
                        os.close(old)
                for fd in fds:
                    os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.fds)

    def wait_for(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.names():
            if time.monotonic() > deadline:
                raise RuntimeError(f"fd store: {name!r} never stored (have {self.names()})")
            time.sleep(0.01)

    def env(self) -> dict[str, str]:
        with self._lock:
            names = list(self.fds)
        out = {"NOTIFY_SOCKET": self.path}
        if names:
            out.update({"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)})
        return out

    def child_setup(self) -> tuple[list[int], Any]:
        """``(pass_fds, preexec_fn)`` for Popen: the stored descriptors at 3, 4, ... in the child."""
        with self._lock:
            fds = list(self.fds.values())
        targets = list(range(3, 3 + len(fds)))

        def preexec() -> None:
            high = [os.dup(fd) for fd in fds]  # out of the way of the targets first
            for fd, target in zip(high, targets, strict=True):
                os.dup2(fd, target)
                os.close(fd)

        return sorted(set(fds) | set(targets)), preexec

    def forget(self) -> None:
        """The unit is stopped for good: the store is flushed."""
        with self._lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def close(self) -> None:
        self.forget()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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

    pid: int = 0  # the serving process: proc's, until an in-place upgrade hands over to a successor

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def upgrade(self, timeout: float = 60.0) -> int:
        """An in-place upgrade (``POST /v1/upgrade``): the successor's PID once it serves."""
        status, body = await self.api("POST", "/v1/upgrade")
        if status != 202:
            raise RuntimeError(f"sessiond {self.name}: upgrade refused: {body}")
        successor = int(body["successor"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            try:
                _, health = await self.api("GET", "/v1/health")
            except (aiohttp.ClientError, OSError, ValueError):
                continue
            if health.get("pid") == successor:
                self.pid = successor
                return successor
        raise RuntimeError(f"sessiond {self.name}: the successor {successor} did not take over: {self.log()[-2000:]}")

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return self.proc.poll() is None if self.pid == self.proc.pid else True

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
        if self.pid and self.pid != self.proc.pid:  # a successor (not our child): SIGTERM, then SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(self.pid, 0)
                    time.sleep(0.1)
                os.kill(self.pid, signal.SIGKILL)
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
    fdstore: FdStore | None = None,
    **options: Any,
) -> SessiondProcess:
    """Write ``directory/sessiond.toml`` and start ``cloudlet sessiond`` on it, on loopback.

    ``options`` are more ``[sessiond]`` keys (they override the defaults here: any free peer port,
    no metrics port). ``peers`` maps a name to a tcp address or a whole ``[peers.NAME]`` table.
    ``nofile``: the daemon's descriptor limit (soft and hard), as a unit's ``LimitNOFILE=`` sets it.
    ``fdstore``: run it as systemd would with ``FileDescriptorStoreMax=``: it hands its sessions over
    on a clean stop, and a start gets what the store holds (:class:`FdStore`).
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pass_fds: list[int] = []
    inherit = None
    if fdstore is not None:
        env.update(fdstore.env())
        pass_fds, inherit = fdstore.child_setup()
    with open(log_path, "ab") as log:
        def setup() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if inherit is not None:
                inherit()

        proc = subprocess.Popen([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg), "--loop", loop],
                                stdout=log, stderr=log, env=env, pass_fds=pass_fds,
                                preexec_fn=setup if nofile is not None or inherit is not None else None)
    sp = SessiondProcess(cloudlet, proc, str(table["control_socket"]), cfg, log_path, pid=proc.pid)
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

"""The controller side of the tests: a private podman, real sessiond + controller processes (``Stack``).

Everything runs against real podman (runc, CONTAINERS_CONF=etc/containers.conf). Each test gets its
own cloudlet name ``cltest-<random>`` (fixture ``cloudlet_name`` in tests/conftest.py), so its
containers and network are its own; the finalizer removes them whatever the test did.
"""

from __future__ import annotations

import asyncio
import json as _json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from cloudlet.client import attach

REPO = Path(__file__).resolve().parents[2]
LONG_INTERVAL = 60.0  # a reconcile interval no test waits for: only events can repair in time
CONTAINERS_CONF = str(REPO / "etc" / "containers.conf")
os.environ.setdefault("CONTAINERS_CONF", CONTAINERS_CONF)


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = CONTAINERS_CONF
    return env


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), check=check)


def wait_unix_http(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(path)
                    s.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"podman system service did not answer on {path} within {timeout} s")


def cleanup_cloudlet(name: str) -> None:
    ids = podman("ps", "-aq", "--filter", f"label=cloudlet.cloudlet={name}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)
    podman("network", "rm", "-f", f"cloudlet-{name}", check=False)


def containers_of(cloudlet: str) -> list[str]:
    """Names of every container (any state) labelled with ``cloudlet``."""
    out = podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"label=cloudlet.cloudlet={cloudlet}").stdout
    return sorted(out.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_line(reader: asyncio.StreamReader, timeout: float = 10.0) -> str:
    return (await asyncio.wait_for(reader.readline(), timeout)).decode().rstrip("\n")


# -- a real sessiond + controller pair, as subprocesses --------------------------------------------



async def poll(check, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Await ``check()`` until it returns a truthy value (state changes we cannot subscribe to)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except (OSError, aiohttp.ClientError) as exc:
            last = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class Stack:
    """A cloudlet on this machine: ``cloudlet sessiond`` and ``cloudlet controller`` processes."""

    dir: Path
    cloudlet: str
    podman_socket: str
    ready_timeout: float = 20.0
    reconcile_interval: float = 0.5
    controller_extra: str = ""  # more [controller] keys, TOML lines
    listen: str = "127.0.0.1:0"
    local_listen: str = ""  # the plain-HTTP loopback listener ("" = none)
    fleet_members: list[tuple[str, str]] = field(default_factory=list)  # [fleet] members: (name, api url)
    fleet_ca_file: str = ""  # [fleet] ca_file: the CA of https members
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    sessiond_proc: subprocess.Popen[bytes] | None = None
    controller_proc: subprocess.Popen[bytes] | None = None
    controller_url: str = ""
    local_url: str = ""  # the plain-HTTP loopback listener, when controller_extra sets local_listen
    ca_file: str = ""  # trust this CA for an https controller_url
    port_base: int = field(default_factory=lambda: random.randrange(20000, 30000, 50))
    _http: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        (self.dir / "fleet.secret").write_text(secrets.token_hex(32))
        (self.dir / "token").write_text(self.token + "\n")
        self.sessiond_socket = str(self.dir / "sessiond.sock")
        (self.dir / "sessiond.toml").write_text(
            "[sessiond]\n"
            f'cloudlet = "{self.cloudlet}"\n'
            f'secret_file = "{self.dir / "fleet.secret"}"\n'
            f'control_socket = "{self.sessiond_socket}"\n'
            f'state_dir = "{self.dir / "sessiond-state"}"\n'
            'peer_listen = "127.0.0.1:0"\n'
            'metrics_listen = ""\n'
            "grace_seconds = 30\n"
        )
        self.write_controller_config()

    def write_controller_config(self, podman_socket: str | None = None, kubeconfig: str | None = None) -> None:
        runtime = "kubernetes" if kubeconfig else "podman"
        (self.dir / "controller.toml").write_text(
            "[controller]\n"
            f'cloudlet = "{self.cloudlet}"\n'
            f'listen = "{self.listen}"\n'
            f'local_listen = "{self.local_listen}"\n'
            f'state_dir = "{self.dir / "controller-state"}"\n'
            f'token_file = "{self.dir / "token"}"\n'
            f'secret_file = "{self.dir / "fleet.secret"}"\n'
            f'runtime = "{runtime}"\n'
            f'sessiond_socket = "{self.sessiond_socket}"\n'
            'session_host = "127.0.0.1"\n'
            'session_listen = "127.0.0.1"\n'
            f"port_range = [{self.port_base}, {self.port_base + 49}]\n"
            f"ready_timeout_seconds = {self.ready_timeout}\n"
            f"reconcile_interval_seconds = {self.reconcile_interval}\n"
            + self.controller_extra
            + "[podman]\n"
            f'socket = "{podman_socket or self.podman_socket}"\n'
            + (f'[kubernetes]\nkubeconfig = "{kubeconfig}"\nnamespace = "edge"\n' if kubeconfig else "")
            + ("[fleet]\nmembers = [" + ", ".join(f'{{name = "{n}", api = "{u}"}}' for n, u in self.fleet_members) + "]\n"
               + (f'ca_file = "{self.fleet_ca_file}"\n' if self.fleet_ca_file else "")
               if self.fleet_members else "")
        )

    # -- processes ------------------------------------------------------------------------------

    async def start_sessiond(self) -> None:
        log = open(self.dir / "sessiond.log", "ab")
        self.sessiond_proc = subprocess.Popen(
            [sys.executable, "-m", "cloudlet", "sessiond", "--config", str(self.dir / "sessiond.toml"),
             "--loop", "asyncio"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        await poll(self._sessiond_up, 30, "sessiond control socket")

    async def _sessiond_up(self) -> bool:
        assert self.sessiond_proc is not None
        if self.sessiond_proc.poll() is not None:
            raise AssertionError(f"sessiond exited: {(self.dir / 'sessiond.log').read_text()[-2000:]}")
        status, _ = await self.sessiond("GET", "/v1/health")
        return status == 200

    async def start_controller(self) -> None:
        logpath = self.dir / "controller.log"
        offset = logpath.stat().st_size if logpath.exists() else 0
        log = open(logpath, "ab")
        self.controller_proc = subprocess.Popen(
            [sys.executable, "-m", "cloudlet", "controller", "--config", str(self.dir / "controller.toml")],
            stdout=log, stderr=subprocess.STDOUT, env=podman_env(),
        )
        log.close()

        async def listening() -> str | None:
            assert self.controller_proc is not None
            if self.controller_proc.poll() is not None:
                raise AssertionError(f"controller exited: {logpath.read_text()[-2000:]}")
            with open(logpath, "rb") as f:
                f.seek(offset)
                for line in f:
                    try:
                        rec = _json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("msg") == "controller listening":
                        self.local_url = f"http://{rec['local']}" if rec.get("local") else ""
                        return f"{'https' if rec.get('tls') else 'http'}://{rec['address']}"
            return None

        self.controller_url = await poll(listening, 30, "controller to listen")

    def _stop(self, proc: subprocess.Popen[bytes] | None, sig: int) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill_controller(self, sig: int = signal.SIGKILL) -> None:
        self._stop(self.controller_proc, sig)

    def kill_sessiond(self, sig: int = signal.SIGKILL) -> None:
        self._stop(self.sessiond_proc, sig)

    async def close(self) -> None:
        self.kill_controller(signal.SIGTERM)
        self.kill_sessiond(signal.SIGTERM)
        if self._http is not None:
            await self._http.close()

    # -- HTTP -----------------------------------------------------------------------------------

    async def api(self, method: str, path: str, body: object = None, token: str | None = "default",
                  raw: bytes | None = None) -> tuple[int, object]:
        if self._http is None:
            ssl_ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                               connector=aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None)
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        kwargs: dict[str, object] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        # sent as written: percent-escapes in ``path`` reach the server unchanged
        url = yarl.URL(self.controller_url + path, encoded=True)
        async with self._http.request(method, url, **kwargs) as resp:
            data = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, (_json.loads(data) if data and "json" in ctype else data.decode())

    async def sessiond(self, method: str, path: str) -> tuple[int, object]:
        conn = aiohttp.UnixConnector(path=self.sessiond_socket)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.request(method, "http://sessiond" + path) as resp:
                data = await resp.read()
                return resp.status, (_json.loads(data) if data else None)

    async def registered(self) -> dict[str, dict[str, object]]:
        status, body = await self.sessiond("GET", "/v1/services")
        assert status == 200, body
        return {s["name"]: s for s in body["services"]}  # type: ignore[index]




def demo_body(image: str, **extra: object) -> dict[str, object]:
    return {"image": image, "port": 7000, "env": {"PORT": "7000"}, "limits": {"cpus": 0.5, "memory_mb": 64}, **extra}


async def open_session(stack: Stack, name: str) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """A session on service ``name`` through the controller, attached and past the demo's greeting."""
    status, sess = await stack.api("POST", f"/v1/services/{name}/sessions")
    assert status == 201, sess
    assert isinstance(sess, dict)
    reader, writer, _ = await attach(sess["host"], sess["port"], sess["session"])
    assert (await read_line(reader)).startswith("HELLO cloudlet-demo")
    return sess, reader, writer


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


async def metrics_text(stack: Stack) -> str:
    status, text = await stack.api("GET", "/metrics", token=None)
    assert status == 200
    return str(text)

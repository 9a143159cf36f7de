"""A multi-host test bed on one machine: one network namespace per cloudlet, a bridge between them.

Layout (all names carry a random tag, everything is removed by ``Bed.destroy``)::

    clt-<tag>-sw   : bridge br0 (no address)
    clt-<tag>-a    : eth0 10.213.0.1/24  sshd :22, cloudlet sessiond (peer endpoint 127.0.0.1:7700), echo backend
    clt-<tag>-b    : eth0 10.213.0.2/24  sshd :22, cloudlet sessiond
    clt-<tag>-c    : eth0 10.213.0.3/24  sshd :22, cloudlet sessiond
    clt-<tag>-dev  : eth0 10.213.0.9/24  the device (a client process)

The subnet exists only inside the test namespaces, so it cannot collide with the host's networks.
Each cloudlet has its own host key and its own tunnel client key; every sshd authorises the other
cloudlets' keys for its own peer endpoint only. Peers use ``transport = "ssh"``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet_bench.harness.sshd import TunnelSshd, keygen

SUBNET = "10.213.0"
PEER_ENDPOINT = "127.0.0.1:7700"
SERVICE_PORT = 31001
SECRET = b"cloudlet-netns-bed-fleet-secret-0000000001"

ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
print("listening", flush=True)
def handle(c):
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"clt-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Node:
    name: str
    ns: str
    address: str
    workdir: Path
    sshd: TunnelSshd | None = None
    client_key: Path | None = None
    client_public_key: str = ""
    sessiond: subprocess.Popen[bytes] | None = None

    @property
    def control_socket(self) -> str:
        return str(self.workdir / "sessiond.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / "sessiond.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Bed:
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cltest-netns-")))
    nodes: dict[str, Node] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"clt-{self.tag}-{role}"

    # -- network -------------------------------------------------------------------------
    def create_network(self, roles: dict[str, int]) -> None:
        """``roles``: name -> host number in the subnet (e.g. {"a": 1, "dev": 9})."""
        os.chmod(self.root, 0o755)
        sw = self.ns("sw")
        ip("netns", "add", sw)
        self.namespaces.append(sw)
        ip("-n", sw, "link", "set", "lo", "up")
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for role, host in roles.items():
            ns = self.ns(role)
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            port = f"p-{role}"
            ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", sw, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET}.{host}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            workdir = self.root / role
            workdir.mkdir(mode=0o755)
            self.nodes[role] = Node(role, ns, address, workdir)

    # -- processes ------------------------------------------------------------------------
    def spawn(self, node: Node, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=fh, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_echo(self, node: Node, port: int = 7000) -> None:
        log = node.workdir / "echo.log"
        proc = self.spawn(node, [sys.executable, "-c", ECHO, str(port)], log)
        deadline = time.monotonic() + 20
        while "listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echo backend did not start: {log.read_text()}")
            time.sleep(0.02)

    def setup_cloudlets(self, names: list[str]) -> None:
        """Keys, sshd (port 22 on eth0) and the TOML config of every cloudlet."""
        for name in names:
            node = self.nodes[name]
            node.sshd = TunnelSshd(endpoint=PEER_ENDPOINT, listen_host=node.address, port=22, netns=node.ns,
                                   workdir=node.workdir / "sshd")
            node.client_key = node.workdir / "id_ed25519"
            node.client_public_key = keygen(node.client_key, f"cloudlet-{name}")
        for name in names:
            node = self.nodes[name]
            assert node.sshd is not None
            for other in names:
                if other != name:
                    node.sshd.authorize(self.nodes[other].client_public_key)
            node.sshd.start()
            (node.workdir / "fleet.secret").write_bytes(SECRET)
            known_hosts = node.workdir / "known_hosts"
            known_hosts.write_text("".join(self.nodes[o].sshd.known_hosts_line() + "\n"  # type: ignore[union-attr]
                                           for o in names if o != name))
            lines = [
                "[sessiond]",
                f'cloudlet = "{name}"',
                f'secret_file = "{node.workdir / "fleet.secret"}"',
                f'control_socket = "{node.control_socket}"',
                f'state_dir = "{node.workdir / "state"}"',
                f'peer_listen = "{PEER_ENDPOINT}"',
                'metrics_listen = "127.0.0.1:9701"',
                "grace_seconds = 30",
            ]
            for other in names:
                if other == name:
                    continue
                lines += [
                    "", f"[peers.{other}]", 'transport = "ssh"', f'host = "{self.nodes[other].address}"', "port = 22",
                    f'user = "{node.sshd.user}"', f'client_key = "{node.client_key}"',
                    f'known_hosts = "{known_hosts}"', f'endpoint = "{PEER_ENDPOINT}"',
                    "connect_timeout = 3.0", "keepalive_interval = 2.0", "backoff_initial = 0.1", "backoff_max = 1.0",
                ]
            (node.workdir / "sessiond.toml").write_text("\n".join(lines) + "\n")

    def start_sessiond(self, node: Node) -> None:
        node.sessiond = self.spawn(node, [sys.executable, "-m", "cloudlet", "sessiond", "--config",
                                          str(node.workdir / "sessiond.toml")], node.log_path)

    # -- teardown -------------------------------------------------------------------------
    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for node in self.nodes.values():
            if node.sshd is not None:
                node.sshd.stop()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


DEVICE = r"""
import asyncio, hashlib, json, os, sys, time
from cloudlet.client import SessionClient, SessionRefused

async def echo(c, size):
    data = os.urandom(size)
    sender = asyncio.create_task(c.send(data))
    got = await asyncio.wait_for(c.recv_exactly(size), 60)
    await sender
    assert got == data, "echo mismatch"
    return size

async def main():
    args = json.loads(sys.argv[1])
    hosts, port, cred = args["hosts"], args["port"], args["credential"]
    checked = 0
    c = SessionClient(hosts["a"], port, cred)
    await c.open()
    checked += await echo(c, 1_000_000)
    # bytes in flight at the moment of each move: sent, not yet echoed, then the device moves
    pending = os.urandom(300_000)
    await c.send(pending)
    moves = []
    for name in ("b", "c"):
        t = time.perf_counter()
        await c.handover(hosts[name], port, target="a")
        moves.append(round((time.perf_counter() - t) * 1000, 3))
        got = await asyncio.wait_for(c.recv_exactly(len(pending)), 60)
        assert got == pending, f"bytes in flight across the move to {name} differ"
        checked += len(pending)
        checked += await echo(c, 2_000_000)
        pending = os.urandom(300_000)
        await c.send(pending)
    got = await asyncio.wait_for(c.recv_exactly(len(pending)), 60)
    assert got == pending
    checked += len(pending)
    reply = await c.end()
    print(json.dumps({"checked": checked, "moves_ms": moves, "end": reply.status.name}))

asyncio.run(main())
"""


def run_device(bed: Bed, args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    node = bed.nodes["dev"]
    return subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-c", DEVICE, args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


ATTACH = r"""
import asyncio, json, sys, time
from cloudlet.client import SessionClient, SessionRefused
async def main():
    a = json.loads(sys.argv[1])
    t = time.perf_counter()
    try:
        await SessionClient(a["host"], a["port"], a["credential"], target=a["target"]).open()
        print(json.dumps({"status": "OK", "ms": (time.perf_counter() - t) * 1000}))
    except SessionRefused as exc:
        print(json.dumps({"status": exc.status.name, "ms": (time.perf_counter() - t) * 1000, "message": str(exc)}))
asyncio.run(main())
"""


def attach_once(bed: Bed, args: str) -> subprocess.CompletedProcess[str]:
    node = bed.nodes["dev"]
    return subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-c", ATTACH, args], capture_output=True,
                          text=True, timeout=60)


METRICS = r"""
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9701/metrics", timeout=10).read().decode())
"""


def scrape_metrics(bed: Bed, name: str) -> str:
    """Prometheus text of a cloudlet's sessiond (its metrics listen on loopback inside its namespace)."""
    out = subprocess.run(["ip", "netns", "exec", bed.nodes[name].ns, sys.executable, "-c", METRICS],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"metrics of {name}: {out.stderr.strip()}")
    return out.stdout

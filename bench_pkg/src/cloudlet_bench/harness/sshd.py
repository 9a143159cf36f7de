"""A private OpenSSH sshd for tunnel tests and `cloudlet bench tunnel`.

``TunnelSshd`` writes its own host key, client key, ``authorized_keys`` and ``sshd_config`` into a
temporary directory and runs the system's ``/usr/sbin/sshd -D -e -f <config>`` on a loopback (or
test-namespace) address, never touching the machine's own sshd. The tunnel account is configured
exactly as docs/tunnels.md asks for production: a system user without a shell, a key restricted with
``restrict,port-forwarding,permitopen="HOST:PORT",command="/usr/sbin/nologin"``, and a ``Match User``
block that allows local forwarding to that one endpoint only and forces ``nologin``.

Test-only differences from production: ``StrictModes no`` and ``AuthorizedKeysFile`` in the
temporary directory (the directory is not on a root-owned path), ``UsePAM no``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
NOLOGIN = "/usr/sbin/nologin"
DEFAULT_USER = "cltunnel"
SSHD_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"


class SshdError(RuntimeError):
    """The test sshd could not be set up or did not start."""


def ensure_tunnel_account(user: str = DEFAULT_USER) -> None:
    """Create the tunnel system account if missing: no shell, no home, not locked (password ``*``).

    sshd without PAM refuses *locked* accounts (``!`` in /etc/shadow), so the password field is ``*``:
    no password can ever match, but key authentication works.
    """
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", NOLOGIN, "--password", "*", user], check=True, capture_output=True)
        return
    shadow = Path("/etc/shadow")
    if shadow.exists():
        for line in shadow.read_text().splitlines():
            parts = line.split(":")
            if parts[0] == user and parts[1].startswith("!"):
                subprocess.run(["usermod", "--password", "*", user], check=True, capture_output=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str) -> str:
    """ssh-keygen an ed25519 key (no passphrase); return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def authorized_key_line(public_key: str, endpoint: str) -> str:
    """The restricted authorized_keys line of a tunnel client key (see docs/tunnels.md)."""
    return (f'restrict,port-forwarding,permitopen="{endpoint}",command="{NOLOGIN}" '
            f"{public_key}")


@dataclass
class TunnelSshd:
    """One private sshd; ``start()``/``stop()``/``restart()``; files under ``workdir``."""

    endpoint: str                       # "127.0.0.1:PORT", the only target the key may open
    listen_host: str = "127.0.0.1"
    port: int = 0                       # 0: pick a free one
    user: str = DEFAULT_USER
    server_permitopen: bool = True      # False: only the key's permitopen restricts (tests prove it alone)
    netns: str | None = None            # run inside this network namespace (ip netns exec)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cltunnel-sshd-")))
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # sshd reads authorized_keys as the tunnel user
        if not os.path.exists(SSHD):
            raise SshdError(f"{SSHD} not found: install openssh-server")
        ensure_tunnel_account(self.user)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        if self.port == 0:
            self.port = free_port(self.listen_host) if self.netns is None else 2222
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.host_public_key = keygen(self.host_key, "cloudlet-test-host")
        self.client_key = self.workdir / "id_ed25519"
        self.client_public_key = keygen(self.client_key, "cloudlet-tunnel")
        self.known_hosts = self.workdir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line() + "\n")
        keys_dir = self.workdir / "authorized_keys"
        keys_dir.mkdir(mode=0o755)
        self.authorized_keys = keys_dir / self.user
        self.authorized_keys.write_text(authorized_key_line(self.client_public_key, self.endpoint) + "\n")
        os.chmod(self.authorized_keys, 0o644)
        self.config_path = self.workdir / "sshd_config"
        self.config_path.write_text(self.render_config())
        self.log_path = self.workdir / "sshd.log"

    def authorize(self, public_key: str) -> None:
        """Allow one more client key (another cloudlet's), restricted like the first."""
        with open(self.authorized_keys, "a") as fh:
            fh.write(authorized_key_line(public_key, self.endpoint) + "\n")

    def known_hosts_line(self, public_key: str | None = None) -> str:
        host = self.listen_host if self.port == 22 else f"[{self.listen_host}]:{self.port}"
        kind, blob = (public_key or self.host_public_key).split()[:2]
        return f"{host} {kind} {blob}"

    def render_config(self) -> str:
        permitopen = f"    PermitOpen {self.endpoint}\n" if self.server_permitopen else ""
        return (
            f"# private sshd of a cloudlet tunnel test; not the machine's sshd\n"
            f"Port {self.port}\n"
            f"ListenAddress {self.listen_host}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.workdir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}/%u\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin no\n"
            f"AllowUsers {self.user}\n"
            "AllowTcpForwarding no\n"
            "AllowAgentForwarding no\n"
            "AllowStreamLocalForwarding no\n"
            "X11Forwarding no\n"
            "PermitTunnel no\n"
            "PermitTTY no\n"
            "GatewayPorts no\n"
            "Compression no\n"
            f"Ciphers {SSHD_CIPHERS}\n"
            "ClientAliveInterval 15\n"
            "MaxStartups 100:30:200\n"
            "LogLevel VERBOSE\n"
            f"Match User {self.user}\n"
            "    AllowTcpForwarding local\n"
            f"{permitopen}"
            f"    ForceCommand {NOLOGIN}\n"
        )

    def _argv(self) -> list[str]:
        argv = [SSHD, "-D", "-e", "-f", str(self.config_path)]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdError(f"sshd -t refused the config {self.config_path}: {check.stderr.strip()}")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "Server listening on" in text:
                return
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited with {self.proc.returncode}: {text.strip()[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise SshdError(f"sshd did not listen within {timeout:g} s: see {self.log_path}")

    def _descendants(self) -> list[int]:
        """PIDs of the per-connection sshd processes (they may leave the listener's process group)."""
        if self.proc is None:
            return []
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        found, frontier = [], [self.proc.pid]
        while frontier:
            pid = frontier.pop()
            kids = [p for p, pp in parents.items() if pp == pid]
            found.extend(kids)
            frontier.extend(kids)
        return found

    def _signal_all(self, sig: int) -> None:
        """Signal sshd and every connection it forked. Each connection's monitor leads its own
        process group, which its session process joins: signalling the groups also catches a
        session process forked while this runs."""
        assert self.proc is not None
        own = os.getpgid(0)
        targets = self._descendants()
        groups = set()
        for pid in targets:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for group in groups - {own}:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        for pid in [*targets, self.proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL sshd and every connection it forked: established tunnels drop at once."""
        if self.proc is None:
            return
        self._signal_all(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal_all(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def peer_table(self, name: str = "peer", host: str | None = None, **extra: object) -> dict[str, object]:
        """The ``[peers.NAME]`` table (transport ssh) that reaches this sshd's endpoint."""
        table: dict[str, object] = {
            "transport": "ssh", "host": host or self.listen_host, "port": self.port, "user": self.user,
            "client_key": str(self.client_key), "known_hosts": str(self.known_hosts), "endpoint": self.endpoint,
        }
        table.update(extra)
        return table


def sshd_argv_available() -> Sequence[str]:
    """Reasons the tunnel tests cannot run here (empty when they can)."""
    reasons = []
    if not os.path.exists(SSHD):
        reasons.append(f"{SSHD} missing (apt-get install openssh-server)")
    if shutil.which("ssh-keygen") is None:
        reasons.append("ssh-keygen missing (apt-get install openssh-client)")
    if os.geteuid() != 0:
        reasons.append("sshd with its own tunnel account needs root")
    return reasons


async def wait_tunnels_up(connector: Any, timeout: float = 15.0, peers: list[str] | None = None) -> bool:
    """Poll ``connector.status()`` until the named (default: all) tunnels are ``up``; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        states = {p["name"]: p["state"] for p in connector.status()}
        names = peers or list(states)
        if names and all(states.get(n) == "up" for n in names):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)

#!/usr/bin/env python3
"""The local fleet: cloudlet hosts as podman containers running systemd and sshd.

    fleet.py image                 build (or reuse) the Debian host image
    fleet.py up   [--name N] ...   start the hosts, their networks and the podman API service
    fleet.py down [--name N]       remove everything `up` created
    fleet.py status [--name N]     show hosts, addresses and SSH reachability

Each host is a container from ``localhost/cloudlet-host:<hash>``: a Debian bookworm rootfs made
with debootstrap (cached under .cache/fleet/ after the first build) and imported with
``podman import``; it runs systemd as PID 1 (``--systemd=always``) and a real sshd. The hosts sit on
a fleet network with fixed addresses; each host is also attached to its own service network
(``<fleet>-svc-<host>``), the network its controller starts service containers on, so the host's
session daemon reaches its service containers' backend addresses directly. The machine's podman API
socket (a ``podman system service`` started by ``up``) appears in every host at
/run/podman/podman.sock (its directory is bind-mounted), so the controllers use the podman runtime
and the service containers they start are siblings on this machine's podman.

Standard library only: this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "fleet"
IMAGE_REPO = "localhost/cloudlet-host"

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "iproute2",
    "iputils-ping",
    "procps",
    "sudo",
    "ca-certificates",
)
# Bump when the customisation below changes, so the cached rootfs is rebuilt.
RECIPE_VERSION = "3"

# Host keys are made on each host's first boot, not baked into the image: every host of the
# fleet must have its own, or known_hosts would vouch for all of them at once.
HOSTKEYS_UNIT = """\
[Unit]
Description=Generate this host's SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


def log(msg: str) -> None:
    print(f"== fleet: {msg}", flush=True)


def die(msg: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    print(f"fleet: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, input=input, env=env,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()
        die(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {detail[-800:]}")
    return proc


def podman(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], check=check, input=input)


# --------------------------------------------------------------------------------------------
# the host image


def default_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                uri = line.split(None, 1)[1].split()[0]
                if "/debian" in uri:
                    return uri
            if line.startswith("deb ") and "/debian" in line and "security" not in line:
                parts = [p for p in line.split() if not p.startswith("[")]
                return parts[1]
    return "http://deb.debian.org/debian"


def recipe_hash(mirror: str) -> str:
    recipe = json.dumps([RECIPE_VERSION, SUITE, PACKAGES, HOSTKEYS_UNIT], sort_keys=True)
    del mirror  # the mirror does not change what is built
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build_rootfs(tarball: Path, mirror: str) -> None:
    if os.geteuid() != 0:
        die("debootstrap needs root")
    if not shutil.which("debootstrap"):
        die("debootstrap is not installed (make deps installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    target = work / "root"
    start = time.monotonic()
    log(f"debootstrap {SUITE} from {mirror} into {target} (first build only, about 1-3 minutes)")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
           str(target), mirror]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    stage, count = "", 0
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith(("E:", "W:")):
            print(f"   [{time.monotonic() - start:5.0f}s] {line}", flush=True)
            continue
        if not line.startswith("I: "):
            continue
        # Progress: one line per debootstrap stage and one per 40 packages, not one per package.
        word = line[3:].split(" ", 1)[0]
        word = {"Validating": "Retrieving"}.get(word, word)
        count = count + 1 if word == stage else 1
        if word != stage or count % 40 == 0:
            stage = word
            print(f"   [{time.monotonic() - start:5.0f}s] {line[3:]}", flush=True)
    if proc.wait() != 0:
        shutil.rmtree(work, ignore_errors=True)
        die(f"debootstrap failed ({proc.returncode}); see the lines above")
    customise(target, mirror)
    log(f"packing rootfs into {tarball.name}")
    partial = tarball.with_suffix(".partial")
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(target), "-cf", str(partial), "."])
    partial.rename(tarball)
    shutil.rmtree(work, ignore_errors=True)
    log(f"rootfs built in {time.monotonic() - start:.0f} s ({tarball.stat().st_size >> 20} MiB)")


def customise(root: Path, mirror: str) -> None:
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    unit = root / "etc/systemd/system/ssh-hostkeys.service"
    unit.write_text(HOSTKEYS_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "ssh-hostkeys.service"
    if not link.exists():
        link.symlink_to("/etc/systemd/system/ssh-hostkeys.service")
    (root / "etc/machine-id").write_text("")
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")
    # Units that have nothing to do in a container and only slow the boot down or fail.
    for name in ("getty@tty1.service", "systemd-logind.service", "console-getty.service",
                 "apt-daily.timer", "apt-daily-upgrade.timer"):
        masked = root / "etc/systemd/system" / name
        if not masked.exists():
            masked.symlink_to("/dev/null")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def ensure_image(mirror: str | None = None) -> str:
    mirror = mirror or default_mirror()
    digest = recipe_hash(mirror)
    ref = f"{IMAGE_REPO}:{digest}"
    if image_exists(ref):
        log(f"host image {ref} is up to date")
        return ref
    tarball = CACHE / f"rootfs-{SUITE}-{digest}.tar"
    if tarball.exists():
        log(f"reusing cached rootfs {tarball.relative_to(ROOT)}")
    else:
        build_rootfs(tarball, mirror)
    log(f"podman import -> {ref}")
    with tarball.open("rb") as fh:
        proc = subprocess.run(
            ["podman", "import", "--change", 'CMD ["/sbin/init"]', "--change",
             "STOPSIGNAL SIGRTMIN+3", "-", ref], stdin=fh, capture_output=True, text=True)
    if proc.returncode != 0:
        die(f"podman import failed: {proc.stderr.strip()}")
    podman("tag", ref, f"{IMAGE_REPO}:latest")
    return ref


# --------------------------------------------------------------------------------------------
# the podman API service the hosts' controllers talk to


def api_dir() -> Path:
    # The hosts mount this directory (not the socket file): a restarted service makes a new socket,
    # which the running hosts then see.
    return Path("/run/cloudlet-fleet/api")


def api_pidfile() -> Path:
    return Path("/run/cloudlet-fleet/podman.pid")


def api_socket() -> Path:
    return api_dir() / "podman.sock"


def socket_alive(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
            return b" 200 " in s.recv(64)
        except OSError:
            return False


def ensure_api_service() -> Path:
    sock = api_socket()
    if socket_alive(sock):
        return sock
    api_dir().mkdir(parents=True, exist_ok=True)
    if sock.exists():
        sock.unlink()
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "etc/containers.conf"))
    CACHE.mkdir(parents=True, exist_ok=True)  # a fresh clone may reuse a host image and never build
    logf = (CACHE / "podman-api.log").open("ab")
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    api_pidfile().write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if socket_alive(sock):
            log(f"podman API service on {sock} (pid {proc.pid})")
            return sock
        if proc.poll() is not None:
            die(f"podman system service exited ({proc.returncode}); see {CACHE / 'podman-api.log'}")
        time.sleep(0.2)
    die("podman API service did not answer within 30 s")


def stop_api_service() -> None:
    pidfile = api_pidfile()
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        log(f"stopped podman API service (pid {pid})")
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# the fleet


@dataclass(frozen=True)
class Fleet:
    name: str
    hosts: tuple[str, ...]
    subnet: ipaddress.IPv4Network

    @property
    def network(self) -> str:
        return f"{self.name}-net"

    @property
    def state_dir(self) -> Path:
        return CACHE / self.name

    @property
    def key(self) -> Path:
        return self.state_dir / "id_ed25519"

    def container(self, host: str) -> str:
        return f"{self.name}-{host}"

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + 11 + index)

    def service_network(self, host: str) -> str:
        return f"{self.name}-svc-{host}"

    def service_subnet(self, index: int) -> ipaddress.IPv4Network:
        # The service networks follow the fleet network: 10.213.0.0/24 -> 10.213.1.0/24, ...
        base = int(self.subnet.network_address) + (index + 1) * self.subnet.num_addresses
        return ipaddress.IPv4Network((base, self.subnet.prefixlen))


def fleet_from_args(args: argparse.Namespace) -> Fleet:
    hosts = tuple(h for h in args.hosts.split(",") if h)
    for h in hosts:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", h):
            die(f"bad host name {h!r}: cloudlet names are [a-z0-9][a-z0-9-]{{0,31}}")
    if not hosts:
        die("--hosts is empty")
    try:
        subnet = ipaddress.IPv4Network(args.subnet)
    except ValueError as exc:
        die(f"bad --subnet: {exc}")
    if subnet.prefixlen > 26:
        die("--subnet must be a /26 or larger")
    return Fleet(args.name, hosts, subnet)


def ensure_network(name: str, subnet: ipaddress.IPv4Network) -> None:
    if podman("network", "exists", name, check=False).returncode == 0:
        return
    podman("network", "create", "--subnet", str(subnet), name)


def ensure_key(fleet: Fleet) -> None:
    fleet.state_dir.mkdir(parents=True, exist_ok=True)
    if not fleet.key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fleet-{fleet.name}",
             "-f", str(fleet.key)])


def container_running(name: str) -> bool:
    proc = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def start_host(fleet: Fleet, index: int, host: str, image: str, sock: Path) -> None:
    name = fleet.container(host)
    if container_running(name):
        return
    if podman("container", "exists", name, check=False).returncode == 0:
        podman("rm", "-f", name)
    # A host runs many connections (sessiond); as many descriptors as this machine allows.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    svc_net = fleet.service_network(host)
    ensure_network(svc_net, fleet.service_subnet(index))
    podman(
        "run", "-d", "--name", name, "--hostname", host,
        "--systemd=always",
        "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096",
        "--network", f"{fleet.network}:ip={fleet.address(index)}",
        "--network", svc_net,
        "--cap-add", "AUDIT_WRITE", "--cap-add", "NET_RAW",
        "--label", f"cloudlet.fleet={fleet.name}",
        "-v", f"{sock.parent}:/run/podman",
        image,
    )


def ssh_base(fleet: Fleet) -> list[str]:
    return ["ssh", "-i", str(fleet.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]


def wait_ssh(fleet: Fleet, host: str, address: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run([*ssh_base(fleet), f"root@{address}", "true"], check=False)
        if proc.returncode == 0:
            return
        time.sleep(0.5)
    die(f"host {host} ({address}) not reachable over SSH within {timeout:.0f} s: {proc.stderr.strip()}")


def install_key(fleet: Fleet, host: str) -> None:
    pub = fleet.key.with_suffix(".pub").read_text()
    podman("exec", "-i", fleet.container(host), "sh", "-c",
           "umask 077; mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys", input=pub)


def write_inventory_vars(fleet: Fleet) -> Path:
    """The generated part of the local inventory: addresses and per-fleet paths."""
    data = {
        "fleet": fleet.name,
        "ssh_key": str(fleet.key),
        "hosts": {
            h: {
                "address": fleet.address(i),
                "container": fleet.container(h),
                "service_network": fleet.service_network(h),
            }
            for i, h in enumerate(fleet.hosts)
        },
    }
    out = fleet.state_dir / "fleet.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def cmd_image(args: argparse.Namespace) -> int:
    print(ensure_image(args.mirror))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    fleet = fleet_from_args(args)
    start = time.monotonic()
    image = ensure_image(args.mirror)
    sock = ensure_api_service()
    ensure_network(fleet.network, fleet.subnet)
    ensure_key(fleet)
    for i, host in enumerate(fleet.hosts):
        start_host(fleet, i, host, image, sock)
    for i, host in enumerate(fleet.hosts):
        install_key(fleet, host)
        wait_ssh(fleet, host, fleet.address(i))
        log(f"host {host}: {fleet.container(host)} at {fleet.address(i)}, sshd up")
    out = write_inventory_vars(fleet)
    log(f"fleet {fleet.name} up in {time.monotonic() - start:.0f} s ({out.relative_to(ROOT)})")
    return 0


def fleet_containers(name: str) -> list[str]:
    proc = podman("ps", "-a", "--filter", f"label=cloudlet.fleet={name}", "--format", "{{.Names}}")
    return [n for n in proc.stdout.split() if n]


def fleet_networks(fleet: Fleet) -> list[str]:
    proc = podman("network", "ls", "--format", "{{.Name}}")
    return [n for n in proc.stdout.split()
            if n == fleet.network or n.startswith(f"{fleet.name}-svc-")]


def cmd_down(args: argparse.Namespace) -> int:
    fleet = fleet_from_args(args)
    # Service containers the hosts' controllers started sit on the service networks.
    for net in fleet_networks(fleet):
        proc = podman("ps", "-a", "--filter", f"network={net}", "--format", "{{.Names}}", check=False)
        victims = [n for n in proc.stdout.split() if n]
        if victims:
            podman("rm", "-f", "-t", "2", *victims, check=False)
    names = fleet_containers(fleet.name)
    if names:
        podman("rm", "-f", "-t", "3", *names, check=False)
        log(f"removed hosts {' '.join(names)}")
    for net in fleet_networks(fleet):
        podman("network", "rm", "-f", net, check=False)
    shutil.rmtree(fleet.state_dir, ignore_errors=True)
    others = podman("ps", "-a", "--filter", "label=cloudlet.fleet", "--format", "{{.Names}}",
                    check=False).stdout.split()
    if not others and not args.keep_api:
        stop_api_service()
    log(f"fleet {fleet.name} down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    fleet = fleet_from_args(args)
    ok = True
    for i, host in enumerate(fleet.hosts):
        running = container_running(fleet.container(host))
        reach = False
        if running and fleet.key.exists():
            reach = run([*ssh_base(fleet), f"root@{fleet.address(i)}", "true"],
                        check=False).returncode == 0
        ok &= running and reach
        print(f"{host:8} {fleet.container(host):24} {fleet.address(i):15} "
              f"{'running' if running else 'absent':8} {'ssh ok' if reach else 'no ssh'}")
    print(f"podman API: {api_socket()} {'up' if socket_alive(api_socket()) else 'down'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=os.environ.get("FLEET_NAME", "cloudlet"),
                        help="fleet name, the prefix of every podman resource (default: cloudlet)")
    common.add_argument("--hosts", default=os.environ.get("FLEET_HOSTS", "a,b,c"),
                        help="comma-separated host (cloudlet) names (default: a,b,c)")
    common.add_argument("--subnet", default=os.environ.get("FLEET_SUBNET", "10.213.0.0/24"),
                        help="fleet network; hosts get .11, .12, ...; service networks take the "
                             "following subnets of the same size (default: 10.213.0.0/24)")
    common.add_argument("--mirror", default=None,
                        help="Debian mirror for debootstrap (default: the one apt uses here)")
    p = sub.add_parser("image", parents=[common], help="build or reuse the host image; print its name")
    p.set_defaults(func=cmd_image)
    p = sub.add_parser("up", parents=[common], help="start the fleet (idempotent)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", parents=[common], help="remove the fleet's hosts, services and networks")
    p.add_argument("--keep-api", action="store_true", help="leave the podman API service running")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", parents=[common], help="show the hosts and whether SSH reaches them")
    p.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

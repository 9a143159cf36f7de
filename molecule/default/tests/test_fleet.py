"""What site.yml must leave on every host, checked on the real hosts (pytest-testinfra).

The ``host`` tests run once per host of the molecule inventory; ``test_handover_end_to_end`` runs
once, on the control node, as a device would.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
FLEET = os.environ.get("MOLECULE_FLEET_NAME", "cltest-molecule")
PEERS = set(os.environ.get("MOLECULE_FLEET_HOSTS", "mol-a,mol-b,mol-c").split(","))
TUNNEL_USER = "cloudlet-tunnel"


def control_api(host, path: str) -> dict:
    """GET a path of the sessiond control API on its Unix socket."""
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.connect('/run/cloudlet/sessiond.sock')\n"
        f"s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "d=b''\n"
        "while (c:=s.recv(65536)): d+=c\n"
        "sys.stdout.write(d.split(b'\\r\\n\\r\\n',1)[1].decode())\n"
    )
    encoded = base64.b64encode(script.encode()).decode()
    return json.loads(host.check_output(f"python3 -c 'import base64;exec(base64.b64decode(\"{encoded}\"))'"))


def ssh_status(host, command: str) -> tuple[int, str]:
    """Run an ssh command on the host; its exit status travels in stdout, because Ansible takes
    status 255 (ssh's own failures) for an unreachable host."""
    out = host.run(f"{command} </dev/null 2>&1; echo \"exit=$?\"").stdout
    body, _, status = out.rstrip().rpartition("exit=")
    return int(status), body


@pytest.mark.parametrize("unit", ["cloudlet-sessiond", "cloudlet-controller", "ssh"])
def test_services_enabled_and_running(host, unit):
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running


def test_ports_listen_only_where_they_should(host):
    listening = set(host.socket.get_listening_sockets())
    # The peer endpoint, metrics, the controller's plain HTTP: loopback only. The controller API (TLS) and the demo service's
    # session port: every address. sshd: every address.
    assert "tcp://127.0.0.1:7700" in listening
    assert "tcp://127.0.0.1:9701" in listening
    assert "tcp://0.0.0.0:8700" in listening
    assert "tcp://0.0.0.0:31000" in listening
    tcp = {s for s in listening if s.startswith("tcp")}
    assert "tcp://127.0.0.1:8701" in listening  # the controller's plain-HTTP listener: loopback only
    allowed = {"tcp://127.0.0.1:7700", "tcp://127.0.0.1:9701", "tcp://0.0.0.0:8700", "tcp://127.0.0.1:8701",
               "tcp://0.0.0.0:31000",
               "tcp://0.0.0.0:22", "tcp://:::22"}
    assert tcp <= allowed, f"unexpected listeners: {sorted(tcp - allowed)}"


def test_daemon_accounts_and_file_modes(host):
    assert host.process.filter(comm="cloudlet", user="cloudlet"), "sessiond must run as the cloudlet account"
    secret = host.file("/etc/cloudlet/fleet.secret")
    assert secret.user == "root" and secret.group == "cloudlet" and secret.mode == 0o640
    key = host.file("/etc/cloudlet/tunnel/id_ed25519")
    assert key.user == "cloudlet" and key.mode == 0o600


def test_tunnel_account_is_locked_down(host):
    user = host.user(TUNNEL_USER)
    assert user.shell == "/usr/sbin/nologin"
    assert user.password == "*"
    keys = host.file("/var/lib/cloudlet-tunnel/.ssh/authorized_keys")
    assert keys.user == "root" and keys.mode == 0o644
    home = host.file("/var/lib/cloudlet-tunnel")
    assert home.user == "root"
    lines = [ln for ln in keys.content_string.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == len(PEERS) - 1
    for line in lines:
        assert line.startswith('restrict,port-forwarding,permitopen="127.0.0.1:7700",command="/usr/sbin/nologin" ')
    effective = host.check_output(f"sshd -T -C user={TUNNEL_USER},host=x,addr=10.0.0.1")
    for setting in ("allowtcpforwarding local", "permitopen 127.0.0.1:7700", "permittty no",
                    "forcecommand /usr/sbin/nologin", "x11forwarding no", "allowagentforwarding no"):
        assert setting in effective


def test_tunnels_up(host):
    me = host.check_output("hostname")
    peers = control_api(host, "/v1/peers")["peers"]
    assert {p["name"] for p in peers} == PEERS - {me}
    assert all(p["state"] == "up" and p["transport"] == "ssh" for p in peers), peers


def test_tunnel_key_opens_only_the_peer_endpoint(host):
    """With its real key and known_hosts, this host reaches a peer's endpoint and nothing else."""
    me = host.check_output("hostname")
    peer_conf = host.file("/etc/cloudlet/sessiond.toml").content_string
    peer = sorted(PEERS - {me})[0]
    address = peer_conf.split(f"[peers.{peer}]", 1)[1].split('host = "', 1)[1].split('"', 1)[0]
    ssh = (f"ssh -i /etc/cloudlet/tunnel/id_ed25519 -o BatchMode=yes -o StrictHostKeyChecking=yes "
           f"-o UserKnownHostsFile=/etc/cloudlet/tunnel/known_hosts -o ConnectTimeout=10 {TUNNEL_USER}@{address}")
    rc, out = ssh_status(host, f"{ssh} -W 127.0.0.1:7700")
    assert rc == 0, out
    rc, out = ssh_status(host, f"{ssh} -W 127.0.0.1:22")
    assert rc != 0 and "prohibited" in out, out
    rc, out = ssh_status(host, f"{ssh} id")
    assert "uid=" not in out and "not available" in out, out


def test_handover_end_to_end():
    """A device streams through A, moves to B (FIN) and C (no FIN); the report must be clean."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fleet" / "demo_client.py"), "--name", FLEET, "--seconds", "3",
         "--rate", "400", "--blob-mib", "8"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((ROOT / ".cache" / "fleet" / FLEET / "demo-report.json").read_text())
    fin, drop = report["handovers"]
    assert fin["fin"] and fin["lost_lines"] == 0 and fin["duplicated_lines"] == 0
    assert not drop["fin"] and drop["duplicated_lines"] == 0
    assert report["duplicated_lines"] == 0
    assert report["blob_bytes_wrong"] == 0 and report["blob_bytes_checked"] == 2 * (8 << 20)
    assert report["same_backend_connection"]
    assert report["received_lines"] + report["lost_lines"] == report["stream_lines"]


# -- device access: TLS from the fleet CA, a device credential on every cloudlet -------------------

STATE = ROOT / ".cache" / "fleet" / FLEET
DEVICES = STATE / "credentials" / "devices"
CA_FILE = STATE / "credentials" / "ca" / "ca.crt"


def fleet_addresses() -> dict[str, str]:
    hosts = json.loads((STATE / "fleet.json").read_text())["hosts"]
    return {name: h["address"] for name, h in hosts.items() if name in PEERS}  # (side_effect adds mol-d)


def https(url: str, token: str, method: str = "GET", ctx=None) -> tuple[int, dict]:
    import ssl
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx or ssl.create_default_context(cafile=CA_FILE)) as r:
            body = r.read()
            return r.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def podman_exec(container: str, *argv: str) -> subprocess.CompletedProcess:
    """Run a command on a fleet host (its container), without raising."""
    return subprocess.run(["podman", "exec", container, *argv], capture_output=True, text=True)


def sessiond_pid(container: str) -> str:
    return podman_exec(container, "systemctl", "show", "--property=MainPID", "--value", "cloudlet-sessiond").stdout.strip()


async def read_line(c) -> bytes:  # type: ignore[no-untyped-def]
    """One line of the demo service from a SessionClient, byte by byte (20 s per byte at most)."""
    import asyncio

    out = b""
    while not out.endswith(b"\n"):
        out += await asyncio.wait_for(c.recv(1), 20)
    return out


def test_controller_api_is_https_with_a_certificate_of_the_fleet_ca():
    import socket
    import ssl

    for name, address in fleet_addresses().items():
        status, health = https(f"https://{address}:8700/v1/health", "")
        assert status == 200 and health["cloudlet"] == name
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            with socket.create_connection((address, 8700), timeout=10) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname=address)  # no fleet CA
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            with socket.create_connection((address, 8700), timeout=10) as raw:
                ssl.create_default_context(cafile=CA_FILE).wrap_socket(raw, server_hostname="not-a-cloudlet.example")


def test_device_profile_gives_sessions_and_the_map_on_every_cloudlet():
    import tomllib

    profile = tomllib.loads((DEVICES / "demo-client.toml").read_text())["device"]
    addresses = fleet_addresses()
    assert sorted(profile["controllers"]) == sorted(f"https://{a}:8700" for a in addresses.values())
    for url in profile["controllers"]:
        status, sess = https(url + "/v1/services/demo/sessions", profile["credential"], "POST")
        assert status == 201, sess
        assert sess["device"] == "demo-client"
        assert sorted(e["cloudlet"] for e in sess["map"]["cloudlets"]) == sorted(addresses)
        status, err = https(url + "/v1/services", profile["credential"])
        assert status == 403 and err["error"]["code"] == "forbidden"
        status, _ = https(url + "/v1/sessions/" + sess["session"], profile["credential"], "DELETE")
        assert status in (204, 404)  # never attached: nothing live to end


def test_a_revoked_device_is_refused_on_every_cloudlet():
    token = (STATE / "credentials" / "controller.token").read_text().strip()
    credential = (DEVICES / "molecule-tablet.credential").read_text().strip()
    urls = [f"https://{a}:8700" for a in fleet_addresses().values()]
    for url in urls:
        status, _ = https(url + "/v1/services/demo/sessions", credential, "POST")
        assert status == 201
    for url in urls:
        status, _ = https(url + "/v1/devices/molecule-tablet", token, "DELETE")
        assert status == 204
    for url in urls:
        status, err = https(url + "/v1/services/demo/sessions", credential, "POST")
        assert status == 401 and err["error"]["code"] == "device_revoked"


def test_no_device_secret_in_any_daemon_log(host):
    for device in ("demo-client", "molecule-tablet"):
        secret = (DEVICES / f"{device}.secret").read_text().strip()
        logs = host.check_output("journalctl --no-pager -o cat -u cloudlet-controller -u cloudlet-sessiond")
        assert secret not in logs
        assert f'"device":"{device}"' in logs  # the id is logged, the secret never


def test_systemctl_restart_of_sessiond_keeps_a_resumable_session():
    """Under the real systemd: the anchor's sessiond restarts and hands the session over (fd store);
    the client resumes in mode 2 on the same backend connection, nothing lost or repeated."""
    import asyncio
    import tomllib

    from cloudlet.client import SessionClient

    profile = tomllib.loads((DEVICES / "demo-client.toml").read_text())["device"]
    hosts = json.loads((STATE / "fleet.json").read_text())["hosts"]
    name = sorted(hosts)[0]
    status, sess = https(f"https://{hosts[name]['address']}:8700/v1/services/demo/sessions", profile["credential"],
                         "POST")
    assert status == 201, sess

    line = read_line

    async def run() -> list[bytes]:
        c = SessionClient(sess["host"], sess["port"], sess["session"], resumable=True)
        await c.open()
        assert (await line(c)).startswith(b"HELLO cloudlet-demo")
        await c.send(b"INCR\n")
        first = await line(c)
        restart = await asyncio.create_subprocess_exec(
            "podman", "exec", hosts[name]["container"], "systemctl", "restart", "cloudlet-sessiond")
        assert await restart.wait() == 0
        for _ in range(100):  # the path broke (RST); attach again until the new process answers
            try:
                await c.resume()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await c.send(b"INCR\n")
        second = await line(c)
        await c.end()
        return [first, second]

    assert asyncio.run(run()) == [b"COUNT 1\n", b"COUNT 2\n"]  # the same backend connection throughout
    journal = subprocess.run(["podman", "exec", hosts[name]["container"], "journalctl", "-u", "cloudlet-sessiond",
                              "-n", "50", "--no-pager"], capture_output=True, text=True).stdout
    assert "sessions taken back from the previous process" in journal


def test_systemctl_reload_with_a_broken_config_is_refused_and_the_running_one_stays():
    """Under the real systemd: ``systemctl reload`` of a broken sessiond.toml fails with the key at
    fault, the daemon (same process) goes on with its config and its session; a good file reloads."""
    import asyncio
    import tomllib

    from cloudlet.client import SessionClient

    profile = tomllib.loads((DEVICES / "demo-client.toml").read_text())["device"]
    hosts = json.loads((STATE / "fleet.json").read_text())["hosts"]
    name = sorted(PEERS)[-1]
    container = hosts[name]["container"]

    def on_host(*argv: str) -> subprocess.CompletedProcess:
        return podman_exec(container, *argv)

    def main_pid() -> str:
        return sessiond_pid(container)

    status, sess = https(f"https://{hosts[name]['address']}:8700/v1/services/demo/sessions", profile["credential"],
                         "POST")
    assert status == 201, sess
    pid = main_pid()
    assert on_host("cp", "-p", "/etc/cloudlet/sessiond.toml", "/etc/cloudlet/sessiond.toml.good").returncode == 0

    line = read_line

    async def run() -> tuple[list[bytes], subprocess.CompletedProcess, subprocess.CompletedProcess]:
        c = SessionClient(sess["host"], sess["port"], sess["session"], resumable=True)
        await c.open()
        assert (await line(c)).startswith(b"HELLO cloudlet-demo")
        await c.send(b"INCR\n")
        first = await line(c)
        broken = on_host("sed", "-i", "s/^grace_seconds = .*/grace_seconds = -5/", "/etc/cloudlet/sessiond.toml")
        assert broken.returncode == 0
        refused = on_host("systemctl", "reload", "cloudlet-sessiond")
        await c.send(b"INCR\n")
        second = await line(c)  # the same connection, never broken
        on_host("cp", "-p", "/etc/cloudlet/sessiond.toml.good", "/etc/cloudlet/sessiond.toml")
        good = on_host("systemctl", "reload", "cloudlet-sessiond")
        await c.send(b"INCR\n")
        third = await line(c)
        await c.end()
        return [first, second, third], refused, good

    try:
        replies, refused, good = asyncio.run(run())
    finally:
        on_host("cp", "-p", "/etc/cloudlet/sessiond.toml.good", "/etc/cloudlet/sessiond.toml")
        on_host("rm", "-f", "/etc/cloudlet/sessiond.toml.good")
    assert refused.returncode != 0, refused.stdout
    assert good.returncode == 0, good.stderr
    assert replies == [b"COUNT 1\n", b"COUNT 2\n", b"COUNT 3\n"]
    assert main_pid() == pid  # neither reload restarted it
    assert on_host("systemctl", "is-active", "cloudlet-sessiond").stdout.strip() == "active"
    journal = on_host("journalctl", "-u", "cloudlet-sessiond", "-n", "80", "--no-pager").stdout
    assert "reload refused" in journal and "sessiond.grace_seconds" in journal
    assert "nothing changed" in journal and "config reloaded" in journal  # the good file again
    # journald got each line's priority: the refusal is an error, the reload's lines are info
    warnings = on_host("journalctl", "-p", "warning", "-u", "cloudlet-sessiond", "-n", "80", "--no-pager").stdout
    assert "reload refused" in warnings
    assert "config reloaded" not in warnings and "nothing changed" not in warnings
    assert "sessiond started" not in warnings


def test_in_place_upgrade_under_systemd_passes_the_unit_and_the_session_to_the_successor():
    """``cloudlet sessiond --upgrade --force`` on a host: the successor becomes the unit's main process
    (``MAINPID=``), the session goes on over the same connection, and the unit stays manageable
    (a ``systemctl restart`` afterwards stops the successor and starts a new one)."""
    import asyncio
    import tomllib

    from cloudlet.client import SessionClient

    profile = tomllib.loads((DEVICES / "demo-client.toml").read_text())["device"]
    hosts = json.loads((STATE / "fleet.json").read_text())["hosts"]
    name = sorted(PEERS)[1]
    container = hosts[name]["container"]

    def on_host(*argv: str) -> subprocess.CompletedProcess:
        return podman_exec(container, *argv)

    def main_pid() -> str:
        return sessiond_pid(container)

    status, sess = https(f"https://{hosts[name]['address']}:8700/v1/services/demo/sessions", profile["credential"],
                         "POST")
    assert status == 201, sess
    before = main_pid()

    line = read_line

    async def run() -> tuple[list[bytes], subprocess.CompletedProcess]:
        c = SessionClient(sess["host"], sess["port"], sess["session"], resumable=True)
        await c.open()
        assert (await line(c)).startswith(b"HELLO cloudlet-demo")
        await c.send(b"INCR\n")
        first = await line(c)
        upgraded = await asyncio.to_thread(on_host, "/opt/cloudlet/venv/bin/cloudlet", "sessiond", "--config",
                                           "/etc/cloudlet/sessiond.toml", "--upgrade", "--force")
        await c.send(b"INCR\n")
        second = await line(c)  # the same connection: it was handed over, never broken
        await c.end()
        return [first, second], upgraded

    replies, upgraded = asyncio.run(run())
    assert upgraded.returncode == 0, upgraded.stderr
    assert replies == [b"COUNT 1\n", b"COUNT 2\n"]
    after = main_pid()
    assert after != before and after in upgraded.stdout  # systemd follows the successor
    assert on_host("systemctl", "is-active", "cloudlet-sessiond").stdout.strip() == "active"
    journal = on_host("journalctl", "-u", "cloudlet-sessiond", "-n", "80", "--no-pager").stdout
    assert "upgraded in place" in journal
    assert on_host("systemctl", "restart", "cloudlet-sessiond").returncode == 0
    assert main_pid() not in (after, "0")
    assert on_host("systemctl", "is-active", "cloudlet-sessiond").stdout.strip() == "active"


def test_kill_9_of_sessiond_under_systemd_refuses_its_sessions_clearly_and_serves_again():
    """``systemctl kill -s KILL``: systemd restarts it (Restart=on-failure); nothing was handed over, so
    the session is refused SESSION_LOST (never silently given a new backend); new sessions work."""
    import asyncio
    import time
    import tomllib

    from cloudlet.client import SessionClient, SessionRefused
    from cloudlet.protocol.wire import Status

    profile = tomllib.loads((DEVICES / "demo-client.toml").read_text())["device"]
    hosts = json.loads((STATE / "fleet.json").read_text())["hosts"]
    name = sorted(PEERS)[0]
    container = hosts[name]["container"]

    def on_host(*argv: str) -> subprocess.CompletedProcess:
        return podman_exec(container, *argv)

    def main_pid() -> str:
        return sessiond_pid(container)

    def new_session() -> dict:
        status, sess = https(f"https://{hosts[name]['address']}:8700/v1/services/demo/sessions",
                             profile["credential"], "POST")
        assert status == 201, sess
        return sess

    line = read_line

    sess = new_session()
    before = main_pid()

    async def run() -> Status:
        c = SessionClient(sess["host"], sess["port"], sess["session"], resumable=True)
        await c.open()
        assert (await line(c)).startswith(b"HELLO cloudlet-demo")
        await c.send(b"INCR\n")
        assert await line(c) == b"COUNT 1\n"
        assert on_host("systemctl", "kill", "-s", "KILL", "cloudlet-sessiond").returncode == 0
        deadline = time.monotonic() + 30
        while True:
            try:
                await c.resume()
            except SessionRefused as refused:
                return refused.status
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the session came back after kill -9 with nothing handed over")

    status = asyncio.run(run())
    assert status in (Status.SESSION_LOST, Status.REPLAY_UNAVAILABLE)
    assert main_pid() not in (before, "0")
    assert on_host("systemctl", "is-active", "cloudlet-sessiond").stdout.strip() == "active"

    fresh = new_session()

    async def again() -> bytes:
        c = SessionClient(fresh["host"], fresh["port"], fresh["session"], resumable=True)
        await c.open()
        hello = await line(c)
        await c.end()
        return hello

    assert asyncio.run(again()).startswith(b"HELLO cloudlet-demo")  # the service was restored at start

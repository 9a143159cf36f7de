"""``cloudlet status``: this cloudlet at a glance, from its two daemons' own answers.

Asks sessiond's control socket (``/v1/health``, ``/v1/peers``) and the controller's loopback API
(``/v1/health``), and systemd for the units' states where there is one. A daemon that does not
answer is reported ``down`` with the reason; the command never fails for it (exit 1 says "not all
up", 0 "all up"). ``--json`` prints the same as one object; ``cloudlet.fleet.status`` runs it on every
cloudlet and prints one table of the fleet.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
from typing import Any
from urllib.parse import urlsplit

from cloudlet._version import VERSION as __version__

UNITS = {"sessiond": "cloudlet-sessiond.service", "controller": "cloudlet-controller.service"}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def _get(conn: http.client.HTTPConnection, path: str) -> dict[str, Any]:
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"{path} answered {resp.status}")
    body = json.loads(raw or b"{}")
    if not isinstance(body, dict):
        raise ValueError(f"{path}: not a JSON object")
    return body


def _unit_state(unit: str) -> str | None:
    if shutil.which("systemctl") is None:
        return None
    try:
        proc = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def collect(sessiond_socket: str, controller_url: str, timeout: float = 5.0) -> dict[str, Any]:
    out: dict[str, Any] = {"cloudlet": None, "version": __version__, "tunnels": []}
    sessiond: dict[str, Any] = {"state": "down", "unit": _unit_state(UNITS["sessiond"])}
    try:
        health = _get(_UnixConnection(sessiond_socket, timeout), "/v1/health")
        peers = _get(_UnixConnection(sessiond_socket, timeout), "/v1/peers").get("peers", [])
        sessiond.update(state="up", version=health.get("version"), pid=health.get("pid"),
                        services=health.get("services"), sessions=health.get("sessions"))
        out["cloudlet"] = health.get("cloudlet")
        out["tunnels"] = [{"name": p.get("name"), "state": p.get("state"), "rtt_ms": p.get("rtt_ms"),
                           "transport": p.get("transport")} for p in peers if isinstance(p, dict)]
    except (OSError, ValueError, http.client.HTTPException) as exc:
        sessiond["error"] = f"{sessiond_socket}: {exc}"
    controller: dict[str, Any] = {"state": "down", "unit": _unit_state(UNITS["controller"])}
    url = urlsplit(controller_url)
    try:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
        health = _get(conn, (url.path.rstrip("/") or "") + "/v1/health")
        controller.update(state="up" if health.get("status") == "ok" else str(health.get("status")),
                          version=health.get("version"), runtime=health.get("runtime"),
                          checks=health.get("checks"), last_reconcile_error=health.get("last_reconcile_error"))
        out["cloudlet"] = out["cloudlet"] or health.get("cloudlet")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        controller["error"] = f"{controller_url}: {exc}"
    out["sessiond"], out["controller"] = sessiond, controller
    out["all_up"] = (sessiond["state"] == "up" and controller["state"] == "up"
                     and all(t["state"] == "up" for t in out["tunnels"]))
    return out


def _tunnel(t: dict[str, Any]) -> str:
    rtt = f" {t['rtt_ms']:.1f} ms" if isinstance(t.get("rtt_ms"), (int, float)) else ""
    return f"{t['name']} {t['state']}{rtt}"


def render(status: dict[str, Any]) -> str:
    """The human view: one line per daemon, one for the tunnels."""
    lines = [f"cloudlet {status['cloudlet'] or '?'}"]
    for name in ("sessiond", "controller"):
        d = status[name]
        unit = f" (unit {d['unit']})" if d.get("unit") and d["unit"] != "active" else ""
        if d["state"] == "down":
            lines.append(f"  {name:<11}down{unit}: {d.get('error', '')}")
            continue
        extra = (f"pid {d.get('pid')}, {d.get('services')} services, {d.get('sessions')} sessions"
                 if name == "sessiond" else f"runtime {d.get('runtime')}")
        if name == "controller" and d["state"] != "up":
            extra += f", checks {d.get('checks')}"
        lines.append(f"  {name:<11}{d['state']:<5}{d.get('version')}  {extra}{unit}")
    tunnels = ", ".join(_tunnel(t) for t in status["tunnels"]) or "none"
    lines.append(f"  {'tunnels':<11}{tunnels}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    status = collect(args.sessiond_socket, args.controller_url, args.timeout)
    print(json.dumps(status) if args.json else render(status))
    return 0 if status["all_up"] else 1


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="this cloudlet at a glance: daemons up/down, versions, services, sessions, tunnels",
        description="Ask this cloudlet's session daemon and controller how they are: up or down (with the "
        "reason), version, services, sessions, and every tunnel's state and RTT. Exit 0 if all is up, "
        "1 if not (it still reports). cloudlet.fleet.status runs it on every cloudlet.")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--sessiond-socket", default="/run/cloudlet/sessiond.sock",
                   help="sessiond's control socket (default /run/cloudlet/sessiond.sock)")
    p.add_argument("--controller-url", default="http://127.0.0.1:8701",
                   help="the controller's loopback API (default http://127.0.0.1:8701)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer (default 5)")
    p.set_defaults(func=run)

"""``cloudlet sessiond``: command line, signals and systemd readiness around :class:`Sessiond`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from cloudlet._version import VERSION as __version__
from cloudlet.common import sdnotify
from cloudlet.common.config import ConfigError
from cloudlet.common.logs import error_text, event, setup_logging
from cloudlet.common.loop import quiet_accept_errors, raise_nofile_limit, use_fast_loop
from cloudlet.sessiond.config import SessiondConfig, check_files
from cloudlet.sessiond.daemon import Sessiond
from cloudlet.sessiond.reload import ReloadRefused

log = logging.getLogger(__name__)


async def serve(config: SessiondConfig, ready_fd: int | None = None, config_path: str | None = None,
                successor_argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT or an in-place upgrade hands over; the process's exit status."""
    daemon = Sessiond(config, config_path=config_path)
    daemon.successor_argv = successor_argv
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    # the signals first: a SIGHUP or SIGTERM during the start (a successor taking over holds every
    # session by then) must not kill the process with the default action
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[Any]] = set()
    started = False

    def hangup() -> None:  # SIGHUP: the same reload as POST /v1/reload; the outcome goes to the log
        if not started:
            event(log, logging.WARNING, "SIGHUP while starting: no reload (send it again once started)")
            return
        task = loop.create_task(_reload_quietly(daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    await daemon.start()
    if daemon.predecessor is not None:  # it passes the unit's main PID to us, then exits
        await asyncio.to_thread(daemon.predecessor.started)
        daemon.predecessor = None
    started = True
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    sdnotify.notify("READY=1")
    stopping = loop.create_task(stop.wait())
    upgraded = loop.create_task(daemon.stopped.wait())  # set by an in-place upgrade: the successor serves
    await asyncio.wait([stopping, upgraded], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    upgraded.cancel()
    await daemon.stop()
    return daemon.exit_status


async def _reload_quietly(daemon: Sessiond) -> None:
    with contextlib.suppress(ReloadRefused):  # logged by the daemon; the running config stays
        await daemon.reload_file()


async def request_reload(control_socket: str) -> tuple[int, dict[str, Any]]:
    """``POST /v1/reload`` on the running sessiond's control socket: (HTTP status, JSON body)."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=control_socket)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with http.post("http://sessiond/v1/reload") as resp:
            return resp.status, await resp.json()


async def request_upgrade(control_socket: str, force: bool = False,
                          timeout: float = 90.0) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``POST /v1/upgrade``, then ``GET /v1/health`` until the successor answers: (status, upgrade, health)."""
    import aiohttp

    async def call(method: str, path: str) -> tuple[int, dict[str, Any]]:
        connector = aiohttp.UnixConnector(path=control_socket)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.request(method, f"http://sessiond{path}") as resp:
                return resp.status, await resp.json()

    _, before = await call("GET", "/v1/health")
    if before.get("version") == __version__ and not force:
        return 200, {"status": "current"}, before
    status, body = await call("POST", "/v1/upgrade")
    if status != 202:
        return status, body, before
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        try:
            _, health = await call("GET", "/v1/health")
        except (OSError, aiohttp.ClientError, ValueError):
            continue  # between the two processes
        if health.get("pid") == body["successor"]:
            return 202, body, health
    return 504, body, before


def upgrade_running(config: SessiondConfig, force: bool = False) -> int:
    """``--upgrade``: 0 upgraded (or already current), 1 not running, 3 not possible in place (restart)."""
    import aiohttp

    try:
        status, body, health = asyncio.run(request_upgrade(config.control_socket, force))
    except (OSError, aiohttp.ClientError, ValueError) as exc:
        print(error_text(f"cloudlet sessiond: cannot reach the running sessiond at {config.control_socket}: {exc}"),
              file=sys.stderr)
        return 1
    if status == 200:
        print(f"sessiond {config.cloudlet}: already runs {__version__} (nothing to upgrade)")
        return 0
    if status == 202:
        print(f"sessiond {config.cloudlet}: upgraded in place to {health.get('version')}: pid {body['pid']} -> "
              f"{body['successor']}, {health.get('taken_back', 0)} session(s) taken over")
        return 0
    if status == 504:
        print(error_text(f"cloudlet sessiond: the successor (pid {body.get('successor')}) did not take over in "
                         "time; see the journal"), file=sys.stderr)
        return 3
    error = body.get("error", {}) if isinstance(body, dict) else {}
    print(error_text(f"cloudlet sessiond: no in-place upgrade ({status} {error.get('message', '')}): restart it "
                     "instead", 4), file=sys.stderr)
    return 3


def reload_running(config: SessiondConfig, path: str) -> int:
    """``--reload``: 0 applied, 2 refused as a bad config, 3 refused as needing a restart, 1 not running."""
    import aiohttp

    try:
        status, body = asyncio.run(request_reload(config.control_socket))
    except (OSError, aiohttp.ClientError) as exc:
        print(error_text(f"cloudlet sessiond: cannot reach the running sessiond at {config.control_socket}: {exc}"),
              file=sys.stderr)
        return 1
    if status == 200:
        parts = [f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in body.items() if isinstance(v, list) and v]
        print(f"sessiond {config.cloudlet}: reloaded {path}" + (f" ({'; '.join(parts)})" if parts else " (nothing changed)"))
        return 0
    error = body.get("error", {})
    print(error_text(f"cloudlet sessiond: reload refused: {error.get('message', status)}"), file=sys.stderr)
    return 3 if error.get("code") == "restart_required" else 2


def run(args: argparse.Namespace) -> int:
    try:
        config = SessiondConfig.load(args.config)
    except ConfigError as exc:
        refused = "reload refused, the running sessiond keeps its config: " if args.reload else ""
        print(error_text(f"cloudlet sessiond: {refused}bad config {exc}"), file=sys.stderr, flush=True)
        return 2
    if args.check_config or args.reload or args.upgrade:
        problems = check_files(config, keys=args.check_config)
        if problems:
            refused = "reload refused, the running sessiond keeps its config: " if args.reload else ""
            print(error_text(f"cloudlet sessiond: {refused}bad config {ConfigError(args.config, problems)}"),
                  file=sys.stderr, flush=True)
            return 2
        if args.reload:
            return reload_running(config, args.config)
        if args.upgrade:
            return upgrade_running(config, args.force)
        print(f"config {args.config} is valid (cloudlet {config.cloudlet}, {len(config.peers)} peer(s))")
        return 0
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    raise_nofile_limit()
    use_fast_loop(args.loop)
    try:
        successor = [sys.executable, "-m", "cloudlet", "sessiond", "--config", args.config, "--loop", args.loop]
        for flag in ("log_level", "log_format"):
            if getattr(args, flag):
                successor += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        return asyncio.run(serve(config, config_path=args.config, successor_argv=successor))
    except (OSError, ValueError) as exc:
        event(log, logging.ERROR, "sessiond failed to start", error=str(exc))
        return 1


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "sessiond",
        help="run the session daemon (service ports, peer endpoint, control API, metrics)",
        description="Run the Session Service of this cloudlet: one port per service relaying to its backend, "
        "sessions that survive disconnects (grace period, resume, takeover), forwarding to peer cloudlets, "
        "a control API on a Unix socket and Prometheus metrics. See docs/sessiond.md.",
    )
    p.add_argument("--config", required=True, help="TOML config file (see docs/sessiond.md)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config (every key at fault, at once), the secret and the peers' key files, then exit")
    p.add_argument("--reload", action="store_true",
                   help="validate the config, then have the running sessiond apply it in place (peers, limits, "
                   "log level; no session is touched); exit 0 applied, 2 bad config, 3 needs a restart, "
                   "1 not running. The unit's ExecReload.")
    p.add_argument("--upgrade", action="store_true",
                   help="have the running sessiond start this installed version as its successor and hand every "
                   "session, connection and listener to it once it is ready (no restart: a pause of the "
                   "hand-over only); exit 0 upgraded or already current, 3 not possible in place (restart "
                   "instead), 1 not running. See docs/sessiond.md, Restart.")
    p.add_argument("--force", action="store_true",
                   help="with --upgrade: hand over to a successor even if it is the version running (it applies "
                   "the keys only a restart applies, without a restart's pause)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override the config's log_level")
    p.add_argument("--log-format", choices=["json", "text"], help="override the config's log_format")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="event loop: uvloop if installed (auto, the default), or plain asyncio")
    p.set_defaults(func=run)

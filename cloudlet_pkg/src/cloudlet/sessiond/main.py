"""``cloudlet sessiond``: command line, signals and systemd readiness around :class:`Sessiond`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from cloudlet.common import sdnotify
from cloudlet.common.config import ConfigError
from cloudlet.common.logs import event, setup_logging
from cloudlet.common.loop import quiet_accept_errors, raise_nofile_limit, use_fast_loop
from cloudlet.protocol import credentials
from cloudlet.sessiond.config import SessiondConfig
from cloudlet.sessiond.daemon import Sessiond

log = logging.getLogger(__name__)


async def serve(config: SessiondConfig, ready_fd: int | None = None) -> None:
    daemon = Sessiond(config)
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    await daemon.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    sdnotify.notify("READY=1")
    await stop.wait()
    await daemon.stop()


def check(config: SessiondConfig) -> list[str]:
    """What ``--check-config`` checks beyond the file itself: the secret, the peers' key files."""
    problems = []
    try:
        credentials.load_secret(config.secret_file)
    except (OSError, ValueError) as exc:
        problems.append(f"sessiond.secret_file: {exc}")
    for name, peer in config.peers.items():
        for key in ("client_key", "known_hosts"):
            path = getattr(peer, key, None)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"peers.{name}.{key}: cannot read {path}")
    return problems


def run(args: argparse.Namespace) -> int:
    try:
        config = SessiondConfig.load(args.config)
    except ConfigError as exc:
        print(f"cloudlet sessiond: bad config {exc}", file=sys.stderr, flush=True)
        return 2
    if args.check_config:
        problems = check(config)
        if problems:
            print(f"cloudlet sessiond: bad config {ConfigError(args.config, problems)}", file=sys.stderr, flush=True)
            return 2
        print(f"config {args.config} is valid (cloudlet {config.cloudlet}, {len(config.peers)} peer(s))")
        return 0
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    raise_nofile_limit()
    use_fast_loop(args.loop)
    try:
        asyncio.run(serve(config))
    except (OSError, ValueError) as exc:
        event(log, logging.ERROR, "sessiond failed to start", error=str(exc))
        return 1
    return 0


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
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override the config's log_level")
    p.add_argument("--log-format", choices=["json", "text"], help="override the config's log_format")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="event loop: uvloop if installed (auto, the default), or plain asyncio")
    p.set_defaults(func=run)

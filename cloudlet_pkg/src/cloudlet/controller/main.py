"""`cloudlet controller`: run the Cloudlet Controller (HTTP API, runtime, sessiond wiring)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from cloudlet.common import sdnotify
from cloudlet.common.logs import error_text, setup_logging
from cloudlet.common.loop import quiet_accept_errors, raise_nofile_limit
from cloudlet.controller import config as config_mod


async def _run(cfg: config_mod.ControllerConfig) -> int:
    from cloudlet.controller.daemon import ControllerDaemon

    daemon = ControllerDaemon(cfg)
    quiet_accept_errors(asyncio.get_running_loop())
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sdnotify.notify("READY=1")
    try:
        await stop.wait()
    finally:
        await daemon.stop()
    return 0


def _cmd(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    try:
        cfg = config_mod.load(args.config)
        if args.check_config:
            from cloudlet.controller.daemon import make_runtime, read_secret, read_token, tls_context

            problems: list[str] = []
            checks: list[Callable[[], object]] = [
                lambda: read_token(cfg.token_file), lambda: read_secret(cfg.secret_file), lambda: make_runtime(cfg),
                lambda: tls_context(cfg)]
            for check in checks:  # every problem at once
                try:
                    check()
                except config_mod.ConfigError as exc:
                    problems += exc.problems
            if problems:
                raise config_mod.ConfigError(args.config, problems)
            print(f"config {args.config} is valid (cloudlet {cfg.cloudlet}, runtime {cfg.runtime})")
            return 0
        raise_nofile_limit()
        return asyncio.run(_run(cfg))
    except config_mod.ConfigError as exc:
        print(error_text(f"cloudlet controller: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:
        print(error_text(f"cloudlet controller: {exc}"), file=sys.stderr)
        return 1


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "controller",
        help="run the Cloudlet Controller (HTTP API that launches services)",
        description=(
            "Run the Cloudlet Controller: an HTTP JSON API that starts services by image name on "
            "podman or Kubernetes, registers their session ports with the local sessiond, issues "
            "session credentials and keeps runtime and sessiond in step (docs/controller.md, docs/api.md)."
        ),
    )
    parser.add_argument("-c", "--config", default="/etc/cloudlet/controller.toml",
                        help="TOML config file (default /etc/cloudlet/controller.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, token, secret and runtime settings, then exit")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    parser.set_defaults(func=_cmd)

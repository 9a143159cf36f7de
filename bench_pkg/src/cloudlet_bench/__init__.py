"""`cloudlet bench ...`: benchmarks measured side by side against a baseline in one run.

Each benchmark module exposes ``register(subparsers)`` adding one ``bench`` subcommand.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__version__ = "0.3.0"  # the release of cloudlet it measures (cloudlet._version.RELEASE; tests/test_cli.py checks)

BENCHMARKS: tuple[str, ...] = (
    "cloudlet_bench.proxy",
    "cloudlet_bench.handover",
    "cloudlet_bench.launch",
    "cloudlet_bench.tunnel",
    "cloudlet_bench.migrate",
    "cloudlet_bench.repair",
    "cloudlet_bench.overload",
    "cloudlet_bench.mobility",
    "cloudlet_bench.restart",
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run a benchmark against its baseline and print the figures",
        description="Benchmarks, each measured side by side with a baseline in the same run.",
    )
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for module_name in BENCHMARKS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)

"""The `cloudlet` command: one console script, one subcommand per component.

Each component module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Modules are imported lazily so that ``cloudlet --help`` stays fast and a missing optional
dependency of one component never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cloudlet import __version__

# (subcommand, module that registers it)
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("sessiond", "cloudlet.sessiond.main"),
    ("controller", "cloudlet.controller.main"),
    ("agent", "cloudlet.client.agent"),
    ("session", "cloudlet.client.cli"),
    ("image", "cloudlet.images"),
    ("bench", "cloudlet.bench"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudlet",
        description="Container cloudlets whose sessions follow their users across handovers.",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cloudlet"):
                continue  # component not part of this build
            raise
        module.register(sub)
        if name not in sub.choices:  # pragma: no cover - programming error
            raise RuntimeError(f"{module_name}.register() did not add {name!r}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

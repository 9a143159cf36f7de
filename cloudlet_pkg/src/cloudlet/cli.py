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
from importlib.metadata import entry_points
from typing import Any

from cloudlet._version import VERSION as __version__

# (subcommand, module that registers it, the extra it needs beyond the device-side install)
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("sessiond", "cloudlet.sessiond.main", "node"),
    ("controller", "cloudlet.controller.main", "node"),
    ("device", "cloudlet.controller.device_cli", "node"),
    ("agent", "cloudlet.client.agent_cli", ""),
    ("session", "cloudlet.client.cli", ""),
    ("image", "cloudlet.images", ""),
    ("status", "cloudlet.status", ""),
)
# other distributions add subcommands here (cloudlet-bench adds `bench`)
ENTRY_POINT_GROUP = "cloudlet.commands"


def _missing(sub: Any, name: str, extra: str, exc: ModuleNotFoundError) -> None:
    """A subcommand whose dependencies are not installed: it says which install brings them."""
    hint = f"pip install 'cloudlet[{extra}]'" if extra else "reinstall cloudlet"
    parser = sub.add_parser(name, help=f"(not installed here: {hint})", add_help=False, prefix_chars="\x01")
    parser.add_argument("rest", nargs="*")

    def fail(args: argparse.Namespace) -> int:
        print(f"cloudlet {name}: needs the Python module {exc.name!r}, which is not installed: {hint}", file=sys.stderr)
        return 2

    parser.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudlet",
        description="Container cloudlets whose sessions follow their users across handovers.",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, extra in COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "cloudlet":
                raise
            _missing(sub, name, extra, exc)
            continue
        module.register(sub)
        if name not in sub.choices:  # pragma: no cover - programming error
            raise RuntimeError(f"{module_name}.register() did not add {name!r}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in sub.choices:
            continue
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            _missing(sub, ep.name, "node", exc)
            continue
        register(sub)
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

"""The one config loader of the daemons: TOML into pydantic models, every error naming its key, all at once.

Each daemon declares its file as models (``cloudlet.sessiond.config``, ``cloudlet.controller.config``,
``cloudlet.tunnel.config``) built on :class:`Section`: unknown keys are errors, a value of the wrong
type is never converted ("5" is not a number, true is not 1), and a failed validation lists every
problem as ``table.key: what is wrong (got ...)``. The same models back ``--check-config``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from cloudlet.common.addresses import parse_hostport
from cloudlet.common.names import check_name

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` holds one line per key at fault."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)


class Section(BaseModel):
    """A TOML table: known keys only, no type conversion, read-only once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _name(value: str) -> str:
    return check_name(value, "name")


def _hostport(value: str) -> str:
    parse_hostport(value, "address")
    return value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # TOML arrays are lists


Name = Annotated[str, AfterValidator(_name)]
HostPort = Annotated[str, AfterValidator(_hostport)]
TomlTuple = BeforeValidator(_tuple)


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read config: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


Loc = tuple[str | int, ...]


def describe(error: ErrorDetails, locate: Callable[[Loc], Loc] | None = None) -> str:
    """One validation error as ``key.path: message (got value)``."""
    parts = locate(error["loc"]) if locate is not None else error["loc"]
    loc = ".".join(str(p) for p in parts if p != "[key]")  # a bad dict key: the path ends at the key itself
    kind = error["type"]
    if kind == "union_tag_invalid":  # a discriminated table (peers): its kind key is wrong
        ctx = error.get("ctx") or {}
        return f"{loc}.transport: must be one of {ctx.get('expected_tags', '?')} (got {ctx.get('tag')!r})"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    got = error.get("input")
    shown = repr(got)
    if isinstance(got, (dict, list)) or len(shown) > 60:
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {shown})"


def validate(model: type[M], data: Any, source: str, locate: Callable[[Loc], Loc] | None = None) -> M:
    """``model`` from ``data``, or :class:`ConfigError` with every problem.

    ``locate(loc)`` gives the key path to show for an error at pydantic's ``loc`` (default: ``loc``
    itself), for models whose fields come from several tables.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [describe(err, locate) for err in exc.errors()]) from None


def check_tables(data: dict[str, Any], allowed: Sequence[str], source: str) -> list[str]:
    """Problems with the top level: unknown tables, a known one that is not a table."""
    problems = [f"[{k}]: unknown table" for k in data if k not in allowed]
    problems += [f"[{k}]: must be a table" for k in allowed if k in data and not isinstance(data[k], dict)]
    return problems

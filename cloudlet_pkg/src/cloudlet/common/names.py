"""The one rule for names of cloudlets, services and peers, used everywhere a name comes in.

A name is 1 to 32 characters of ``[a-z0-9-]``, starting with a letter or digit. It becomes part of
container names, Kubernetes object names, URL path segments, credentials and label values, so the
rule is strict on purpose: no ``/``, ``.``, ``%``, spaces, control characters or non-ASCII letters.
``fullmatch`` (not ``match`` with ``$``, which also accepts a trailing newline).
"""

from __future__ import annotations

import re
from typing import TypeGuard

NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,31}"
NAME_RULE = "1-32 characters of a-z, 0-9 and '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)


class InvalidName(ValueError):
    """A name that breaks the rule; the message names what it was for and shows the rule."""


def is_name(value: object) -> TypeGuard[str]:
    """True if ``value`` is a string that follows the name rule."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str = "service name") -> str:
    """Return ``value`` if it is a valid name, else raise :class:`InvalidName`."""
    if not is_name(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InvalidName(f"invalid {what} {shown}: use {NAME_RULE}")
    return value

"""Structured logging: one JSON object per line on stderr (or plain text for humans).

Every daemon calls :func:`setup_logging` once; modules log with ``logging.getLogger(__name__)``
and pass structured fields through ``extra={"fields": {...}}`` (see :func:`event`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            line = f"{line} {extra}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger once for a daemon or command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` (kept as keys in JSON output)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


class Throttle:
    """At most one log line per ``key`` per ``interval`` seconds; the ones held back are counted.

    The first event of a key is logged at once; later ones within the interval only count, and the
    next line logged for that key carries ``suppressed=N`` (how many were not logged since). Floods
    of refusals therefore cost one line per interval, not one per connection.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Any = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def event(self, level: int, msg: str, key: str, **fields: Any) -> bool:
        """Log (True) or count (False) one occurrence."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            fields["suppressed"] = held
        event(self.logger, level, msg, **fields)
        return True

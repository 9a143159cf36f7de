"""Structured logging: one JSON object per line on stderr (or plain text for humans).

Every daemon calls :func:`setup_logging` once; modules log with ``logging.getLogger(__name__)``
and pass structured fields through ``extra={"fields": {...}}`` (see :func:`event`).

Under systemd, stderr is a journal stream (``$JOURNAL_STREAM`` names it): every line then starts
with its syslog priority, ``<3>`` for an error, ``<4>`` a warning, ``<6>`` info, ``<7>`` debug,
which journald takes as the entry's priority and strips (``SyslogLevelPrefix=``, on by default), so
``journalctl -p warning`` shows exactly the warnings and errors. Commands print their own errors
through :func:`error_text` for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

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


PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    stream = sys.stderr if stream is None else stream
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalPrefix(logging.Formatter):
    """Another formatter's text with the record's syslog priority in front, once per line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def error_text(text: str, priority: int = 3) -> str:
    """A command's error line for stderr: with its journal priority when stderr is the journal."""
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n")) if to_journal() else text


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger once for a daemon or command."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(JournalPrefix(formatter) if to_journal() else formatter)
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

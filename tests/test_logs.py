"""Log lines carry their syslog priority when stderr is systemd's journal stream (journalctl -p works)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudlet.common.logs import JournalPrefix, JsonFormatter, error_text, to_journal

SCRIPT = """
import logging
from cloudlet.common.logs import event, setup_logging
setup_logging("debug", "{fmt}")
log = logging.getLogger("t")
event(log, logging.DEBUG, "a debug line")
event(log, logging.INFO, "an info line")
event(log, logging.WARNING, "a warning", key="value")
event(log, logging.ERROR, "an error")
"""


def _run(tmp_path: Path, fmt: str, journal: bool) -> list[str]:
    err = tmp_path / f"stderr-{fmt}-{journal}"
    with open(err, "wb") as fh:
        st = os.fstat(fh.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "1:2"}
        subprocess.run([sys.executable, "-c", SCRIPT.format(fmt=fmt)], stderr=fh, env=env, check=True, timeout=30)
    return err.read_text().splitlines()


def test_every_line_starts_with_its_priority_on_the_journal_stream(tmp_path: Path) -> None:
    for fmt in ("json", "text"):
        lines = _run(tmp_path, fmt, journal=True)
        assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"], lines
        assert "a warning" in lines[2] and "value" in lines[2]


def test_no_prefix_elsewhere(tmp_path: Path) -> None:
    lines = _run(tmp_path, "json", journal=False)  # $JOURNAL_STREAM names another stream: not ours
    assert len(lines) == 4 and all(line.startswith("{") for line in lines)


def test_a_multi_line_record_keeps_its_priority_on_every_line() -> None:
    record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": "one\ntwo", "name": "t"})
    text = JournalPrefix(logging.Formatter("%(message)s")).format(record)
    assert text == "<3>one\n<3>two"
    assert JournalPrefix(JsonFormatter()).format(record).startswith("<3>{")


def test_error_text_without_a_journal_is_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not to_journal()
    assert error_text("cloudlet sessiond: bad config x") == "cloudlet sessiond: bad config x"

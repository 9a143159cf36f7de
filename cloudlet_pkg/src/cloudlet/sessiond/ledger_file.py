"""The session ledger's journal on disk: ``state_dir/sessions.log``, one line per change, appended.

A restart replays it (``load``) and rewrites it compactly; it is rewritten again whenever it has
grown to three times the ledger. Lines are written through the page cache (no fsync per session):
a killed sessiond loses nothing, a host that loses power may lose the last lines, which can let a
credential whose session ended in the last seconds start once more after the reboot (docs/sessiond.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

from cloudlet.common.logs import event
from cloudlet.relay.ledger import SessionLedger

log = logging.getLogger(__name__)


class FileJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger: SessionLedger | None = None
        self._fh: IO[str] | None = None
        self._lines = 0

    def open(self, ledger: SessionLedger) -> None:
        """Replay the file into ``ledger``, rewrite it compactly, and journal ``ledger``'s changes."""
        self.ledger = ledger
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            try:
                with open(self.path, encoding="ascii", errors="replace") as fh:
                    bad = ledger.load(fh)
            except OSError as exc:
                event(log, logging.ERROR, "cannot read the session ledger; ended sessions before this start are "
                      "not known", path=str(self.path), error=str(exc))
            else:
                if bad:
                    event(log, logging.WARNING, "session ledger lines ignored", path=str(self.path), lines=bad)
        self._compact()
        ledger.journal = self

    def append(self, line: str) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(line + "\n")
            self._fh.flush()
        except OSError as exc:
            event(log, logging.ERROR, "cannot write the session ledger", path=str(self.path), error=str(exc))
            return
        self._lines += 1
        if self.ledger is not None and self._lines > 3 * len(self.ledger) + 1000:
            self._compact()

    def _compact(self) -> None:
        assert self.ledger is not None
        if self._fh is not None:
            self._fh.close()
        tmp = self.path.with_suffix(".log.tmp")
        lines = list(self.ledger.dump())
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)
        self._lines = len(lines)
        self._fh = open(self.path, "a", encoding="ascii")  # kept open: one line per session start and end

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

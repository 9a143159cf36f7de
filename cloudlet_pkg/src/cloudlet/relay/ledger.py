"""The anchor's record of every session it started, and whether it ended, until its credential expires.

Only a credential's anchor starts its session (``cloudlet.relay.connection`` refuses elsewhere with
``WRONG_ANCHOR``), so this record alone decides whether a credential may start one: never twice.
A credential whose session ended is refused ``SESSION_ENDED``; one whose session started before a
restart and was not carried over is refused ``SESSION_LOST`` (so a client never silently gets a
fresh backend while it believes it resumed). Entries go when the credential expires
(``issued + lifetime``): a new session needs an unexpired credential anyway.

Memory is bounded by ``limit`` entries. When it is full the oldest entry is forgotten and
``forgotten_before`` remembers the newest ``issued`` forgotten so far: a credential issued at or
before it may not start a session any more (``too_old``), so no ended credential can come back.

A journal (``cloudlet.sessiond.ledger_file``) makes the record survive restarts: every change is
one line appended, ``load`` reads them back.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

STARTED, ENDED = "S", "E"


class Journal(Protocol):
    def append(self, line: str) -> None: ...


class SessionLedger:
    def __init__(self, limit: int, lifetime: float, journal: Journal | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if limit < 1:
            raise ValueError("the ledger needs room for at least one entry")
        self.limit = limit
        self.lifetime = lifetime
        self.journal = journal
        self.clock = clock
        self.forgotten_before = 0
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()  # nonce -> (state, issued)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, nonce: str) -> str | None:
        """``STARTED``, ``ENDED``, or None for a credential this anchor never started a session for."""
        item = self._items.get(nonce)
        if item is None:
            return None
        if item[1] + self.lifetime < self.clock():
            return None  # expired: refused EXPIRED before this is asked
        return item[0]

    def too_old(self, issued: int) -> bool:
        return issued <= self.forgotten_before

    def started(self, nonce: str, issued: int) -> None:
        self._put(nonce, STARTED, issued)

    def ended(self, nonce: str, issued: int) -> None:
        self._put(nonce, ENDED, issued)

    def _put(self, nonce: str, state: str, issued: int, journal: bool = True) -> None:
        items = self._items
        items[nonce] = (state, issued)
        items.move_to_end(nonce)
        if journal and self.journal is not None:
            self.journal.append(f"{state} {nonce} {issued}")
        self._trim()

    def _trim(self) -> None:
        items = self._items
        now = self.clock()
        while items:
            nonce, (_, issued) = next(iter(items.items()))
            if len(items) > self.limit:
                self.forgotten_before = max(self.forgotten_before, issued)
            elif issued + self.lifetime >= now:
                break
            items.popitem(last=False)

    # -- the journal ---------------------------------------------------------------------------
    def load(self, lines: Iterable[str]) -> int:
        """Replay journal lines (``S|E <nonce> <issued>``, ``F <issued>``); returns how many were bad."""
        bad = 0
        for line in lines:
            parts = line.split()
            try:
                if len(parts) == 3 and parts[0] in (STARTED, ENDED):
                    state, nonce, issued = parts[0], parts[1], int(parts[2])
                    if self._items.get(nonce, ("", 0))[0] != ENDED:  # an end is final
                        self._put(nonce, state, issued, journal=False)
                elif len(parts) == 2 and parts[0] == "F":
                    self.forgotten_before = max(self.forgotten_before, int(parts[1]))
                elif parts:
                    bad += 1
            except ValueError:
                bad += 1
        self._trim()
        return bad

    def dump(self) -> Iterator[str]:
        """The whole record as journal lines (for compaction)."""
        if self.forgotten_before:
            yield f"F {self.forgotten_before}"
        for nonce, (state, issued) in self._items.items():
            yield f"{state} {nonce} {issued}"

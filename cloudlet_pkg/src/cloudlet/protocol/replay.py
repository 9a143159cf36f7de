"""A bounded replay buffer: the last bytes of a stream, addressed by absolute stream offset.

Both ends of a resumable session (protocol mode 2) keep one for the direction they send: the anchor
for the backend's bytes it wrote to client connections, the client for the bytes it sent. On a
move without FIN each side tells the other how much it has, and the other resends the difference
from here (the scheme of Zandy and Miller's "reliable sockets", with the buffer sized by a limit).
"""

from __future__ import annotations

from collections import deque

COALESCE = 64 * 1024  # small writes are gathered into chunks of this size (bounded per-chunk overhead)


class ReplayRing:
    """Holds at least the last ``limit`` bytes appended (at most ``limit`` + one chunk)."""

    __slots__ = ("limit", "end", "size", "_chunks", "_tail")

    def __init__(self, limit: int, end: int = 0) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.end = end  # stream offset just after the last byte appended
        self.size = 0  # bytes held
        self._chunks: deque[bytes] = deque()
        self._tail = bytearray()

    @property
    def start(self) -> int:
        """Stream offset of the oldest byte held."""
        return self.end - self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.end += n
        self.size += n
        if n >= COALESCE and not self._tail:
            self._chunks.append(bytes(data))
        else:
            self._tail += data
            if len(self._tail) >= COALESCE:
                self._chunks.append(bytes(self._tail))
                self._tail = bytearray()
        chunks = self._chunks
        while chunks and self.size - len(chunks[0]) >= self.limit:
            self.size -= len(chunks.popleft())

    def since(self, offset: int) -> bytes | None:
        """The bytes from stream ``offset`` to the end, or None if they are no longer (or never) held."""
        if offset < self.start or offset > self.end:
            return None
        want = self.end - offset
        if want == 0:
            return b""
        parts: list[bytes] = [bytes(self._tail)] if self._tail else []
        got = len(self._tail)
        for chunk in reversed(self._chunks):
            if got >= want:
                break
            parts.append(chunk)
            got += len(chunk)
        parts.reverse()
        data = b"".join(parts)
        return data[len(data) - want :]


__all__ = ["ReplayRing"]

"""The control API's error, raised by the daemon's operations (kept apart from the aiohttp app, so the
daemon can start relaying before it imports the HTTP stack)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

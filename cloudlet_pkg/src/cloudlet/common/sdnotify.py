"""systemd's readiness protocol (``sd_notify``): a datagram to ``$NOTIFY_SOCKET``, nothing without it."""

from __future__ import annotations

import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (for example ``READY=1``) to systemd; False if not run by systemd or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("\0" + path[1:] if path.startswith("@") else path)
        s.send(message.encode())
        return True
    return False

"""Live sessions passed to the next sessiond process through systemd's file descriptor store.

On a clean stop (SIGTERM: ``systemctl restart``, an upgrade) with ``$NOTIFY_SOCKET`` set, sessiond
hands over instead of ending its sessions:

1. it stops reading every service port and every session (client and backend side), and waits
   until what it already wrote to each backend has left (``handoff_flush_seconds``): the anchor's
   ``bytes_up`` is then exactly what the backend got;
2. each resumable (mode 2) session's client connection is reset (RST: "the path broke", never FIN,
   which would say "the session is over") and the session becomes detached, as if its client had
   lost the link: its state (the pure core: offsets, held bytes, replay ring) goes into one
   ``memfd``, and its backend socket, the service listeners and the peer listener go to the store
   (``FDSTORE=1`` with ``FDNAME=``; the unit has ``FileDescriptorStoreMax=``);
3. the new process finds them (``$LISTEN_FDS``, ``$LISTEN_FDNAMES``), listens on the same sockets
   (connections that arrived meanwhile wait in their backlog), takes every session back as detached
   with its backend connection, and removes them from the store (``FDSTOREREMOVE=1``).

Clients then resume as after any broken path (`cloudlet agent` does it by itself): the anchor
replays what they did not receive, they resend what it did not get; nothing is lost or repeated and
the backend never sees a reconnect. Sessions that cannot be handed over (mode 0, a backend that
would not flush, a make-before-break move in progress) end as before. After ``kill -9`` nothing was
handed over: their credentials are refused ``SESSION_LOST`` (the ledger remembers them).
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudlet.common.logs import event
from cloudlet.relay import core as c

if TYPE_CHECKING:
    from cloudlet.relay.manager import SessionManager

log = logging.getLogger(__name__)
STATE = "cloudlet-state"
BACKEND = "backend-"
LISTENER = "listen-"  # listen-peer, listen-<service>
FORMAT = 1


def _notify_socket() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def available() -> bool:
    """A file descriptor store is there to hand over to (run by systemd, or a supervisor like it)."""
    return _notify_socket() is not None


def _store(name: str, fd: int) -> None:
    path = _notify_socket()
    assert path is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # (socket.send_fds ignores its address)
        s.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())], 0, path)


def _remove(name: str) -> None:
    path = _notify_socket()
    if path is None:
        return
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), path)


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _decode(v) for k, v in value.items()}
    return value


@dataclass
class Inherited:
    """The descriptors the store gave this process at start, by name."""

    fds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> Inherited:
        count = os.environ.get("LISTEN_FDS")
        pid = os.environ.get("LISTEN_PID")
        if not count or (pid and pid != str(os.getpid())):
            return cls()
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        fds = {}
        for i in range(int(count)):
            name = names[i] if i < len(names) and names[i] else f"unknown-{i}"
            fds[name] = 3 + i
            os.set_inheritable(3 + i, False)
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        return cls(fds)

    def take(self, name: str) -> socket.socket | None:
        fd = self.fds.pop(name, None)
        if fd is None:
            return None
        _remove(name)
        return socket.socket(fileno=fd)

    def state(self) -> dict[str, Any] | None:
        fd = self.fds.pop(STATE, None)
        if fd is None:
            return None
        _remove(STATE)
        try:
            with os.fdopen(fd, "rb") as fh:
                fh.seek(0)
                data = json.loads(fh.read())
        except (OSError, ValueError) as exc:
            event(log, logging.ERROR, "handed-over state unreadable: sessions are lost", error=str(exc))
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            event(log, logging.ERROR, "handed-over state of an unknown format: sessions are lost")
            return None
        return data

    def close_rest(self) -> None:
        for name in list(self.fds):
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(name))
            _remove(name)


class _Released:
    """What a handed-over session's old backend protocol reports to: nothing, it is not ours now."""

    def backend_data(self, data: bytes) -> None:
        return None

    def backend_gone(self) -> None:
        return None

    def backend_pressure(self, paused: bool) -> None:
        return None


def store_listener(name: str, server: Any) -> None:
    sockets = getattr(server, "sockets", None)
    if sockets:
        _store(LISTENER + name, sockets[0].fileno())


async def hand_over(manager: SessionManager, flush_seconds: float) -> int:
    """Push every session that can go on to the store; returns how many. The rest is left as it was."""
    started = time.monotonic()
    candidates: list[tuple[Any, Any]] = []  # (session, its backend transport)
    for s in list(manager.sessions.values()):
        up = s.upstream.transport if s.upstream is not None else None
        if (not s.core.resumable or s.core.state not in (c.ATTACHED, c.DETACHED) or up is None
                or up.is_closing() or s.core.backend_eof or s.draining is not None or s.joining is not None):
            continue
        up.pause_reading()
        if s.attached is not None:
            with contextlib.suppress(AttributeError, RuntimeError):
                s.attached.transport.pause_reading()  # type: ignore[attr-defined]
        candidates.append((s, up))
    deadline = time.monotonic() + flush_seconds
    while time.monotonic() < deadline and any(up.get_write_buffer_size() for _, up in candidates):  # noqa: ASYNC110
        await asyncio.sleep(0.002)  # (no event tells when a transport's buffer is empty)
    states = []
    for s, up in candidates:
        if up.get_write_buffer_size():
            continue  # would lose bytes it counted as delivered: this one ends normally
        if s.attached is not None:
            conn = s.attached
            conn.abort()  # RST: the path broke; the client resumes at the next process
            s.client_lost(conn)
        if s.core.state != c.DETACHED:
            continue
        sock = up.get_extra_info("socket")
        _store(BACKEND + s.id, sock.fileno())
        states.append({"core": _encode(s.core.to_state()), "service": s.service.name, "device": s.device,
                       "since": s.since})
        s._cancel_timer(c.GRACE)
        manager.handed_over(s)
        s.upstream.session = _Released()
        up.abort()  # our descriptor only: the store's copy keeps the connection open
    fd = os.memfd_create(STATE)
    try:
        os.write(fd, json.dumps({"format": FORMAT, "cloudlet": manager.cloudlet, "saved": time.time(),
                                 "sessions": states}).encode())
        _store(STATE, fd)
    finally:
        os.close(fd)
    event(log, logging.INFO, "sessions handed over to the next process", sessions=len(states),
          not_handed_over=len(manager.sessions), ms=round((time.monotonic() - started) * 1000, 1))
    return len(states)


async def take_back(manager: SessionManager, inherited: Inherited) -> int:
    """Take back the sessions a previous process handed over; returns how many."""
    from cloudlet.relay.session import Session, UpstreamProtocol

    data = inherited.state()
    if data is None:
        return 0
    loop = asyncio.get_running_loop()
    taken = 0
    for item in data.get("sessions", []):
        core = c.SessionCore.from_state(_decode(item["core"]))
        sock = inherited.take(BACKEND + core.id)
        service = manager.services.get(str(item["service"]))
        if sock is None or service is None:
            if sock is not None:
                sock.close()
            event(log, logging.WARNING, "handed-over session dropped", session=core.id,
                  why="its service is gone" if sock is not None else "no backend connection")
            continue
        core.grace_seconds = manager.grace_seconds
        s = Session(core, service, manager, device=str(item.get("device", "")))
        s.since = float(item.get("since", time.time()))
        protocol = UpstreamProtocol(s)
        await loop.connect_accepted_socket(lambda p=protocol: p, sock=sock)  # type: ignore[misc]
        s.upstream = protocol
        manager.taken_back(s)
        s._run([c.StartTimer(c.GRACE, core.grace_seconds)])
        taken += 1
    event(log, logging.INFO, "sessions taken back from the previous process", sessions=taken,
          handed_over=len(data.get("sessions", [])))
    return taken

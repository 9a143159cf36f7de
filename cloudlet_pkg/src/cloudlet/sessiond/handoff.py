"""Live sessions passed to the next sessiond process through systemd's file descriptor store.

On a clean stop (SIGTERM: ``systemctl restart``, an upgrade) with ``$NOTIFY_SOCKET`` set, sessiond
hands over instead of ending its sessions:

1. it stops reading every session (client and backend side), and waits until what it already wrote
   to each backend and each attached client has left (``handoff_flush_seconds``): the byte counts
   of the session are then exactly what the other ends got;
2. each session's backend socket and its attached client socket (a device's, or a forwarder's
   channel on the peer endpoint) go to the store (``FDSTORE=1`` with ``FDNAME=``; the unit has
   ``FileDescriptorStoreMax=``), its state (the pure core: offsets, held bytes, replay ring) into one
   ``memfd``; a client whose bytes would not leave in time is reset instead (RST: "the path broke",
   never FIN) and, in mode 2, resumes at the next process;
3. the new process finds them (``$LISTEN_FDS``, ``$LISTEN_FDNAMES``), listens on the same sockets
   (connections that arrived meanwhile wait in their backlog; it accepts only once the sessions are
   back), takes every session back on the same connections, and removes them from the store
   (``FDSTOREREMOVE=1``).

Nothing is lost or repeated, no connection is closed: the device and the backend only see a pause
as long as the restart. Sessions that cannot be handed over (a splice in progress, a backend that
would not take its bytes in time, a make-before-break move at that instant) end as before. After
``kill -9`` nothing was handed over: their credentials are refused ``SESSION_LOST`` (the ledger
remembers them).
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
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudlet.common.logs import event
from cloudlet.relay import core as c

if TYPE_CHECKING:
    from cloudlet.relay.manager import SessionManager

log = logging.getLogger(__name__)
STATE = "cloudlet-state"
BACKEND = "backend-"
CLIENT = "client-"
LISTENER = "listen-"  # listen-peer, listen-<service>
FORMAT = 1
PREDECESSOR_ENV = "CLOUDLET_HANDOFF_FD"  # set for a successor started by an in-place upgrade
Sink = Callable[[str, int], None]  # (name, descriptor): where a hand-over puts what goes on


def _notify_socket() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def available() -> bool:
    """A file descriptor store is there to hand over to (run by systemd, or a supervisor like it)."""
    return _notify_socket() is not None


def store_fd(name: str, fd: int) -> None:
    """Put ``fd`` in the service manager's fd store as ``name`` (the default :data:`Sink`)."""
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
    from_store: bool = True  # False: a predecessor passed them directly (nothing to remove from a store)

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
        self._forget(name)
        return socket.socket(fileno=fd)

    def _forget(self, name: str) -> None:
        if self.from_store:
            _remove(name)

    def state(self) -> dict[str, Any] | None:
        fd = self.fds.pop(STATE, None)
        if fd is None:
            return None
        self._forget(STATE)
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
            self._forget(name)


_HELD: dict[type[asyncio.Protocol], type] = {}


def _held(cls: type[asyncio.Protocol]) -> Any:
    """``cls`` whose events wait (in order) until :func:`_release`: a handed-over session gets its
    first bytes only once both of its connections are back (a transport may read at once)."""
    if cls not in _HELD:
        def connection_made(self: Any, transport: Any) -> None:
            self.queued = []
            getattr(cls, "connection_made")(self, transport)  # noqa: B009 (mypy: cls is a type)

        def data_received(self: Any, data: bytes) -> None:
            if self.queued is not None:
                self.queued.append(("data", data))
            else:
                getattr(cls, "data_received")(self, data)  # noqa: B009 (mypy: cls is a type)

        def eof_received(self: Any) -> bool | None:
            if self.queued is not None:
                self.queued.append(("eof", None))
                return True
            return getattr(cls, "eof_received")(self)  # type: ignore[no-any-return]  # noqa: B009 (mypy: cls is a type)

        def connection_lost(self: Any, exc: Exception | None) -> None:
            if self.queued is not None:
                self.queued.append(("lost", exc))
            else:
                getattr(cls, "connection_lost")(self, exc)  # noqa: B009 (mypy: cls is a type)

        _HELD[cls] = type(f"Handed{cls.__name__}", (cls,), {
            "connection_made": connection_made, "data_received": data_received,
            "eof_received": eof_received, "connection_lost": connection_lost})
    return _HELD[cls]


def _release(protocol: Any) -> None:
    queued, protocol.queued = getattr(protocol, "queued", None), None
    for kind, arg in queued or []:
        if kind == "data":
            protocol.data_received(arg)
        elif kind == "eof":
            if not protocol.eof_received() and protocol.transport is not None:
                protocol.transport.close()
        else:
            protocol.connection_lost(arg)


class _Released:
    """What a handed-over session's old backend protocol reports to: nothing, it is not ours now."""

    def backend_data(self, data: bytes) -> None:
        return None

    def backend_gone(self) -> None:
        return None

    def backend_pressure(self, paused: bool) -> None:
        return None


def store_listener(name: str, server: Any, sink: Sink = store_fd) -> None:
    sockets = getattr(server, "sockets", None)
    if sockets:
        sink(LISTENER + name, sockets[0].fileno())


async def hand_over(manager: SessionManager, flush_seconds: float, sink: Sink = store_fd) -> int:
    """Push every session that can go on to the store; returns how many. The rest is left as it was."""
    started = time.monotonic()
    candidates: list[tuple[Any, Any]] = []  # (session, its backend transport)
    for s in list(manager.sessions.values()):
        up = s.upstream.transport if s.upstream is not None else None
        if (s.core.state not in (c.ATTACHED, c.DETACHED) or up is None or up.is_closing() or s.core.backend_eof
                or s.draining is not None or s.joining is not None or s.splice is not None):
            continue
        up.pause_reading()
        if s.attached is not None:
            with contextlib.suppress(AttributeError, RuntimeError):
                s.attached.transport.pause_reading()  # type: ignore[attr-defined]
        candidates.append((s, up))
    deadline = time.monotonic() + flush_seconds
    def unflushed(s: Any, up: Any) -> bool:
        return bool(up.get_write_buffer_size() or (s.attached is not None and s.attached.write_buffer_size()))

    while time.monotonic() < deadline and any(unflushed(s, up) for s, up in candidates):  # noqa: ASYNC110
        await asyncio.sleep(0.002)  # (no event tells when a transport's buffer is empty)
    states = []
    for s, up in candidates:
        if up.get_write_buffer_size():
            continue  # would lose bytes it counted as delivered: this one ends normally
        conn = s.attached
        client_sock = conn.socket() if conn is not None and not conn.is_closing() else None
        keep_client = conn is not None and client_sock is not None and not conn.write_buffer_size()
        event(log, logging.DEBUG, "hand-over of a session", session=s.id, attached=conn is not None,
              client_socket=client_sock is not None, keep_client=keep_client)
        if conn is not None and not keep_client:
            if not s.core.resumable:
                continue  # mode 0 cannot resume at an offset: it ends normally
            conn.abort()  # RST: the path broke; the client resumes at the next process
            s.client_lost(conn)
        via_peer = False
        if keep_client:
            assert conn is not None and client_sock is not None
            sink(CLIENT + s.id, client_sock.fileno())  # the same connection goes on in the next process
            via_peer = getattr(conn, "service", None) is None
            conn.bind(None)
            conn.abort()  # our descriptor only (the store holds the connection open): no RST
        elif s.core.state != c.DETACHED:
            continue
        sock = up.get_extra_info("socket")
        sink(BACKEND + s.id, sock.fileno())
        states.append({"core": _encode(s.core.to_state()), "service": s.service.name, "device": s.device,
                       "since": s.since, "client": keep_client, "via_peer": via_peer})
        s._cancel_timer(c.GRACE)
        manager.handed_over(s)
        s.upstream.session = _Released()
        up.abort()  # our descriptor only: the store's copy keeps the connection open
    fd = os.memfd_create(STATE)
    try:
        os.write(fd, json.dumps({"format": FORMAT, "cloudlet": manager.cloudlet, "saved": time.time(),
                                 "sessions": states}).encode())
        sink(STATE, fd)
    finally:
        os.close(fd)
    event(log, logging.INFO, "sessions handed over to the next process", sessions=len(states),
          to="successor" if sink is not store_fd else "fd store",
          not_handed_over=len(manager.sessions), ms=round((time.monotonic() - started) * 1000, 1))
    return len(states)


async def take_back(manager: SessionManager, inherited: Inherited) -> int:
    """Take back the sessions a previous process handed over; returns how many."""
    from cloudlet.relay.connection import ServerConnection
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
        client_sock = inherited.take(CLIENT + core.id) if item.get("client") else None
        s = Session(core, service, manager, device=str(item.get("device", "")))
        s.since = float(item.get("since", time.time()))
        protocol = _held(UpstreamProtocol)(s)  # its events wait until the client side is back too
        await loop.connect_accepted_socket(lambda p=protocol: p, sock=sock)  # type: ignore[misc]
        s.upstream = protocol
        if client_sock is not None:  # attached as before, on the same connection, bound before it can read
            conn = _held(ServerConnection)(manager, None if item.get("via_peer") else service)
            conn.parser = None  # past its header long ago
            core.client = conn.aid
            core.state = c.ATTACHED
            core.client_write_paused = False
            conn.bind(s)
            s.attached = conn
            manager.taken_back(s)
            await loop.connect_accepted_socket(lambda p=conn: p, sock=client_sock)  # type: ignore[misc]
            conn.adopt()  # (refused by admission: its loss detaches the session, as any loss does)
        else:
            if core.state == c.ATTACHED:  # its connection did not come through: detached
                core.client, core.state = None, c.DETACHED
            manager.taken_back(s)
            s._run([c.StartTimer(c.GRACE, core.grace_seconds)])
        _release(protocol)
        if client_sock is not None:
            _release(conn)
        taken += 1
    event(log, logging.INFO, "sessions taken back from the previous process", sessions=taken,
          handed_over=len(data.get("sessions", [])))
    return taken


# -- in-place upgrade: a successor started while this process serves, descriptors over SCM_RIGHTS --
_TAKE, _DONE, _STARTED = b"take", b"done", b"started"


class Successor:
    """The next process of an in-place upgrade, seen from the running one (``POST /v1/upgrade``).

    It is started at once and imports and reads its config while this process goes on serving; only
    when it says ``take`` does this one stop and pass everything (:meth:`send`, the same names as
    the fd store); it answers ``started`` once it serves. The stall is the hand-over itself, not a
    process start (docs/sessiond.md, Restart).
    """

    def __init__(self, argv: list[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        env = {**os.environ, PREDECESSOR_ENV: str(theirs.fileno())}
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(key, None)
        try:
            self.proc = subprocess.Popen(argv, env=env, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.sent = 0

    async def _recv(self, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(self.sock, 64)
        except (TimeoutError, OSError):
            return b""

    async def wait_ready(self, timeout: float) -> bool:
        """Until the successor asks to take over (False: it died, or did not ask in time)."""
        return await self._recv(timeout) == _TAKE

    def send(self, name: str, fd: int) -> None:
        self.sock.setblocking(True)
        socket.send_fds(self.sock, [name.encode()], [fd])
        self.sent += 1

    def done(self) -> None:
        self.sock.setblocking(True)
        self.sock.send(_DONE)

    async def wait_started(self, timeout: float) -> bool:
        return await self._recv(timeout) == _STARTED

    def abandon(self) -> None:
        """The upgrade did not happen: the successor goes, this process keeps serving."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # reaped, no zombie
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Predecessor:
    """The running process this one takes over from in an in-place upgrade (``$CLOUDLET_HANDOFF_FD``)."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        # the running process first closes its HTTP servers and flushes every session: allow for it
        self.sock.settimeout(180.0)

    @classmethod
    def from_environment(cls) -> Predecessor | None:
        fd = os.environ.pop(PREDECESSOR_ENV, "")
        return cls(int(fd)) if fd.isdigit() else None

    def take(self) -> Inherited:
        """Ask for everything; returns it once the predecessor has stopped (``done``)."""
        self.sock.sendall(_TAKE)
        fds: dict[str, int] = {}
        while True:
            data, got, _, _ = socket.recv_fds(self.sock, 4096, 1)
            if not got and data == _DONE:
                return Inherited(fds, from_store=False)
            if not got:
                for fd in fds.values():
                    os.close(fd)
                raise OSError("the predecessor stopped before handing everything over")
            fds[data.decode()] = got[0]

    def started(self) -> None:
        """Tell the predecessor this process serves; wait until it has passed the unit to us and exited."""
        with contextlib.suppress(OSError):
            self.sock.sendall(_STARTED)
            self.sock.settimeout(10.0)
            self.sock.recv(1)  # its end closes once it told the service manager our PID
        self.sock.close()

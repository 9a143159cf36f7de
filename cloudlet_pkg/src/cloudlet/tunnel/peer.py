"""One warm SSH connection to a peer cloudlet: connect, keep alive, reconnect with backoff, open channels."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from cloudlet.common.logs import event
from cloudlet.tunnel import _fastpath
from cloudlet.tunnel._fastpath import _DirectData
from cloudlet.tunnel.channel import READER_LIMIT, _ChannelSession
from cloudlet.tunnel.config import SshPeerConfig
from cloudlet.tunnel.errors import PeerUnavailable

log = logging.getLogger(__name__)


STATES = ("up", "down", "connecting")


@dataclass(eq=False)
class PeerTunnel:
    """The long-lived SSH connection to one peer and its state."""

    config: SshPeerConfig
    state: str = "down"
    channels: int = 0
    channels_opened: int = 0
    open_failures: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    rtt_ms: float | None = None
    last_error: str | None = None
    cipher: str | None = None
    fast_path: bool = False
    fast_path_reason: str = ""
    up_since: float | None = None
    _conn: Any = None
    _direct: _DirectData | None = None
    _task: asyncio.Task[None] | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _retry: asyncio.Event = field(default_factory=asyncio.Event)
    _ever_up: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.config.endpoint_host, self.config.endpoint_port

    @property
    def direct(self) -> _DirectData | None:
        """The fast path of the current connection, if installed (channels use it to send)."""
        return self._direct

    def channel_opened(self) -> None:
        self.channels += 1
        self.channels_opened += 1

    def channel_closed(self) -> None:
        self.channels -= 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tunnel-{self.name}")

    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        cfg = self.config
        return asyncssh.SSHClientConnectionOptions(
            config=None,
            port=cfg.port,
            username=cfg.user,
            client_keys=[cfg.client_key],
            known_hosts=cfg.known_hosts,
            agent_path=None,
            password=None,
            kbdint_auth=False,
            password_auth=False,
            gss_auth=False,
            host_based_auth=False,
            encryption_algs=list(cfg.ciphers),
            compression_algs=["none"],
            connect_timeout=cfg.connect_timeout,
            login_timeout=cfg.connect_timeout,
            keepalive_interval=cfg.keepalive_interval,
            keepalive_count_max=cfg.keepalive_count_max,
            x509_trusted_certs=None,
            rekey_bytes=cfg.rekey_bytes,
            rekey_seconds=cfg.rekey_seconds,
        )

    async def _run(self) -> None:
        cfg = self.config
        delay = cfg.backoff_initial
        while not self._closing.is_set():
            self._retry.clear()  # a retry_now() from here on (even while connecting) shortens the next wait
            self.state = "connecting"
            try:
                options = self._options()
                async with asyncssh.connect(cfg.host, options=options) as conn:
                    await self._serve(conn)
                delay = cfg.backoff_initial
            except asyncio.CancelledError:
                raise
            except asyncssh.HostKeyNotVerifiable as exc:
                self._failed(f"host key not verified against {cfg.known_hosts} (unknown or changed): {exc}",
                             logging.ERROR, "tunnel refused: peer host key unknown or changed")
            except asyncssh.PermissionDenied as exc:
                self._failed(f"authentication refused for user {cfg.user!r}: {exc}", logging.ERROR,
                             "tunnel refused: peer did not accept the client key")
            except (asyncio.TimeoutError, TimeoutError):
                self._failed(f"no SSH handshake within {cfg.connect_timeout:g} s", logging.WARNING,
                             "tunnel connect timed out")
            except (OSError, asyncssh.Error, ValueError) as exc:
                self._failed(f"{type(exc).__name__}: {exc}", logging.WARNING, "tunnel connect failed")
            except Exception as exc:  # never let one peer's surprise end its reconnect loop
                log.exception("unexpected error in the tunnel task of peer %s", cfg.name)
                self._failed(f"{type(exc).__name__}: {exc}", logging.ERROR, "tunnel failed unexpectedly")
            finally:
                self._conn = None
                self.up_since = None
                self.rtt_ms = None
                self.state = "down"
            if self._closing.is_set():
                break
            wait = delay * (0.8 + 0.4 * random.random())
            delay = min(delay * 2, cfg.backoff_max)
            waits = [asyncio.ensure_future(e.wait()) for e in (self._closing, self._retry)]
            try:
                await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self._retry.is_set():  # a reload: the operator may just have fixed known_hosts or keys
                delay = cfg.backoff_initial

    def retry_now(self) -> None:
        """A down tunnel tries again at once, with its backoff reset (config reload)."""
        if self.state != "up":
            self._retry.set()

    def _failed(self, error: str, level: int, msg: str) -> None:
        self.connect_failures += 1
        self.last_error = error
        cfg = self.config
        event(log, level, msg, peer=cfg.name, host=cfg.host, port=cfg.port, user=cfg.user, error=error)

    async def _serve(self, conn: Any) -> None:
        cfg = self.config
        fast = _fastpath.install(conn, cfg.fast_path)
        self.fast_path, self.fast_path_reason, self._direct = fast.installed, fast.reason, fast.direct
        self.cipher = conn.get_extra_info("send_cipher")
        self._conn = conn
        if self._ever_up:
            self.reconnects += 1
        self._ever_up = True
        self.state = "up"
        self.up_since = time.time()
        self.last_error = None
        event(log, logging.INFO, "tunnel up", peer=cfg.name, host=cfg.host, port=cfg.port, cipher=self.cipher,
              fast_path=self.fast_path, fast_path_off=self.fast_path_reason or None, reconnects=self.reconnects)
        rtt_task = asyncio.get_running_loop().create_task(self._measure_rtt(conn))
        try:
            await conn.wait_closed()
        finally:
            rtt_task.cancel()
            self._conn = None
            self._direct = None
            self.state = "down"
        reason = "closed by sessiond" if self._closing.is_set() else "connection lost"
        if not self._closing.is_set():
            self.last_error = reason
        event(log, logging.WARNING if not self._closing.is_set() else logging.INFO, "tunnel down",
              peer=cfg.name, reason=reason)

    async def _measure_rtt(self, conn: Any) -> None:
        request = getattr(conn, "_make_global_request", None)
        if request is None or self.config.rtt_interval <= 0:
            return
        while True:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(request(b"keepalive@openssh.com"), max(self.config.connect_timeout, 1.0))
            except asyncio.CancelledError:
                raise
            except Exception:  # the connection is going away; keepalive handles the verdict
                return
            self.rtt_ms = round((time.perf_counter() - started) * 1000, 3)
            await asyncio.sleep(self.config.rtt_interval)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cfg = self.config
        conn = self._conn
        if conn is None or self.state != "up":
            self.open_failures += 1
            why = f": {self.last_error}" if self.last_error else ""
            raise PeerUnavailable(f"SSH tunnel to peer {cfg.name!r} ({cfg.host}:{cfg.port}) is {self.state}{why}")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READER_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            async with asyncio.timeout(cfg.open_timeout):  # no extra task, unlike wait_for (3.11)
                _chan, session = await conn.create_connection(
                    lambda: _ChannelSession(self, protocol), cfg.endpoint_host, cfg.endpoint_port,
                    window=cfg.window, max_pktsize=cfg.max_pktsize)
        except asyncssh.ChannelOpenError as exc:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r} refused a channel to {cfg.endpoint_host}:{cfg.endpoint_port}: "
                                  f"{exc.reason or exc}") from None
        except asyncio.TimeoutError:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r}: no channel within {cfg.open_timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            self.open_failures += 1
            raise PeerUnavailable(f"peer {cfg.name!r}: channel open failed: {exc}") from None
        assert isinstance(session, _ChannelSession) and session.transport is not None
        writer = asyncio.StreamWriter(session.transport, protocol, reader, loop)
        return reader, writer

    async def close(self) -> None:
        self._closing.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:  # the task logged its own failure
                pass
            self._task = None

    def status(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": cfg.name, "transport": "ssh", "state": self.state, "channels": self.channels,
            "rtt_ms": self.rtt_ms, "reconnects": self.reconnects, "last_error": self.last_error,
            "host": cfg.host, "port": cfg.port, "endpoint": f"{cfg.endpoint_host}:{cfg.endpoint_port}",
            "cipher": self.cipher, "fast_path": self.fast_path,
            "fast_path_off": self.fast_path_reason or None, "channels_opened": self.channels_opened,
            "open_failures": self.open_failures, "connect_failures": self.connect_failures,
        }

"""Fixtures for the SSH tunnel tests: a private OpenSSH sshd and loopback endpoint servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from cloudlet.tunnel_sshd import TunnelSshd, sshd_argv_available


@pytest.fixture(autouse=True)
def _needs_sshd() -> None:
    reasons = sshd_argv_available()
    if reasons:
        pytest.skip("tunnel tests need a real sshd: " + "; ".join(reasons))


class EchoServer:
    """Echoes every byte; on the client's EOF, finishes echoing and half-closes back."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections = 0
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sshd_factory() -> Iterator[object]:
    made: list[TunnelSshd] = []

    def make(endpoint: str, **kwargs: object) -> TunnelSshd:
        s = TunnelSshd(endpoint=endpoint, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.cleanup()


@pytest.fixture
def sshd(echo: EchoServer, sshd_factory) -> TunnelSshd:  # type: ignore[no-untyped-def]
    return sshd_factory(f"127.0.0.1:{echo.port}")

"""The agent in tests: a byte-checked stream through it, and an agent with sessions from the fleet secret."""

from __future__ import annotations

import asyncio
import struct

from cloudlet.client.agent import Agent
from cloudlet_bench.harness.issuer import SecretIssuer

from support.sessiond import SECRET

WORDS = 250  # u64 per chunk of a stream


class Stream:
    """Numbered u64s through one local connection to an echo service, every one checked on return."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: int = 40_000) -> None:
        self.reader, self.writer, self.total = reader, writer, total
        self.got = bytearray()
        self.sent = 0

    async def produce(self, pause: float = 0.001) -> None:
        for i in range(0, self.total, WORDS):
            self.writer.write(struct.pack(f"!{WORDS}Q", *range(i, i + WORDS)))
            await self.writer.drain()
            self.sent = i + WORDS
            await asyncio.sleep(pause)

    async def consume(self, timeout: float = 30) -> None:
        async def run() -> None:
            while len(self.got) < self.total * 8:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise AssertionError(f"the local connection closed after {len(self.got) // 8} numbers")
                self.got.extend(data)

        await asyncio.wait_for(run(), timeout)

    def check(self) -> None:
        assert len(self.got) == self.total * 8
        numbers = struct.unpack(f"!{self.total}Q", bytes(self.got))
        wrong = next((i for i, n in enumerate(numbers) if n != i), None)
        assert wrong is None, f"number {wrong} came back as {numbers[wrong]}: lost, repeated or reordered"


def agent_for(ports: dict[str, int], at: str = "a", **kw: object) -> tuple[Agent, SecretIssuer]:
    cloudlets = {n: ("127.0.0.1", p) for n, p in ports.items()}
    issuer = SecretIssuer(SECRET, dict(cloudlets), device=str(kw.pop("device", "")))
    agent = Agent(cloudlets, at, service=str(kw.pop("service", "svc")), fleet=issuer, apis={n: n for n in ports},
                  **kw)  # type: ignore[arg-type]
    return agent, issuer



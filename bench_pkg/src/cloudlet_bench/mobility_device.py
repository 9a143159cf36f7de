"""The device side of `cloudlet bench mobility`, run as its own process (in the device's namespace).

    python -m cloudlet_bench.mobility_device agent --secret-file F --cloudlet a=HOST:PORT ... [--policy auto]
    python -m cloudlet_bench.mobility_device checker --port P --seconds S --key K

``agent``: `cloudlet agent` itself (the library Agent and its control socket) with sessions from
:class:`~cloudlet_bench.harness.issuer.SecretIssuer` (no controller runs in the bench), the product's
nearness defaults unless overridden. ``checker``: one long-lived connection through the agent that
sends ``INCR key`` one at a time on a fixed schedule (every ``--interval``, so the latency samples
spread evenly over the drive) and checks every reply is the one before plus one (a request lost
or executed twice shows), timing each; prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any


async def _agent(args: argparse.Namespace) -> None:
    from cloudlet.client.agent import Agent
    from cloudlet.client.agent_cli import ControlSocket, _parse_cloudlets
    from cloudlet.client.nearness import NearnessConfig

    from cloudlet_bench.harness.issuer import SecretIssuer

    cloudlets = _parse_cloudlets(args.cloudlet)
    issuer = SecretIssuer(Path(args.secret_file).read_bytes().strip(), dict(cloudlets))
    agent = Agent(cloudlets, args.at, service=args.service, fleet=issuer, apis={n: n for n in cloudlets},
                  nearness=NearnessConfig(policy=args.policy), listen=("127.0.0.1", 0))
    await agent.start()
    control = ControlSocket(agent, args.control_socket)
    await control.start()
    print(json.dumps({"listen": "%s:%d" % agent.address}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await control.close()
    await agent.stop()


async def _checker(args: argparse.Namespace) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    key = args.key.encode()
    request = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key)
    sent = acked = wrong = 0
    samples: list[tuple[float, float]] = []  # (time since start, latency s)
    errors: list[str] = []
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        due = start + sent * args.interval  # a fixed schedule: samples spread evenly over the drive
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        t0 = time.monotonic()
        writer.write(request)
        sent += 1
        try:
            line = await asyncio.wait_for(reader.readline(), args.timeout)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            errors.append(f"request {sent}: {type(exc).__name__}")
            break
        if not line:
            errors.append(f"request {sent}: the connection closed")
            break
        t1 = time.monotonic()
        if line != b":%d\r\n" % (acked + 1):
            wrong += 1
            errors.append(f"request {sent}: reply {line!r}, expected :{acked + 1}")
            break
        acked += 1
        samples.append((round(t0 - start, 4), round(t1 - t0, 6)))
    executed = None  # what the server counted: a request executed twice shows here
    if not errors:
        writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ValueError):
            await asyncio.wait_for(reader.readline(), args.timeout)  # $<len>
            executed = int((await asyncio.wait_for(reader.readline(), args.timeout)).strip())
    writer.close()
    return {"sent": sent, "acked": acked, "executed": executed, "wrong": wrong, "errors": errors, "request_bytes": len(request),
            "samples": samples}


def main() -> int:
    from cloudlet.common.loop import use_fast_loop

    p = argparse.ArgumentParser(prog="python -m cloudlet_bench.mobility_device")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--secret-file", required=True)
    a.add_argument("--cloudlet", action="append", required=True)
    a.add_argument("--service", default="redis")
    a.add_argument("--at", required=True)
    a.add_argument("--policy", choices=["auto", "pinned"], default="auto")
    a.add_argument("--control-socket", required=True)
    c = sub.add_parser("checker")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--interval", type=float, default=0.05, help="one request every this many seconds (at most)")
    args = p.parse_args()
    use_fast_loop("auto")
    if args.what == "agent":
        asyncio.run(_agent(args))
    else:
        print(json.dumps(asyncio.run(_checker(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

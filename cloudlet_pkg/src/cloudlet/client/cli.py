"""`cloudlet session ...`: use a session from the shell (cat, end) and list a sessiond's sessions."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from typing import Any

from cloudlet.client import SessionClient, SessionRefused, end_session
from cloudlet.common.addresses import parse_hostport


def _credential(args: argparse.Namespace) -> str:
    if args.credential:
        return str(args.credential)
    if args.credential_file:
        with open(args.credential_file, encoding="ascii") as fh:
            return fh.read().strip()
    env = os.environ.get("CLOUDLET_SESSION")
    if env:
        return env
    raise SystemExit("cloudlet session: give --credential, --credential-file or CLOUDLET_SESSION")


def _address(args: argparse.Namespace) -> tuple[str, int]:
    try:
        return parse_hostport(args.address, "--address")
    except ValueError as exc:
        raise SystemExit(f"cloudlet session: {exc}") from None


async def _cat(args: argparse.Namespace) -> int:
    host, port = _address(args)
    client = SessionClient(host, port, _credential(args), args.target, timeout=args.timeout)
    try:
        reply = await client.open()
    except SessionRefused as exc:
        print(f"cloudlet session cat: refused: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"cloudlet session cat: cannot connect to {args.address}: {exc}", file=sys.stderr)
        return 4
    if args.verbose:
        print(f"cloudlet session cat: {reply.message}", file=sys.stderr)
    out = sys.stdout.buffer
    stdin_fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    last_rx = [loop.time()]

    async def downstream() -> None:
        while True:
            data = await client.recv()
            if not data:
                return
            last_rx[0] = loop.time()
            out.write(data)
            out.flush()

    down = asyncio.create_task(downstream())
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def read_stdin() -> None:  # a daemon thread: never keeps the command alive after the session ends
        while True:
            data = os.read(stdin_fd, 65536)  # raw fd: no buffer lock held at interpreter exit
            asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
            if not data:
                return

    threading.Thread(target=read_stdin, daemon=True).start()
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, down}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break  # the server closed the session
            data = getter.result()
            if not data:
                break
            await client.send(data)
            if down.done():
                break
        if args.on_eof == "end":
            await client.end()
        elif args.on_eof == "detach" and not down.done():
            eof_at = loop.time()
            while not down.done():  # let answers to the last input arrive before detaching
                quiet_until = max(eof_at, last_rx[0]) + args.linger
                if loop.time() >= quiet_until:
                    break
                await asyncio.sleep(quiet_until - loop.time())
            down.cancel()
            await asyncio.gather(down, return_exceptions=True)
            rest = await client.detach()  # FIN: the server flushes and closes; read to EOF
            out.write(rest)
            out.flush()
            return 0
        await down
    finally:
        if not down.done():
            down.cancel()
        await client.close()
    return 0


async def _end(args: argparse.Namespace) -> int:
    host, port = _address(args)
    try:
        reply = await end_session(host, port, _credential(args), args.target, args.timeout)
    except SessionRefused as exc:
        print(f"cloudlet session end: refused: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"cloudlet session end: cannot connect to {args.address}: {exc}", file=sys.stderr)
        return 4
    print(reply.message)
    return 0


async def _list(args: argparse.Namespace) -> int:
    import aiohttp

    query = f"?service={args.service}" if args.service else ""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=args.socket)) as http:
            async with http.get(f"http://sessiond/v1/sessions{query}") as resp:
                data: Any = await resp.json()
    except (aiohttp.ClientError, OSError) as exc:
        print(f"cloudlet session list: cannot reach sessiond at {args.socket}: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{'ID':<24} {'SERVICE':<16} {'DEVICE':<16} {'STATE':<10} {'UP':>12} {'DOWN':>12} {'BUFFERED':>10}")
    for s in data.get("sessions", []):
        print(f"{s['id']:<24} {s['service']:<16} {s.get('device') or '-':<16} {s['state']:<10} {s['bytes_up']:>12} "
              f"{s['bytes_down']:>12} {s['buffered']:>10}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="HOST:PORT of the service's session port on a cloudlet")
    p.add_argument("--credential", help="the session credential (prefer --credential-file or CLOUDLET_SESSION)")
    p.add_argument("--credential-file", help="file holding the session credential")
    p.add_argument("--target", default="", help="anchor cloudlet name when connecting through another cloudlet (default: local)")
    p.add_argument("--timeout", type=float, default=10.0, help="connect and reply timeout in seconds (default 10)")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "session", help="use or inspect sessions (cat, end, list)",
        description="Use a cloudlet session from the shell, end it, or list a sessiond's sessions.")
    sub = parser.add_subparsers(dest="session_command", metavar="ACTION")
    cat = sub.add_parser("cat", help="pipe stdin/stdout through a session",
                         description="Attach (or resume) a session and copy stdin to it and its bytes to stdout.")
    _common(cat)
    cat.add_argument("--on-eof", choices=["detach", "end", "wait"], default="detach",
                     help="at end of stdin: detach (FIN, read what is left, keep the session; default), "
                     "end the session, or wait until the server closes")
    cat.add_argument("--linger", type=float, default=0.2,
                     help="with --on-eof detach: seconds without incoming bytes to wait before detaching (default 0.2); "
                     "bytes arriving later are held by the cloudlet for the next attach")
    cat.add_argument("-v", "--verbose", action="store_true", help="say whether the session was new or resumed")
    cat.set_defaults(func=lambda a: asyncio.run(_cat(a)))
    end = sub.add_parser("end", help="end a session (its backend connection closes)",
                         description="Send END for a session credential; the credential is refused afterwards.")
    _common(end)
    end.set_defaults(func=lambda a: asyncio.run(_end(a)))
    ls = sub.add_parser("list", help="list a sessiond's sessions through its control socket")
    ls.add_argument("--socket", default="/run/cloudlet/sessiond.sock", help="sessiond control socket")
    ls.add_argument("--service", help="only this service's sessions")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    ls.set_defaults(func=lambda a: asyncio.run(_list(a)))
    def _help(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

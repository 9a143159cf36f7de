"""`cloudlet agent`: a local TCP port through which unmodified programs use a cloudlet service.

The agent accepts one local connection (for example ``redis-cli -p 6380``), speaks the session
protocol upstream, and switches cloudlet on command (``cloudlet agent switch --to b`` or
``POST /v1/switch`` on its control socket) without the local connection noticing: the new
connection attaches while both directions keep flowing on the old one (make-before-break, see
``SessionClient.handover``), and a refused or unreachable cloudlet leaves the old connection as it
was. A later local connection resumes the same session (``--on-local-close detach``, the default)
or the agent ends it (``end``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cloudlet.client import SessionClient, SessionRefused
from cloudlet.common.addresses import parse_hostport
from cloudlet.common.httpserver import HttpServer
from cloudlet.common.logs import event, setup_logging
from cloudlet.protocol.credentials import anchor_of

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024


@dataclass
class Agent:
    credential: str
    cloudlets: dict[str, tuple[str, int]]
    anchor: str
    current: str
    listen: tuple[str, int] = ("127.0.0.1", 0)
    control_socket: str | None = None
    on_local_close: str = "detach"
    timeout: float = 10.0
    resumable: bool = True  # protocol mode 2: a switch without FIN loses nothing
    switches: int = 0
    last_switch_ms: float | None = None
    client: SessionClient | None = None
    server: asyncio.Server | None = None
    _local: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    _down: asyncio.Task[None] | None = None
    _switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _control: HttpServer | None = None

    def _target_for(self, name: str) -> str:
        return "" if name == self.anchor else self.anchor

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle_local, *self.listen, limit=READ_SIZE)
        if self.control_socket:
            await self._start_control()
        event(log, logging.INFO, "agent listening", listen=self.address, cloudlet=self.current, anchor=self.anchor)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._control is not None:
            await self._control.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.control_socket))
        if self._local is not None:
            self._local[1].close()
        if self.client is not None:
            await self.client.close()

    # -- the local connection ----------------------------------------------------------------
    async def _handle_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._local is not None:
            event(log, logging.WARNING, "second local connection refused (one session per agent)")
            writer.close()
            return
        self._local = (reader, writer)
        host, port = self.cloudlets[self.current]
        client = self.client  # one session per agent: a later local connection resumes it, offsets and all
        if client is None:
            client = SessionClient(host, port, self.credential, self._target_for(self.current), self.timeout,
                                   resumable=self.resumable)
        else:
            client.host, client.port, client.target = host, port, self._target_for(self.current)
            client.clear_pending()  # what the last detach drained went to the previous program
        try:
            reply = await client.open()
        except (SessionRefused, OSError, asyncio.TimeoutError) as exc:
            event(log, logging.ERROR, "cannot open the session", cloudlet=self.current, error=str(exc))
            writer.close()
            self._local = None
            return
        self.client = client
        event(log, logging.INFO, "local connection attached", cloudlet=self.current, resumed=reply.resumed)
        self._down = asyncio.create_task(self._pump_down(writer))
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                await self.client.send(data)
        except (ConnectionError, OSError) as exc:
            event(log, logging.INFO, "local or upstream connection broke", error=str(exc))
        async with self._switch_lock:
            if self._down is not None and not self._down.done():
                self._down.cancel()
                await asyncio.gather(self._down, return_exceptions=True)
            if self.client is not None and self.client.writer is not None:
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    if self.on_local_close == "end":
                        await self.client.end()
                    else:
                        rest = await self.client.detach()
                        if rest and not writer.is_closing():
                            writer.write(rest)
            writer.close()
            self._local = None
            event(log, logging.INFO, "local connection closed", action=self.on_local_close)

    async def _pump_down(self, writer: asyncio.StreamWriter) -> None:
        assert self.client is not None
        try:
            while True:
                data = await self.client.recv(READ_SIZE)
                if not data:  # the server closed: backend gone or session ended
                    event(log, logging.INFO, "session closed by the server")
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()

    # -- switching ---------------------------------------------------------------------------
    async def switch(self, to: str, fin: bool = True) -> dict[str, Any]:
        if to not in self.cloudlets:
            raise KeyError(f"unknown cloudlet {to!r} (known: {', '.join(sorted(self.cloudlets))})")
        async with self._switch_lock:
            started = time.monotonic()
            previous = self.current
            self.current = to
            resumed = None
            if self._local is not None and self.client is not None and self.client.writer is not None:
                host, port = self.cloudlets[to]
                try:  # make-before-break: the pumps go on; on failure the old connection is kept
                    reply = await self.client.handover(host, port, self._target_for(to), fin=fin)
                except (SessionRefused, OSError, asyncio.TimeoutError):
                    self.current = previous
                    raise
                resumed = reply.resumed
            self.switches += 1
            self.last_switch_ms = round((time.monotonic() - started) * 1000, 3)
            event(log, logging.INFO, "switched cloudlet", frm=previous, to=to, fin=fin, ms=self.last_switch_ms)
            return {"cloudlet": to, "previous": previous, "connected": resumed is not None, "ms": self.last_switch_ms}

    def status(self) -> dict[str, Any]:
        return {"cloudlet": self.current, "anchor": self.anchor, "cloudlets": sorted(self.cloudlets),
                "mode": "resumable" if self.resumable else "raw",
                "connected": self._local is not None, "switches": self.switches, "last_switch_ms": self.last_switch_ms,
                "listen": "%s:%d" % self.address}

    # -- control socket ----------------------------------------------------------------------
    async def _start_control(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.add_routes([web.get("/v1/status", self._h_status), web.post("/v1/switch", self._h_switch)])
        self._control = HttpServer(app, "agent control socket")
        path = Path(str(self.control_socket))
        path.parent.mkdir(parents=True, exist_ok=True)
        await self._control.start_unix(str(path), mode=0o600)

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _h_switch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            to = body["to"]
            fin = bool(body.get("fin", True))
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": {"code": "bad_request", "message": 'body must be {"to": NAME, "fin": true}'}}, status=400)
        try:
            return web.json_response(await self.switch(str(to), fin))
        except KeyError as exc:
            return web.json_response({"error": {"code": "not_found", "message": str(exc.args[0])}}, status=404)
        except (SessionRefused, OSError, asyncio.TimeoutError) as exc:
            return web.json_response({"error": {"code": "switch_failed", "message": str(exc) or type(exc).__name__}}, status=502)


# -- command line ----------------------------------------------------------------------------
def _parse_cloudlets(items: list[str]) -> dict[str, tuple[str, int]]:
    out = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep:
            raise SystemExit(f"--cloudlet {item!r}: expected NAME=HOST:PORT")
        try:
            out[name] = parse_hostport(addr, f"--cloudlet {name}")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return out


async def _run(args: argparse.Namespace) -> int:
    cloudlets = _parse_cloudlets(args.cloudlet)
    cred = args.credential or (Path(args.credential_file).read_text().strip() if args.credential_file
                               else os.environ.get("CLOUDLET_SESSION"))
    if not cred:
        raise SystemExit("give --credential-file, --credential or CLOUDLET_SESSION")
    # the credential names its anchor (the only cloudlet that holds the session)
    anchor = args.anchor or anchor_of(cred) or args.cloudlet[0].partition("=")[0]
    at = args.at or anchor
    for name in (anchor, at):
        if name not in cloudlets:
            raise SystemExit(f"cloudlet {name!r} not given with --cloudlet")
    agent = Agent(cred, cloudlets, anchor, at, parse_hostport(args.listen, "--listen"), args.control_socket,
                  args.on_local_close, resumable=args.mode == "resumable")
    await agent.start()
    print(json.dumps({"listen": "%s:%d" % agent.address, "control_socket": args.control_socket}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
    return 0


async def _control(socket_path: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as http:
        async with http.request(method, f"http://agent{path}", json=body) as resp:
            return resp.status, await resp.json()


def _switch(args: argparse.Namespace) -> int:
    try:
        status, data = asyncio.run(_control(args.control_socket, "POST", "/v1/switch", {"to": args.to, "fin": not args.no_fin}))
    except OSError as exc:
        print(f"cloudlet agent switch: cannot reach the agent at {args.control_socket}: {exc}", file=sys.stderr)
        return 4
    print(json.dumps(data))
    return 0 if status == 200 else 1


def _status(args: argparse.Namespace) -> int:
    try:
        _, data = asyncio.run(_control(args.control_socket, "GET", "/v1/status"))
    except OSError as exc:
        print(f"cloudlet agent status: cannot reach the agent at {args.control_socket}: {exc}", file=sys.stderr)
        return 4
    print(json.dumps(data, indent=2))
    return 0


DEFAULT_CONTROL = "/run/cloudlet/agent.sock"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent", help="local port for unmodified programs; switches cloudlet on command",
        description="Run the device-side agent (run), or tell a running agent to switch cloudlet (switch) "
        "or report (status). See docs/agent.md.")
    sub = parser.add_subparsers(dest="agent_command", metavar="ACTION")
    run = sub.add_parser("run", help="run the agent", description="Listen locally and relay one program's "
                         "connection through a cloudlet session, switching cloudlet on command.")
    run.add_argument("--listen", default="127.0.0.1:6380", help="local HOST:PORT for the program (default 127.0.0.1:6380)")
    run.add_argument("--cloudlet", action="append", required=True, metavar="NAME=HOST:PORT",
                     help="a cloudlet and the service's session port on it (repeat)")
    run.add_argument("--anchor", help="cloudlet that holds the session (default: the one the credential names)")
    run.add_argument("--at", help="cloudlet to start at (default: the anchor)")
    run.add_argument("--credential-file", help="file with the session credential (or CLOUDLET_SESSION)")
    run.add_argument("--credential", help=argparse.SUPPRESS)
    run.add_argument("--control-socket", default=DEFAULT_CONTROL, help=f"control socket (default {DEFAULT_CONTROL})")
    run.add_argument("--on-local-close", choices=["detach", "end"], default="detach",
                     help="when the program closes: keep the session for the next connection (detach) or end it")
    run.add_argument("--mode", choices=["resumable", "raw"], default="resumable",
                     help="session protocol mode: resumable (mode 2, the default: a switch without FIN loses "
                     "nothing) or raw (mode 0)")
    run.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                     help="event loop: uvloop if installed (auto, the default), or plain asyncio")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="text", choices=["json", "text"])

    def _run_cmd(a: argparse.Namespace) -> int:
        from cloudlet.common.loop import use_fast_loop

        setup_logging(a.log_level, a.log_format)
        use_fast_loop(a.loop)
        return asyncio.run(_run(a))

    run.set_defaults(func=_run_cmd)
    sw = sub.add_parser("switch", help="move the agent's session to another cloudlet")
    sw.add_argument("--to", required=True, help="cloudlet name (one of the agent's --cloudlet names)")
    sw.add_argument("--no-fin", action="store_true", help="abandon the old connection without FIN (takeover)")
    sw.add_argument("--control-socket", default=DEFAULT_CONTROL, help=f"agent control socket (default {DEFAULT_CONTROL})")
    sw.set_defaults(func=_switch)
    st = sub.add_parser("status", help="show the agent's cloudlet and connection")
    st.add_argument("--control-socket", default=DEFAULT_CONTROL, help=f"agent control socket (default {DEFAULT_CONTROL})")
    st.set_defaults(func=_status)
    def _help(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

"""`cloudlet agent run|switch|policy|status|metrics`: the agent's command line and its control socket.

``run`` starts :class:`~cloudlet.client.agent.Agent` from a device profile (``--profile``: a session
per local connection, the fleet map from the controllers) or from one session credential and a
hand-written map (``--credential-file`` and ``--cloudlet NAME=HOST:PORT``). The control socket (a
Unix socket, mode 0600) answers ``GET /v1/status``, ``GET /metrics``, ``POST /v1/switch`` and
``POST /v1/policy``; the other actions are its clients. See docs/agent.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from cloudlet.client.agent import UPSTREAM_ERRORS, Agent
from cloudlet.client.fleet import DeviceProfile, FleetClient, FleetError, ProfileError, controllers, endpoints
from cloudlet.client.library import SessionRefused
from cloudlet.client.nearness import NearnessConfig
from cloudlet.common.addresses import parse_hostport
from cloudlet.common.httpserver import HttpServer
from cloudlet.common.logs import event, setup_logging
from cloudlet.protocol.credentials import anchor_of

log = logging.getLogger(__name__)
DEFAULT_CONTROL = "/run/cloudlet/agent.sock"


def _error(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class ControlSocket:
    """The agent's control API on a Unix socket."""

    def __init__(self, agent: Agent, path: str) -> None:
        self.agent = agent
        self.path = path
        app = web.Application(client_max_size=64 * 1024)
        app.add_routes([web.get("/v1/status", self._status), web.get("/metrics", self._metrics),
                        web.post("/v1/switch", self._switch), web.post("/v1/policy", self._policy)])
        self.server = HttpServer(app, "agent control socket")

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await self.server.start_unix(self.path, mode=0o600)

    async def close(self) -> None:
        await self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.agent.metrics(), content_type="text/plain", charset="utf-8")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    async def _switch(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            to, fin = body["to"], body.get("fin", True)
            if not isinstance(to, str) or not isinstance(fin, bool):
                raise ValueError
        except (ValueError, KeyError):
            return _error("bad_request", 'body must be {"to": NAME, "fin": true}', 400)
        try:
            return web.json_response(await self.agent.switch(to, fin))
        except KeyError as exc:
            return _error("not_found", str(exc.args[0]), 404)
        except (SessionRefused, *UPSTREAM_ERRORS) as exc:
            return _error("switch_failed", str(exc) or type(exc).__name__, 502)

    async def _policy(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            policy = body["policy"]
            if policy not in ("auto", "pinned"):
                raise ValueError
        except (ValueError, KeyError):
            return _error("bad_request", 'body must be {"policy": "auto" | "pinned"}', 400)
        nearness = self.agent.policy
        nearness.config = dataclasses.replace(nearness.config, policy=policy)
        event(log, logging.INFO, "policy changed", policy=policy)
        return web.json_response({"policy": policy, "cloudlet": self.agent.current})


# -- run ---------------------------------------------------------------------------------------
def _parse_cloudlets(items: list[str]) -> dict[str, tuple[str, int]]:
    out = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"cloudlet agent: {item!r}: expected NAME=HOST:PORT")
        try:
            out[name] = parse_hostport(addr, name)
        except ValueError as exc:
            raise SystemExit(f"cloudlet agent: {exc}") from None
    return out


def _nearness(args: argparse.Namespace) -> NearnessConfig:
    try:
        return NearnessConfig(policy=args.policy, interval_seconds=args.probe_interval,
                              timeout_seconds=args.probe_timeout, window=args.window, down_after=args.down_after,
                              margin_ms=args.margin_ms, margin_ratio=args.margin_ratio, hold_seconds=args.hold,
                              min_dwell_seconds=args.min_dwell)
    except ValueError as exc:
        raise SystemExit(f"cloudlet agent: {exc}") from None


async def _from_profile(args: argparse.Namespace, common: dict[str, Any]) -> Agent:
    try:
        profile = DeviceProfile.load(args.profile)
    except ProfileError as exc:
        raise SystemExit(f"cloudlet agent: {exc}") from None
    service = args.service or (profile.services[0] if len(profile.services) == 1 else "")
    if not service:
        raise SystemExit(f"cloudlet agent: give --service (the profile allows {', '.join(profile.services) or 'none'})")
    fleet = FleetClient(profile, timeout=args.timeout * 2)
    try:
        fleet_map = await fleet.fleet_map(service)
    except FleetError as exc:
        await fleet.close()
        raise SystemExit(f"cloudlet agent: cannot get the fleet map of {service!r}: {exc}") from None
    cloudlets = endpoints(fleet_map)
    if not cloudlets:
        await fleet.close()
        raise SystemExit(f"cloudlet agent: service {service!r} runs on no cloudlet of the fleet")
    at = args.at or (fleet_map.get("anchor") if fleet_map.get("anchor") in cloudlets else sorted(cloudlets)[0])
    if at not in cloudlets:
        await fleet.close()
        raise SystemExit(f"cloudlet agent: --at {at!r}: not in the fleet map ({', '.join(sorted(cloudlets))})")
    overrides = _parse_cloudlets(args.via)
    unknown = sorted(set(overrides) - set(cloudlets))
    if unknown:
        await fleet.close()
        raise SystemExit(f"cloudlet agent: --via {', '.join(unknown)}: not in the fleet map ({', '.join(sorted(cloudlets))})")
    return Agent(cloudlets, str(at), service=service, fleet=fleet, apis=controllers(fleet_map), overrides=overrides,
                 **common)


def _from_credential(args: argparse.Namespace, common: dict[str, Any]) -> Agent:
    if not args.cloudlet:
        raise SystemExit("cloudlet agent: with a single session credential, give the map with --cloudlet NAME=HOST:PORT")
    cloudlets = _parse_cloudlets(args.cloudlet)
    cred = args.credential or (Path(args.credential_file).read_text().strip() if args.credential_file
                               else os.environ.get("CLOUDLET_SESSION", ""))
    if not cred:
        raise SystemExit("cloudlet agent: give --profile, or --credential-file (or CLOUDLET_SESSION)")
    anchor = args.anchor or anchor_of(cred) or args.cloudlet[0].partition("=")[0]
    at = args.at or anchor
    for name in (anchor, at):
        if name not in cloudlets:
            raise SystemExit(f"cloudlet agent: cloudlet {name!r} not given with --cloudlet")
    return Agent(cloudlets, at, credential=cred, anchor=anchor, **common)


async def _pick_nearest(agent: Agent, rounds: int = 2) -> None:
    """Before the first connection: probe every cloudlet and start at the nearest (policy auto)."""
    for _ in range(rounds):
        names = list(agent.cloudlets)
        rtts = await asyncio.gather(*(agent._probe(n) for n in names))
        for name, rtt in zip(names, rtts, strict=True):
            agent.policy.observe(name, rtt)
    best = agent.policy.best()
    if best is not None and best != agent.current:
        agent.current = best
        agent.policy.moved(best, asyncio.get_running_loop().time(), "start_nearest")


async def _run(args: argparse.Namespace) -> int:
    common: dict[str, Any] = {
        "listen": parse_hostport(args.listen, "--listen"), "timeout": args.timeout,
        "resumable": args.mode == "resumable", "nearness": _nearness(args),
        "max_connections": args.max_connections, "heal_timeout": args.heal_timeout,
        "on_local_close": args.on_local_close or "", "credential_max_age": args.credential_max_age,
        "map_refresh_seconds": args.map_refresh,
    }
    agent = await _from_profile(args, common) if args.profile else _from_credential(args, common)
    if args.policy == "auto" and not args.at:
        await _pick_nearest(agent)
    await agent.start()
    control = ControlSocket(agent, args.control_socket) if args.control_socket else None
    if control is not None:
        await control.start()
    print(json.dumps({"listen": "%s:%d" % agent.address, "control_socket": args.control_socket,
                      "cloudlet": agent.current, "cloudlets": sorted(agent.cloudlets)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if control is not None:
        await control.close()
    await agent.stop()
    return 0


# -- control clients ---------------------------------------------------------------------------
async def _control(socket_path: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as http:
        async with http.request(method, f"http://agent{path}", json=body) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


def _client(action: str, method: str, path: str, body: Any = None) -> Any:
    def run(args: argparse.Namespace) -> int:
        payload = body(args) if callable(body) else body
        try:
            status, data = asyncio.run(_control(args.control_socket, method, path, payload))
        except OSError as exc:
            print(f"cloudlet agent {action}: cannot reach the agent at {args.control_socket}: {exc}", file=sys.stderr)
            return 4
        print(data if isinstance(data, str) else json.dumps(data, indent=2 if action == "status" else None))
        return 0 if status == 200 else 1

    return run


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent", help="local port for unmodified programs; follows the nearest cloudlet",
        description="Run the device-side agent (run), tell a running agent to switch cloudlet (switch) or "
        "change its policy (policy), or ask it (status, metrics). See docs/agent.md.")
    sub = parser.add_subparsers(dest="agent_command", metavar="ACTION")
    run = sub.add_parser(
        "run", help="run the agent", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Listen locally and carry each program connection in its own cloudlet session; follow the "
        "nearest cloudlet (PING round trips, hysteresis) and attach again through another one when a path breaks.")
    src = run.add_argument_group("where sessions come from (one of)")
    src.add_argument("--profile", help="device profile (TOML from playbooks/devices.yml): a session per connection")
    src.add_argument("--service", help="the service to use (default: the profile's only service)")
    src.add_argument("--via", action="append", default=[], metavar="NAME=HOST:PORT",
                     help="with --profile: reach cloudlet NAME's session port at HOST:PORT instead of the map's "
                     "address (a NAT, a port forward, a proxy; repeat)")
    src.add_argument("--credential-file", help="one session credential (or CLOUDLET_SESSION): one connection at a time")
    src.add_argument("--credential", help=argparse.SUPPRESS)
    src.add_argument("--cloudlet", action="append", default=[], metavar="NAME=HOST:PORT",
                     help="with --credential-file: a cloudlet and the service's session port on it (repeat)")
    src.add_argument("--anchor", help="with --credential-file: the anchor (default: the one the credential names)")
    run.add_argument("--listen", default="127.0.0.1:6380", help="local HOST:PORT for the program (port 0: any)")
    run.add_argument("--at", help="cloudlet to start at (default: the nearest with --policy auto, else the anchor)")
    run.add_argument("--control-socket", default=DEFAULT_CONTROL, help="control socket ('' for none)")
    near = run.add_argument_group("moving by itself (docs/agent.md, Nearness)")
    near.add_argument("--policy", choices=["auto", "pinned"], default="auto",
                      help="auto: move to a nearer cloudlet and away from one that stops answering; pinned: "
                      "only on command")
    near.add_argument("--probe-interval", type=float, default=0.25, help="seconds between PING rounds")
    near.add_argument("--probe-timeout", type=float, default=1.0, help="a PING not answered in this is a miss")
    near.add_argument("--window", type=int, default=3, help="RTT estimate: median of the last N answers")
    near.add_argument("--down-after", type=int, default=2, help="misses in a row that make a cloudlet down")
    near.add_argument("--margin-ms", type=float, default=1.0, help="a better cloudlet: at least this many ms ...")
    near.add_argument("--margin-ratio", type=float, default=0.2, help="... and this fraction of the current RTT better")
    near.add_argument("--hold", type=float, default=0.75, help="... for this many seconds in a row")
    near.add_argument("--min-dwell", type=float, default=2.0, help="seconds after a move before the next by nearness")
    run.add_argument("--max-connections", type=int, default=64, help="local connections carried at once")
    run.add_argument("--heal-timeout", type=float, default=30.0,
                     help="seconds a broken connection tries to attach again before the program's connection closes")
    run.add_argument("--timeout", type=float, default=5.0, help="connect and reply timeout of one attach")
    run.add_argument("--credential-max-age", type=float, default=3600.0,
                     help="a spare session credential older than this is renewed")
    run.add_argument("--map-refresh", type=float, default=30.0, help="seconds between fleet map refreshes (profile)")
    run.add_argument("--on-local-close", choices=["detach", "end"],
                     help="when the program closes: end its session (default with --profile) or keep it for the "
                     "next connection (detach; default with one credential)")
    run.add_argument("--mode", choices=["resumable", "raw"], default="resumable",
                     help="session protocol mode: resumable (mode 2, moves and heals lose nothing) or raw (mode 0)")
    run.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                     help="event loop: uvloop if installed (auto), or plain asyncio")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="text", choices=["json", "text"])

    def _run_cmd(a: argparse.Namespace) -> int:
        from cloudlet.common.loop import use_fast_loop

        if a.profile and (a.credential_file or a.credential or a.cloudlet):
            raise SystemExit("cloudlet agent: --profile takes the map from the fleet: drop --credential-file/--cloudlet")
        if a.max_connections < 1 or a.heal_timeout <= 0 or a.timeout <= 0:
            raise SystemExit("cloudlet agent: --max-connections must be >= 1, --heal-timeout and --timeout > 0")
        setup_logging(a.log_level, a.log_format)
        use_fast_loop(a.loop)
        return asyncio.run(_run(a))

    run.set_defaults(func=_run_cmd)

    def control_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control-socket", default=DEFAULT_CONTROL, help=f"agent control socket (default {DEFAULT_CONTROL})")

    sw = sub.add_parser("switch", help="move every connection of the agent to another cloudlet")
    sw.add_argument("--to", required=True, help="cloudlet name (one of the fleet map's)")
    sw.add_argument("--no-fin", action="store_true", help="abandon the old connections without FIN (takeover)")
    control_arg(sw)
    sw.set_defaults(func=_client("switch", "POST", "/v1/switch", lambda a: {"to": a.to, "fin": not a.no_fin}))
    po = sub.add_parser("policy", help="auto (follow the nearest cloudlet) or pinned (only on command)")
    po.add_argument("policy", choices=["auto", "pinned"])
    control_arg(po)
    po.set_defaults(func=_client("policy", "POST", "/v1/policy", lambda a: {"policy": a.policy}))
    st = sub.add_parser("status", help="the agent's cloudlet, each cloudlet's RTT, connections, last switch")
    control_arg(st)
    st.set_defaults(func=_client("status", "GET", "/v1/status"))
    me = sub.add_parser("metrics", help="the agent's metrics (Prometheus text)")
    control_arg(me)
    me.set_defaults(func=_client("metrics", "GET", "/metrics"))

    def _help(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

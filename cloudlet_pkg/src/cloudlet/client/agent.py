"""`cloudlet agent`: a local TCP port through which unmodified programs use a cloudlet service.

Every local connection (``redis-benchmark -c 50`` opens fifty) is carried in its own session
(a :class:`Carrier`: the program's socket and a :class:`~cloudlet.client.SessionClient`). With a
device profile (``--profile``) each new connection gets a new session from the controller of the
cloudlet the agent is at, with the device's own credential; with a single session credential
(``--credential-file``) the agent carries one connection at a time in that one session.

All carriers move together: on command (``cloudlet agent switch``), or by themselves when another
cloudlet is nearer (:mod:`cloudlet.client.nearness`: PING probes, a margin, a hold time) or the
current one stops answering (a move without FIN; protocol mode 2 loses nothing). A carrier whose
upstream breaks (a forwarder restarted, a tunnel or link gone: the connection is reset) attaches
again through the best reachable cloudlet and resumes where it was; only the anchor's end of the
session (FIN: END, backend closed, grace expiry) or a refusal that means it (SESSION_ENDED,
SESSION_LOST, REPLAY_UNAVAILABLE, EXPIRED, DEVICE_REFUSED) closes the program's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cloudlet.client.fleet import FleetError, SessionIssuer, controllers, endpoints
from cloudlet.client.library import SessionClient, SessionRefused, StreamGap, ping
from cloudlet.client.nearness import Nearness, NearnessConfig
from cloudlet.common.logs import Throttle, event
from cloudlet.protocol.wire import Status

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
UPSTREAM_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, RuntimeError, asyncio.IncompleteReadError)
# refusals that mean the session is over (no other cloudlet can resume it)
TERMINAL = frozenset({Status.SESSION_ENDED, Status.SESSION_LOST, Status.REPLAY_UNAVAILABLE, Status.EXPIRED,
                      Status.DEVICE_REFUSED, Status.BAD_CREDENTIAL, Status.WRONG_SERVICE})


class SessionOver(Exception):
    """The session cannot go on (the anchor ended it, or no cloudlet could resume it in time)."""


@dataclass(eq=False)
class Carrier:
    """One program connection and the session that carries it."""

    agent: Agent
    client: SessionClient
    anchor: str
    cloudlet: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    id: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gen: int = 0  # +1 per move or heal: a pump that failed on an older path does not heal twice
    heals: int = 0
    closed_because: str = ""

    def target_for(self, name: str) -> str:
        return "" if name == self.anchor else self.anchor

    async def _move(self, to: str, fin: bool) -> None:
        host, port = self.agent.cloudlets[to]
        await self.client.handover(host, port, self.target_for(to), fin=fin)
        self.cloudlet = to
        self.gen += 1

    async def move(self, to: str, fin: bool) -> None:
        """Move this carrier's session (the agent moves all of them together)."""
        async with self.lock:
            if self.cloudlet != to or self.client.writer is None:
                await self._move(to, fin)

    async def heal(self, gen: int, error: BaseException) -> None:
        """The path broke: attach again through the best reachable cloudlet (mode 2 resumes exactly)."""
        agent = self.agent
        async with self.lock:
            if gen != self.gen:
                return  # already moved or healed since that path failed
            failed = self.cloudlet
            started = time.monotonic()
            agent.log_throttle.event(logging.WARNING, "upstream broke, attaching again", f"heal:{failed}",
                                     connection=self.id, cloudlet=failed, error=str(error) or type(error).__name__)
            delay = 0.02
            while True:
                for name in agent.heal_order(failed):
                    try:
                        await self._move(name, fin=False)
                    except SessionRefused as exc:
                        if exc.status in TERMINAL:
                            raise SessionOver(str(exc)) from None
                        continue
                    except StreamGap as exc:
                        raise SessionOver(str(exc)) from None
                    except UPSTREAM_ERRORS:
                        continue
                    self.heals += 1
                    agent.heals += 1
                    agent.last_heal_ms = round((time.monotonic() - started) * 1000, 3)
                    event(log, logging.INFO, "attached again", connection=self.id, frm=failed, to=name,
                          ms=agent.last_heal_ms)
                    return
                if time.monotonic() - started > agent.heal_timeout:
                    raise SessionOver(f"no cloudlet could resume the session within {agent.heal_timeout:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _up(self) -> None:
        client = self.client
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                return
            while True:
                gen, before = self.gen, client.up_offset
                try:
                    await client.send(data)
                    break
                except UPSTREAM_ERRORS as exc:
                    await self.heal(gen, exc)
                    if client.resumable and client.up_offset != before:
                        break  # it is in the replay ring: the attach resent it

    async def _down(self) -> str:
        client = self.client
        while True:
            gen = self.gen
            try:
                data = await client.recv(READ_SIZE)
            except SessionRefused as exc:
                if exc.status in TERMINAL:
                    raise SessionOver(str(exc)) from None
                await self.heal(gen, exc)
                continue
            except StreamGap as exc:
                raise SessionOver(str(exc)) from None
            except UPSTREAM_ERRORS as exc:
                await self.heal(gen, exc)
                continue
            if not data:
                return "session ended by the server"
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError, RuntimeError):
                return "local connection broke"

    async def run(self) -> None:
        up = asyncio.create_task(self._up())
        down = asyncio.create_task(self._down())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            raise
        if down.done():  # the session is over (or the program stopped reading)
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            exc = down.exception()
            self.closed_because = str(exc) if exc is not None else down.result()
            self.writer.close()
            await self.agent.carrier_done(self, local_closed=False)
            return
        down.cancel()  # the program closed its side
        await asyncio.gather(down, return_exceptions=True)
        exc = up.exception()
        if isinstance(exc, SessionOver):
            self.closed_because = str(exc)
            self.writer.close()
            await self.agent.carrier_done(self, local_closed=False)
            return
        self.closed_because = "closed by the program"
        async with self.lock:
            await self.agent.carrier_done(self, local_closed=True)


@dataclass
class Agent:
    """The device's agent. Either ``fleet`` (a device profile) or ``credential`` (one session) is set."""

    cloudlets: dict[str, tuple[str, int]]  # name -> the service's session endpoint there
    current: str
    service: str = ""
    fleet: SessionIssuer | None = None  # FleetClient: the controllers, with the device credential
    credential: str = ""
    anchor: str = ""  # with a single credential: its anchor
    apis: dict[str, str] = field(default_factory=dict)  # name -> controller URL (device profile)
    # reach these cloudlets' session ports here instead of the map's address (a NAT, a port forward, a proxy)
    overrides: dict[str, tuple[str, int]] = field(default_factory=dict)
    listen: tuple[str, int] = ("127.0.0.1", 0)
    on_local_close: str = ""  # end | detach (default: end with a profile, detach with one credential)
    timeout: float = 5.0
    resumable: bool = True  # protocol mode 2: moves and heals without FIN lose nothing
    nearness: NearnessConfig | None = None  # None: never probe (moves only when told)
    max_connections: int = 64
    heal_timeout: float = 30.0
    credential_max_age: float = 3600.0  # a spare session credential is renewed when older
    map_refresh_seconds: float = 30.0
    # state
    carriers: set[Carrier] = field(default_factory=set)
    local_connections: int = 0  # being opened or carried
    switches: int = 0
    heals: int = 0
    sessions_opened: int = 0
    connections_refused: int = 0
    credentials_renewed: int = 0
    last_switch_ms: float | None = None
    last_heal_ms: float | None = None
    last_switch: dict[str, Any] = field(default_factory=dict)
    server: asyncio.Server | None = None
    policy: Nearness = field(init=False)
    log_throttle: Throttle = field(default_factory=lambda: Throttle(log, 5.0))
    _single: SessionClient | None = None  # the one session of a single credential (kept across connections)
    _switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _spares: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    _map_at: float = 0.0

    def __post_init__(self) -> None:
        if (self.fleet is None) == (not self.credential):
            raise ValueError("give either a device profile (fleet) or a single session credential")
        for name, where in self.overrides.items():
            if name in self.cloudlets:
                self.cloudlets[name] = where
        if self.current not in self.cloudlets:
            raise ValueError(f"cloudlet {self.current!r} is not in the map ({', '.join(sorted(self.cloudlets))})")
        if not self.on_local_close:
            self.on_local_close = "end" if self.fleet is not None else "detach"
        if self.fleet is None:
            self.max_connections = 1
        self.policy = Nearness(self.current, self.nearness or NearnessConfig(policy="pinned"))
        self.policy.set_cloudlets(list(self.cloudlets))

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle_local, *self.listen, limit=READ_SIZE)
        if self.nearness is not None:
            self._spawn(self._probe_loop())
        event(log, logging.INFO, "agent listening", listen="%s:%d" % self.address, cloudlet=self.current,
              policy=self.policy.config.policy, cloudlets=sorted(self.cloudlets))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in list(self.carriers):
            c.writer.close()
            await c.client.close()
        if self._single is not None:
            await self._single.close()
        if self.fleet is not None:
            await self.fleet.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- where to go -------------------------------------------------------------------------
    def heal_order(self, failed: str) -> list[str]:
        """Cloudlets to attach through after ``failed`` broke: the current choice if it is not the
        one that failed, then the others nearest first, the failed one last (a restarted daemon)."""
        order = [self.current] if self.current != failed and self.current in self.cloudlets else []
        order += [n for n in self.policy.ranked(frozenset({failed, *order})) if n in self.cloudlets]
        return order + ([failed] if failed in self.cloudlets else [])

    # -- local connections -------------------------------------------------------------------
    async def _handle_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.local_connections >= self.max_connections:
            self.connections_refused += 1
            why = ("a single session credential carries one connection at a time (run the agent with --profile "
                   "to give each connection its own session)" if self.fleet is None
                   else f"the agent's connection limit ({self.max_connections}, --max-connections) is reached")
            self.log_throttle.event(logging.WARNING, "local connection refused", "limit", reason=why,
                                    connections=self.local_connections)
            writer.close()
            return
        self.local_connections += 1
        try:
            await self._carry(reader, writer)
        finally:
            self.local_connections -= 1

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(self._ids)
        try:
            client, anchor, at = await self._open_session()
        except (SessionRefused, FleetError, SessionOver, *UPSTREAM_ERRORS) as exc:
            self.connections_refused += 1
            event(log, logging.ERROR, "cannot open a session for a local connection", connection=cid,
                  cloudlet=self.current, error=str(exc) or type(exc).__name__)
            writer.close()
            return
        carrier = Carrier(self, client, anchor, at, reader, writer, cid)
        self.carriers.add(carrier)
        event(log, logging.DEBUG, "local connection attached", connection=cid, cloudlet=at, anchor=anchor,
              resumed=bool(client.last_reply and client.last_reply.resumed))
        if at != self.current:  # the agent moved while this one was opening
            with contextlib.suppress(SessionRefused, *UPSTREAM_ERRORS):
                await carrier.move(self.current, fin=True)
        await carrier.run()

    async def _open_session(self) -> tuple[SessionClient, str, str]:
        """A session for a new local connection, attached at the current cloudlet (or the next best)."""
        if self.fleet is None:
            client = self._single
            if client is None:
                client = self._single = SessionClient(
                    *self.cloudlets[self.current], self.credential, "", self.timeout, cloudlets=self.cloudlets,
                    anchor=self.anchor, resumable=self.resumable)
            else:
                client.clear_pending()  # what the last detach drained went to the previous program
            anchor = self.anchor
        else:
            reply = await self._new_credential(self.current)
            anchor = str(reply["cloudlet"])
            client = SessionClient(*self.cloudlets[self.current], str(reply["session"]), "", self.timeout,
                                   cloudlets=self.cloudlets, anchor=anchor, resumable=self.resumable)
            self.sessions_opened += 1
        last: BaseException | None = None
        for name in self.heal_order(failed=""):
            client.host, client.port = self.cloudlets[name]
            client.target = "" if name == anchor else anchor
            try:
                await client.open()
                return client, anchor, name
            except SessionRefused as exc:
                if exc.status in TERMINAL:
                    raise
                last = exc
            except UPSTREAM_ERRORS as exc:
                last = exc
        raise last if last is not None else SessionOver("no cloudlet to attach to")

    async def _new_credential(self, at: str) -> dict[str, Any]:
        """A session reply from ``at``'s controller (a spare one if it is fresh), else any controller's."""
        assert self.fleet is not None
        spare = self._spares.pop(at, None)
        if spare is not None and time.monotonic() - spare[0] < self.credential_max_age:
            self._spawn(self._refill(at))
            return spare[1]
        order = [at] + [n for n in self.policy.ranked(frozenset({at})) if n in self.apis]
        errors = []
        for name in order:
            api = self.apis.get(name)
            if api is None:
                continue
            try:
                reply = await self.fleet.new_session(self.service, api)
            except FleetError as exc:
                if exc.status in (401, 403):
                    raise
                errors.append(str(exc))
                continue
            if name == at:
                self._spawn(self._refill(at))
            return reply
        raise FleetError("no controller gave a session: " + ("; ".join(errors) or "none known in the fleet map"))

    async def _refill(self, at: str) -> None:
        """Keep one spare session credential of ``at`` (a new connection then costs no API call)."""
        if self.fleet is None or at in self._spares or at not in self.apis:
            return
        with contextlib.suppress(FleetError):
            reply = await self.fleet.new_session(self.service, self.apis[at])
            self._spares[at] = (time.monotonic(), reply)

    async def carrier_done(self, carrier: Carrier, local_closed: bool) -> None:
        """A carrier ends: the program closed (end or detach the session), or the session is over."""
        self.carriers.discard(carrier)
        client = carrier.client
        if local_closed and client.writer is not None:
            with contextlib.suppress(SessionRefused, *UPSTREAM_ERRORS):
                if self.on_local_close == "end":
                    await client.end()
                else:
                    rest = await client.detach()
                    if rest and not carrier.writer.is_closing():
                        carrier.writer.write(rest)
        elif not local_closed:
            self.log_throttle.event(logging.INFO, "session over, local connection closed", "over",
                                    connection=carrier.id, reason=carrier.closed_because)
        carrier.writer.close()
        if client is not self._single:
            await client.close()
        event(log, logging.DEBUG, "local connection closed", connection=carrier.id, reason=carrier.closed_because)

    # -- switching ---------------------------------------------------------------------------
    async def switch(self, to: str, fin: bool = True, reason: str = "manual") -> dict[str, Any]:
        """Move every carrier to ``to``. A clean switch (FIN) that moves none of them is undone."""
        if to not in self.cloudlets:
            raise KeyError(f"unknown cloudlet {to!r} (known: {', '.join(sorted(self.cloudlets))})")
        async with self._switch_lock:
            started = time.monotonic()
            previous = self.current
            self.current = to
            carriers = list(self.carriers)
            results = await asyncio.gather(*(c.move(to, fin) for c in carriers), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            for r in failed:
                if not isinstance(r, (SessionRefused, *UPSTREAM_ERRORS)):
                    raise r
            if carriers and fin and len(failed) == len(carriers):
                self.current = previous
                raise failed[0]
            if self._single is not None and not carriers:  # the next connection resumes there
                self._single.host, self._single.port = self.cloudlets[to]
            self.switches += 1
            self.last_switch_ms = round((time.monotonic() - started) * 1000, 3)
            self.policy.moved(to, asyncio.get_running_loop().time(), reason)
            self.last_switch = {"from": previous, "to": to, "fin": fin, "reason": reason, "at": round(time.time(), 3),
                                "ms": self.last_switch_ms, "moved": len(carriers) - len(failed), "failed": len(failed)}
            event(log, logging.INFO, "switched cloudlet", frm=previous, to=to, fin=fin, reason=reason,
                  ms=self.last_switch_ms, connections=len(carriers), failed=len(failed))
            return {"cloudlet": to, "previous": previous, "connected": bool(carriers) and len(failed) < len(carriers),
                    "ms": self.last_switch_ms, "moved": len(carriers) - len(failed), "failed": len(failed),
                    "reason": reason}

    # -- nearness ----------------------------------------------------------------------------
    async def _probe(self, name: str) -> float | None:
        host, port = self.cloudlets[name]
        try:
            return await ping(host, port, self.policy.config.timeout_seconds)
        except (SessionRefused, *UPSTREAM_ERRORS):
            return None

    async def probe_round(self) -> None:
        """One PING to every cloudlet, then the policy's decision (and a switch if it says so)."""
        names = list(self.cloudlets)
        rtts = await asyncio.gather(*(self._probe(n) for n in names))
        for name, rtt in zip(names, rtts, strict=True):
            self.policy.observe(name, rtt)
        loop = asyncio.get_running_loop()
        decision = self.policy.decide(loop.time())
        if decision is not None and decision.to != self.current:
            try:
                await self.switch(decision.to, decision.fin, reason=decision.reason)
            except (SessionRefused, *UPSTREAM_ERRORS) as exc:
                self.log_throttle.event(logging.WARNING, "automatic switch failed", f"switch:{decision.to}",
                                        to=decision.to, reason=decision.reason, error=str(exc) or type(exc).__name__)
        stragglers = [c for c in self.carriers if c.cloudlet != self.current and not c.lock.locked()]
        for c in stragglers:  # a carrier a switch could not move (or one that healed elsewhere)
            self._spawn(self._catch_up(c))

    async def _catch_up(self, carrier: Carrier) -> None:
        with contextlib.suppress(SessionRefused, *UPSTREAM_ERRORS):
            if self.policy.is_up(self.current):
                await carrier.move(self.current, fin=True)

    async def _probe_loop(self) -> None:
        interval = self.policy.config.interval_seconds
        while True:
            started = time.monotonic()
            await self.probe_round()
            if self.fleet is not None:
                await self._maintain()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _maintain(self) -> None:
        """Renew spare credentials before they age out; refresh the fleet map now and then."""
        now = time.monotonic()
        for at, (fetched, _) in list(self._spares.items()):
            if now - fetched >= self.credential_max_age * 0.9:
                del self._spares[at]
                self.credentials_renewed += 1
                self._spawn(self._refill(at))
        if now - self._map_at >= self.map_refresh_seconds:
            self._map_at = now
            self._spawn(self.refresh_map())

    async def refresh_map(self) -> None:
        assert self.fleet is not None
        try:
            fleet_map = await self.fleet.fleet_map(self.service)
        except FleetError as exc:
            self.log_throttle.event(logging.WARNING, "fleet map refresh failed", "map", error=str(exc))
            return
        self.apply_map(fleet_map)

    def apply_map(self, fleet_map: dict[str, Any]) -> None:
        """Take a fleet map's cloudlets (one that left is dropped unless a carrier is there now)."""
        new = endpoints(fleet_map)
        if not new:
            return
        new.update({n: where for n, where in self.overrides.items() if n in new})
        in_use = {c.cloudlet for c in self.carriers} | {self.current}
        for name in list(self.cloudlets):
            if name not in new and name not in in_use:
                del self.cloudlets[name]  # the dict is shared with every SessionClient
        self.cloudlets.update(new)
        self.apis.update(controllers(fleet_map))
        self.policy.set_cloudlets(list(self.cloudlets))

    # -- reporting ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"cloudlet": self.current, "anchor": self.anchor or None, "service": self.service or None,
                "cloudlets": sorted(self.cloudlets), "policy": self.policy.config.policy,
                "mode": "resumable" if self.resumable else "raw", "connections": len(self.carriers),
                "connected": bool(self.carriers), "switches": self.switches, "last_switch_ms": self.last_switch_ms,
                "last_switch": self.last_switch or None, "heals": self.heals, "last_heal_ms": self.last_heal_ms,
                "sessions_opened": self.sessions_opened, "connections_refused": self.connections_refused,
                "credentials_renewed": self.credentials_renewed, "nearness": self.policy.status(),
                "listen": "%s:%d" % self.address if self.server else None}

    def metrics(self) -> str:
        """Prometheus text exposition of the agent's counters and each cloudlet's RTT."""
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP cloudlet_agent_{name} {help_}", f"# TYPE cloudlet_agent_{name} {kind}"])
            lines.extend(f"cloudlet_agent_{name}{labels} {value:g}" for labels, value in samples)

        metric("switches_total", "counter", "Moves of all connections to another cloudlet.", [("", self.switches)])
        metric("heals_total", "counter", "Connections attached again after their path broke.", [("", self.heals)])
        metric("sessions_opened_total", "counter", "Sessions asked of a controller.", [("", self.sessions_opened)])
        metric("connections_refused_total", "counter", "Local connections closed at once (limit, no session).",
               [("", self.connections_refused)])
        metric("connections", "gauge", "Local connections carried now.", [("", len(self.carriers))])
        status = self.policy.status()
        metric("rtt_seconds", "gauge", "Median PING round trip of each cloudlet (NaN: none answered).",
               [(f'{{cloudlet="{n}"}}', (s["rtt_ms"] / 1000.0) if isinstance(s["rtt_ms"], float) else float("nan"))
                for n, s in status.items()])
        metric("cloudlet_up", "gauge", "1 if the cloudlet answers its PING probes.",
               [(f'{{cloudlet="{n}"}}', 1.0 if s["up"] else 0.0) for n, s in status.items()])
        metric("current", "gauge", "1 for the cloudlet the agent's connections go through.",
               [(f'{{cloudlet="{n}"}}', 1.0 if n == self.current else 0.0) for n in sorted(self.cloudlets)])
        return "\n".join(lines) + "\n"

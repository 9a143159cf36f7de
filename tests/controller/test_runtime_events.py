"""The event path: the controller reconciles at once when podman reports a container event.

The podman tests run the real `cloudlet controller` with ``reconcile_interval_seconds = 60``, so after
its start pass no interval pass can run during the test: only the events stream can explain a repair
(and the metrics confirm that no interval pass ran). The reconnect and coalescing tests need a stream
that breaks and a burst on demand, so they use a small libpod events server on a Unix socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cloudlet.controller import config as config_mod
from cloudlet.controller.daemon import ControllerDaemon
from cloudlet.controller.runtime.base import RuntimeEvent
from cloudlet.controller.runtime.podman import MAX_EVENT_BYTES, PodmanRuntime
from support.controller import LONG_INTERVAL, Stack, containers_of, demo_body, metric, metrics_text, open_session, podman, poll, read_line


@pytest.fixture
async def slow_stack(tmp_path: Path, podman_socket: str, demo_image: str, cloudlet_name: str) -> AsyncIterator[Stack]:
    """sessiond + controller whose interval pass comes only after 60 s; events stream connected."""
    s = Stack(tmp_path, cloudlet_name, podman_socket, reconcile_interval=LONG_INTERVAL)
    try:
        await s.start_sessiond()
        await s.start_controller()

        async def connected() -> bool:
            _, health = await s.api("GET", "/v1/health", token=None)
            return health["runtime_events"] == "connected"  # type: ignore[index]

        await poll(connected, 30, "the controller's podman events stream")
        yield s
    finally:
        await s.close()


@pytest.mark.podman
async def test_killed_container_runs_and_is_registered_again_without_waiting_for_the_interval(
    slow_stack: Stack, demo_image: str
) -> None:
    stack = slow_stack
    status, svc = await stack.api("PUT", "/v1/services/ev", demo_body(demo_image))
    assert status == 201, svc
    name = f"cloudlet-{stack.cloudlet}-ev"
    started_before = podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip()

    podman("kill", name)

    async def repaired() -> bool:
        text = await metrics_text(stack)
        if metric(text, "cloudlet_controller_repairs_total", action="restarted") < 1:
            return False
        _, got = await stack.api("GET", "/v1/services/ev")
        reg = (await stack.registered()).get("ev")
        return got["state"] == "running" and reg is not None and reg["backend"] == got["backend"]  # type: ignore[index]

    # far below the 60 s interval: only the events stream can have triggered this
    await poll(repaired, 25, "the event path to restart and register the killed container")
    assert podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip() != started_before
    text = await metrics_text(stack)
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="interval") == 0
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="event") >= 1
    assert metric(text, "cloudlet_controller_event_stream_up") == 1

    async def died_seen() -> bool:  # podman sends "kill" at once and "died" a moment later: either may start the pass
        return metric(await metrics_text(stack), "cloudlet_controller_runtime_events_total", action="died") >= 1

    await poll(died_seen, 10, "the died event of the killed container on the events stream")
    assert (await stack.registered())["ev"]["port"] == svc["session_port"]  # type: ignore[index]
    assert containers_of(stack.cloudlet) == [name]

    _, reader, writer = await open_session(stack, "ev")  # sessions open again, to the new backend
    writer.write(b"PING\n")
    assert await read_line(reader) == "PONG"
    writer.close()

    logged = [json.loads(line) for line in (stack.dir / "controller.log").read_text().splitlines()
              if line.startswith("{")]
    assert any(r["msg"] == "runtime event" and r.get("service") == "ev" and r.get("action") == "died"
               for r in logged)


@pytest.mark.podman
async def test_removed_container_is_unregistered_without_waiting_for_the_interval(
    slow_stack: Stack, demo_image: str
) -> None:
    stack = slow_stack
    assert (await stack.api("PUT", "/v1/services/gone", demo_body(demo_image)))[0] == 201
    assert "gone" in await stack.registered()
    podman("rm", "-f", "-t", "0", f"cloudlet-{stack.cloudlet}-gone")

    async def unregistered() -> bool:
        # `rm -f` reports died (and stop) before remove; the pass of the first may already unregister
        text = await metrics_text(stack)
        seen = metric(text, "cloudlet_controller_runtime_events_total", action="remove")
        return seen >= 1 and "gone" not in await stack.registered()

    await poll(unregistered, 25, "the event path to drop the registration of the removed container")
    text = await metrics_text(stack)
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="interval") == 0
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="event") >= 1
    assert containers_of(stack.cloudlet) == []


@pytest.mark.podman
async def test_a_second_death_soon_after_a_restart_waits_for_the_interval_pass(
    slow_stack: Stack, demo_image: str
) -> None:
    """Crash-loop guard: no restart storm, and sessiond stops relaying to the dead address."""
    stack = slow_stack
    assert (await stack.api("PUT", "/v1/services/loop", demo_body(demo_image)))[0] == 201
    name = f"cloudlet-{stack.cloudlet}-loop"
    podman("kill", name)

    async def restarted_once() -> bool:
        text = await metrics_text(stack)
        reg = (await stack.registered()).get("loop")
        _, got = await stack.api("GET", "/v1/services/loop")
        return (metric(text, "cloudlet_controller_repairs_total", action="restarted") == 1
                and got["state"] == "running" and reg is not None  # type: ignore[index]
                and reg["backend"] == got["backend"])  # type: ignore[index]

    await poll(restarted_once, 25, "the first restart")
    podman("kill", name)

    async def unregistered() -> bool:
        return "loop" not in await stack.registered()

    await poll(unregistered, 25, "the dead service's registration to be removed")
    assert podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "false"
    text = await metrics_text(stack)
    assert metric(text, "cloudlet_controller_repairs_total", action="restarted") == 1
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="interval") == 0


# -- a libpod events server on a Unix socket, for breaking the stream on purpose ------------------


def event_line(cloudlet: str, service: str, action: str, **extra: str) -> bytes:
    attrs = {"name": f"cloudlet-{cloudlet}-{service}", "image": "localhost/cloudlet-demo:latest",
             "cloudlet.cloudlet": cloudlet, "cloudlet.service": service, "containerExitCode": "0", **extra}
    return json.dumps({
        "status": action, "id": "0123456789abcdef", "Type": "container", "Action": action,
        "Actor": {"ID": "0123456789abcdef", "Attributes": attrs}, "scope": "local",
        "time": 1795670000, "timeNano": 1795670000000000000,
    }).encode() + b"\n"


@dataclass
class FakeLibpod:
    """Serves ``/events`` (one scripted batch per connection), ``/_ping`` and ``/containers/json``."""

    batches: list[list[bytes]]
    close_after: set[int] = field(default_factory=set)  # connection numbers that end after their batch
    enders: dict[int, asyncio.Event] = field(default_factory=dict)  # or end when this is set
    requests: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lists: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"path": request.path, **request.query})
        n = len(self.requests) - 1
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        await resp.write(b"".join(self.batches[n] if n < len(self.batches) else []))
        if n not in self.close_after:
            ender = asyncio.ensure_future(self.enders.get(n, self.stop).wait())
            stopper = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({ender, stopper}, return_when=asyncio.FIRST_COMPLETED)
            ender.cancel()
            stopper.cancel()
        return resp

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def containers(self, request: web.Request) -> web.Response:
        self.lists += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # a pass takes a while: a concurrent one would overlap here
        finally:
            self.in_flight -= 1
        return web.json_response([])


@pytest.fixture
async def fake_libpod(tmp_path: Path) -> AsyncIterator[tuple[FakeLibpod, str]]:
    fake = FakeLibpod(batches=[])
    app = web.Application()
    app.router.add_get("/v4.0.0/libpod/events", fake.events)
    app.router.add_get("/v4.0.0/libpod/_ping", fake.ping)
    app.router.add_get("/v4.0.0/libpod/containers/json", fake.containers)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    path = str(tmp_path / "libpod.sock")
    await web.UnixSite(runner, path).start()
    try:
        yield fake, path
    finally:
        fake.stop.set()
        await runner.cleanup()


async def test_watcher_reconnects_when_the_events_stream_breaks(fake_libpod: tuple[FakeLibpod, str]) -> None:
    fake, path = fake_libpod
    huge = event_line("cltest-w", "huge", "died", pad="x" * (MAX_EVENT_BYTES + 1000))
    fake.batches = [
        [event_line("cltest-w", "demo", "died"), event_line("cltest-other", "demo", "died"), b"not json\n",
         event_line("cltest-w", "demo", "exec_died"), huge, event_line("cltest-w", "after-huge", "remove")],
        [event_line("cltest-w", "demo", "start")],
    ]
    fake.close_after = {0}
    seen: list[RuntimeEvent] = []
    second = asyncio.Event()

    def on_change(ev: RuntimeEvent) -> None:
        seen.append(ev)
        if ev.action == "start":
            second.set()

    runtime = PodmanRuntime("cltest-w", path)
    task = asyncio.create_task(runtime.watch(on_change))
    try:
        await asyncio.wait_for(second.wait(), 30)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [(e.service, e.action) for e in seen] == [
        ("", "resync"), ("demo", "died"), ("after-huge", "remove"), ("", "lost"), ("", "resync"), ("demo", "start"),
    ]
    assert seen[1].ref == "0123456789ab"
    assert len(fake.requests) == 2  # the second one is the reconnect
    for req in fake.requests:
        assert req["path"] == "/v4.0.0/libpod/events" and req["stream"] == "true"
        assert json.loads(req["filters"]) == {
            "type": ["container"], "label": ["cloudlet.cloudlet=cltest-w"],
            "event": ["died", "stop", "remove", "start", "restart"],
        }


async def test_a_burst_of_events_gives_one_pass_and_passes_never_overlap(
    fake_libpod: tuple[FakeLibpod, str], tmp_path: Path, cloudlet_name: str
) -> None:
    fake, path = fake_libpod
    stack = Stack(tmp_path, cloudlet_name, path, reconcile_interval=LONG_INTERVAL)
    fake.batches = [[]]
    fake.enders[0] = end_first = asyncio.Event()
    daemon: ControllerDaemon | None = None
    try:
        await stack.start_sessiond()
        daemon = ControllerDaemon(config_mod.load(stack.dir / "controller.toml"))
        await daemon.start()
        manager = daemon.manager
        assert manager is not None
        registry = manager.metrics.registry

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        async def settled() -> bool:
            return manager.event_stream == "connected" and not manager.reconcile_pending

        await poll(settled, 30, "the events stream to connect and the start pass to finish")
        assert value("cloudlet_controller_reconcile_passes_total", trigger="event") == 0
        lists_before = fake.lists

        # 20 events in one write: the controller sees them all and makes one pass of them
        fake.batches.append([event_line(cloudlet_name, f"s{i}", "died") for i in range(20)])
        end_first.set()  # end the first stream: the watcher reconnects and gets the burst

        async def burst_handled() -> bool:
            seen = value("cloudlet_controller_runtime_events_total", action="died")
            return seen == 20 and not manager.reconcile_pending

        await poll(burst_handled, 30, "the burst of 20 events and its pass")
        assert value("cloudlet_controller_reconcile_passes_total", trigger="event") == 1
        assert value("cloudlet_controller_event_stream_connects_total") == 2
        assert fake.lists - lists_before <= 2  # the reconnect's resync may make its own pass
        assert fake.max_in_flight == 1
        assert value("cloudlet_controller_reconcile_passes_total", trigger="interval") == 0
    finally:
        if daemon is not None:
            await daemon.stop()
        await stack.close()


@pytest.mark.podman
async def test_watcher_reconnects_after_the_podman_api_service_restarts(
    tmp_path: Path, demo_image: str, cloudlet_name: str
) -> None:
    """The real thing: our own `podman system service` goes away and comes back on the same socket."""
    import subprocess

    from support.controller import podman_env, wait_unix_http

    sock = str(tmp_path / "own-podman.sock")

    def start_service() -> subprocess.Popen[bytes]:
        with open(tmp_path / "own-podman.log", "ab") as out:
            proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                    env=podman_env(), stdout=out, stderr=subprocess.STDOUT)
        wait_unix_http(sock)
        return proc

    def stop_service(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    service = start_service()
    stack = Stack(tmp_path, cloudlet_name, sock, reconcile_interval=LONG_INTERVAL)
    try:
        await stack.start_sessiond()
        await stack.start_controller()

        async def events_state(want: str) -> bool:
            _, health = await stack.api("GET", "/v1/health", token=None)
            return health["runtime_events"] == want  # type: ignore[index]

        await poll(lambda: events_state("connected"), 30, "the events stream")
        assert (await stack.api("PUT", "/v1/services/back", demo_body(demo_image)))[0] == 201

        stop_service(service)
        await poll(lambda: events_state("disconnected"), 30, "the controller to notice the stream broke")
        service = start_service()
        await poll(lambda: events_state("connected"), 30, "the watcher to reconnect")
        text = await metrics_text(stack)
        assert metric(text, "cloudlet_controller_event_stream_connects_total") == 2

        podman("kill", f"cloudlet-{stack.cloudlet}-back")

        async def repaired() -> bool:
            text = await metrics_text(stack)
            reg = (await stack.registered()).get("back")
            _, got = await stack.api("GET", "/v1/services/back")
            return (metric(text, "cloudlet_controller_repairs_total", action="restarted") == 1
                    and got["state"] == "running" and reg is not None  # type: ignore[index]
                    and reg["backend"] == got["backend"])  # type: ignore[index]

        await poll(repaired, 25, "the reconnected event path to restart the killed container")
        text = await metrics_text(stack)
        assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="interval") == 0
    finally:
        await stack.close()
        stop_service(service)

"""The controller end to end: real podman, the real `cloudlet sessiond`, the real `cloudlet controller`.

A service is launched through the HTTP API, reached through its session port with the session
protocol (``cloudlet.client``), deleted, recovered after both daemons are killed, and every error
case is checked for what it leaves behind (containers, sessiond registrations).
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from cloudlet.client import SessionRefused, attach
from support.controller import Stack, containers_of, demo_body, open_session, poll, read_line

pytestmark = [pytest.mark.podman, pytest.mark.slow]


async def test_launch_connect_through_session_port_and_delete(stack: Stack, demo_image: str) -> None:
    status, svc = await stack.api("PUT", "/v1/services/demo", demo_body(demo_image))
    assert status == 201, svc
    assert svc["name"] == "demo" and svc["image"] == demo_image and svc["state"] == "running"
    assert svc["cloudlet"] == stack.cloudlet and svc["runtime"] == "podman"
    assert stack.port_base <= svc["session_port"] < stack.port_base + 50
    assert svc["limits"] == {"cpus": 0.5, "memory_mb": 64} and svc["env"] == {"PORT": "7000"}
    assert containers_of(stack.cloudlet) == [f"cloudlet-{stack.cloudlet}-demo"]

    reg = (await stack.registered())["demo"]
    assert reg["port"] == svc["session_port"] and reg["backend"] == svc["backend"]

    status, listed = await stack.api("GET", "/v1/services")
    assert status == 200 and [s["name"] for s in listed["services"]] == ["demo"]
    status, got = await stack.api("GET", "/v1/services/demo")
    assert status == 200 and got["session_port"] == svc["session_port"]

    sess, reader, writer = await open_session(stack, "demo")
    assert sess["service"] == "demo" and sess["cloudlet"] == stack.cloudlet and sess["port"] == svc["session_port"]
    assert sess["session"].startswith(f"v2.demo.{stack.cloudlet}..")  # anchored at the issuing cloudlet, no device
    writer.write(b"SET k v1\nGET k\nSTREAM 1000 3\n")
    lines = [await read_line(reader) for _ in range(6)]
    assert lines[:2] == ["OK", "VALUE v1"]
    assert [line.split()[:2] for line in lines[2:5]] == [["MSG", "1"], ["MSG", "2"], ["MSG", "3"]]
    assert lines[5] == "END 3"
    writer.close()

    status, _ = await stack.api("DELETE", "/v1/services/demo")
    assert status == 204
    assert containers_of(stack.cloudlet) == []
    assert "demo" not in await stack.registered()
    assert (await stack.api("GET", "/v1/services/demo"))[0] == 404
    status, err = await stack.api("DELETE", "/v1/services/demo")
    assert status == 404 and err["error"]["code"] == "not_found"
    with pytest.raises(OSError):  # the session port is closed
        await attach("127.0.0.1", svc["session_port"], sess["session"], timeout=5)


async def test_idempotent_create_and_conflict(stack: Stack, demo_image: str) -> None:
    status, first = await stack.api("PUT", "/v1/services/idem", demo_body(demo_image))
    assert status == 201
    status, again = await stack.api("PUT", "/v1/services/idem", demo_body(demo_image))
    assert status == 200
    assert again["session_port"] == first["session_port"] and again["backend"] == first["backend"]
    status, err = await stack.api("PUT", "/v1/services/idem", demo_body(demo_image, limits={"memory_mb": 128}))
    assert status == 409 and err["error"]["code"] == "conflict"
    assert "different spec" in err["error"]["message"]
    assert containers_of(stack.cloudlet) == [f"cloudlet-{stack.cloudlet}-idem"]
    status, got = await stack.api("GET", "/v1/services/idem")
    assert got["limits"]["memory_mb"] == 64  # the conflict changed nothing


async def test_end_session_through_controller(stack: Stack, demo_image: str) -> None:
    assert (await stack.api("PUT", "/v1/services/ends", demo_body(demo_image)))[0] == 201
    sess, reader, writer = await open_session(stack, "ends")
    status, _ = await stack.api("DELETE", f"/v1/sessions/{sess['session']}")
    assert status == 204
    assert await asyncio.wait_for(reader.read(), 10) == b""  # sessiond closed the ended session
    writer.close()
    with pytest.raises(SessionRefused):  # an ended session's credential is refused
        await attach(sess["host"], sess["port"], sess["session"])
    status, err = await stack.api("DELETE", f"/v1/sessions/{sess['session']}")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err = await stack.api("DELETE", "/v1/sessions/not-a-credential")
    assert status == 400 and err["error"]["code"] == "bad_request"
    assert (await stack.api("POST", "/v1/services/missing/sessions"))[0] == 404


async def test_auth_health_metrics_and_bad_input(stack: Stack, demo_image: str) -> None:
    status, err = await stack.api("GET", "/v1/services", token=None)
    assert status == 401 and err["error"]["code"] == "unauthorized"
    status, err = await stack.api("PUT", "/v1/services/x", demo_body(demo_image), token="wrong-token-wrong-token")
    assert status == 401 and err["error"]["code"] == "unauthorized"
    status, health = await stack.api("GET", "/v1/health", token=None)
    assert status == 200 and health["status"] == "ok" and health["cloudlet"] == stack.cloudlet
    assert health["runtime"] == "podman" and health["checks"] == {"runtime": "ok", "sessiond": "ok"}
    status, text = await stack.api("GET", "/metrics", token=None)
    assert status == 200 and 'cloudlet_controller_requests_total{method="GET",route="/v1/services",status="401"}' in text

    status, err = await stack.api("PUT", "/v1/services/bad", raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    for name, body, needle in [
        ("Bad_Name", demo_body(demo_image), "invalid service name"),
        ("bad", {"image": demo_image}, "port must be"),
        ("bad", {"image": "has space", "port": 1}, "image must be"),
        ("bad", demo_body(demo_image, limits={"cpus": -1}), "limits.cpus"),
        ("bad", demo_body(demo_image, env={"1X": "y"}), "invalid env name"),
        ("bad", demo_body(demo_image, extra=1), "unknown field"),
    ]:
        status, err = await stack.api("PUT", f"/v1/services/{name}", body)
        assert status == 400 and err["error"]["code"] == "bad_request" and needle in err["error"]["message"], err
    status, err = await stack.api("GET", "/v1/nothing")
    assert status == 404 and err["error"]["code"] == "not_found"
    assert containers_of(stack.cloudlet) == [] and await stack.registered() == {}


async def test_runtime_errors_leave_nothing_behind(stack: Stack, demo_image: str) -> None:
    status, err = await stack.api("PUT", "/v1/services/noimg", {"image": "localhost/cltest-missing:1", "port": 7000})
    assert status == 400 and err["error"]["code"] == "image_not_found"
    assert "localhost/cltest-missing:1" in err["error"]["message"]

    status, err = await stack.api("PUT", "/v1/services/crash", demo_body(demo_image, env={"PORT": "x"}))
    assert status == 502 and err["error"]["code"] == "service_failed" and "bad PORT x" in err["error"]["message"]
    assert containers_of(stack.cloudlet) == [] and await stack.registered() == {}


async def test_port_that_never_opens_is_504_and_removed(tmp_path, podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    s = Stack(tmp_path, cloudlet_name, podman_socket, ready_timeout=2)
    try:
        await s.start_sessiond()
        await s.start_controller()
        status, err = await s.api("PUT", "/v1/services/slow", {"image": demo_image, "port": 7999})
        assert status == 504 and err["error"]["code"] == "port_timeout"
        assert "within 2 s" in err["error"]["message"]
        assert containers_of(cloudlet_name) == [] and await s.registered() == {}
    finally:
        await s.close()


async def test_runtime_down_and_sessiond_down(tmp_path, podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    s = Stack(tmp_path, cloudlet_name, podman_socket)
    s.write_controller_config(podman_socket=str(tmp_path / "no-podman.sock"))
    try:
        await s.start_sessiond()
        await s.start_controller()
        status, err = await s.api("PUT", "/v1/services/demo", demo_body(demo_image))
        assert status == 503 and err["error"]["code"] == "runtime_unavailable"
        status, health = await s.api("GET", "/v1/health", token=None)
        assert health["status"] == "degraded" and health["checks"]["runtime"].startswith("error")
        assert await s.registered() == {}

        s.kill_controller()
        s.write_controller_config()
        await s.start_controller()
        s.kill_sessiond()
        status, err = await s.api("PUT", "/v1/services/demo", demo_body(demo_image))
        assert status == 503 and err["error"]["code"] == "sessiond_unavailable"
        assert containers_of(cloudlet_name) == []
    finally:
        await s.close()


async def test_restart_of_both_daemons_rebuilds_state_from_labels(stack: Stack, demo_image: str) -> None:
    ports = {}
    for name in ("r1", "r2"):
        status, svc = await stack.api("PUT", f"/v1/services/{name}", demo_body(demo_image))
        assert status == 201
        ports[name] = svc["session_port"]
    before = containers_of(stack.cloudlet)

    # both die hard; sessiond also loses its saved state, so only the runtime's labels remain
    stack.kill_controller()
    stack.kill_sessiond()
    shutil.rmtree(stack.dir / "sessiond-state")
    await stack.start_sessiond()
    assert await stack.registered() == {}
    await stack.start_controller()

    async def restored() -> bool:
        reg = await stack.registered()
        return {n: r["port"] for n, r in reg.items()} == ports

    await poll(restored, 30, "reconcile to register r1 and r2 on their old ports")
    assert containers_of(stack.cloudlet) == before  # no duplicates
    _, reader, writer = await open_session(stack, "r1")
    writer.write(b"PING\n")
    assert await read_line(reader) == "PONG"
    writer.close()

    # the controller alone restarts: creates are still idempotent, nothing is duplicated
    stack.kill_controller()
    await stack.start_controller()
    status, again = await stack.api("PUT", "/v1/services/r2", demo_body(demo_image))
    assert status == 200 and again["session_port"] == ports["r2"]
    assert containers_of(stack.cloudlet) == before


async def test_reconcile_removes_registration_of_vanished_container(stack: Stack, demo_image: str) -> None:
    from support.controller import podman

    assert (await stack.api("PUT", "/v1/services/gone", demo_body(demo_image)))[0] == 201
    podman("rm", "-f", "-t", "0", f"cloudlet-{stack.cloudlet}-gone")

    async def unregistered() -> bool:
        return "gone" not in await stack.registered()

    await poll(unregistered, 30, "reconcile to drop the dangling registration")
    assert (await stack.api("GET", "/v1/services/gone"))[0] == 404


async def test_concurrent_creates(stack: Stack, demo_image: str) -> None:
    results = await asyncio.gather(
        stack.api("PUT", "/v1/services/c1", demo_body(demo_image)),
        stack.api("PUT", "/v1/services/c2", demo_body(demo_image)),
        stack.api("PUT", "/v1/services/c1", demo_body(demo_image)),
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 201, 201], results
    ports = {body["name"]: body["session_port"] for _, body in results}
    assert ports["c1"] != ports["c2"]
    assert containers_of(stack.cloudlet) == [f"cloudlet-{stack.cloudlet}-c1", f"cloudlet-{stack.cloudlet}-c2"]
    reg = await stack.registered()
    assert {n: r["port"] for n, r in reg.items()} == ports


async def test_session_keeps_the_demo_connection_state_across_a_detach(stack: Stack, demo_image: str) -> None:
    from cloudlet.client import SessionClient

    assert (await stack.api("PUT", "/v1/services/keep", demo_body(demo_image)))[0] == 201
    status, sess = await stack.api("POST", "/v1/services/keep/sessions")
    assert status == 201
    client = SessionClient(sess["host"], sess["port"], sess["session"])
    try:
        await client.open()

        async def line() -> str:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await asyncio.wait_for(client.recv(1), 10)
                assert chunk, "session closed"
                buf += chunk
            return buf.decode().rstrip("\n")

        assert (await line()).startswith("HELLO cloudlet-demo")
        await client.send(b"INCR\nINCR\n")
        assert [await line(), await line()] == ["COUNT 1", "COUNT 2"]
        await client.detach()  # FIN: the session and its upstream connection stay
        await client.resume()
        await client.send(b"INCR\n")
        assert await line() == "COUNT 3"  # same upstream connection, same per-connection state
    finally:
        await client.close()


async def test_reconcile_starts_a_stopped_container_again(stack: Stack, demo_image: str) -> None:
    from support.controller import podman

    status, svc = await stack.api("PUT", "/v1/services/boot", demo_body(demo_image))
    assert status == 201
    name = f"cloudlet-{stack.cloudlet}-boot"
    started = podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip()
    # as after a host reboot; the controller may start it again (on the `died` event) before the
    # CLI's own cleanup finishes, and `podman stop` then exits 125: the restart below is what counts
    podman("stop", "-t", "0", name, check=False)

    async def running_again() -> bool:
        _, got = await stack.api("GET", "/v1/services/boot")
        reg = (await stack.registered()).get("boot")
        restarted = podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip() != started
        return restarted and got["state"] == "running" and reg is not None and reg["backend"] == got["backend"]

    await poll(running_again, 30, "reconcile to start the container and register its backend")
    _, reader, writer = await open_session(stack, "boot")
    writer.write(b"PING\n")
    assert await read_line(reader) == "PONG"
    writer.close()
    assert containers_of(stack.cloudlet) == [f"cloudlet-{stack.cloudlet}-boot"]
    assert (await stack.registered())["boot"]["port"] == svc["session_port"]

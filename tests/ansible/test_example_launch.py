"""cloudlet.fleet end to end: ansible-playbook runs playbooks/example_launch.yml against real cloudlets.

Each cloudlet is a real ``cloudlet controller`` (podman runtime) and ``cloudlet sessiond``; the
playbook reaches them through the cloudlet.fleet modules, with the token read from the inventory's
credentials directory. Containers are checked with podman itself and services through the controller
API; sessions are checked by talking to the demo service through its session port.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from cloudlet.client import attach
from support.ansible_fleet import Fleet, containers_of, podman

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def container_ids(cloudlet: str, *filters: str) -> list[str]:
    """IDs of the cloudlet's containers (any state, or as ``filters`` say)."""
    args = ["ps", "-a", "--format", "{{.ID}}", "--filter", f"label=cloudlet.cloudlet={cloudlet}"]
    for extra in filters:
        args += ["--filter", extra]
    return sorted(podman(*args).stdout.split())


async def test_example_playbook_launches_on_every_cloudlet_idempotently_and_removes(fleet2: Fleet) -> None:
    names = fleet2.names

    first = fleet2.playbook()
    assert first.returncode == 0, first.output
    assert first.changed() == {name: 1 for name in names}, first.output
    services = {}
    for stack in fleet2.stacks:
        assert containers_of(stack.cloudlet) == [f"cloudlet-{stack.cloudlet}-echo"]
        status, service = await stack.api("GET", "/v1/services/echo")
        assert status == 200, service
        assert service["state"] == "running"
        assert service["image"] == "localhost/cloudlet-demo:latest"
        assert service["limits"] == {"cpus": 0.5, "memory_mb": 64}
        assert f"is running; devices connect to session port {service['session_port']}" in first.flat
        services[stack.cloudlet] = service
    ids = {name: container_ids(name) for name in names}
    assert all(len(found) == 1 for found in ids.values()), ids
    assert {name: container_ids(name, "status=running") for name in names} == ids

    second = fleet2.playbook()
    assert second.returncode == 0, second.output
    assert second.changed() == {name: 0 for name in names}, second.output
    assert {name: container_ids(name) for name in names} == ids

    # Check mode predicts without writing: nothing to do for the same spec, a removal for absent.
    check_same = fleet2.playbook("--check")
    assert check_same.returncode == 0, check_same.output
    assert check_same.changed() == {name: 0 for name in names}, check_same.output
    check_absent = fleet2.playbook("--check", "--diff", "-e", "example_launch_state=absent")
    assert check_absent.returncode == 0, check_absent.output
    assert check_absent.changed() == {name: 1 for name in names}, check_absent.output
    assert "localhost/cloudlet-demo:latest" in check_absent.stdout  # the diff's "before"
    check_new = fleet2.playbook("--check", "-e", "example_launch_name=echo2")
    assert check_new.changed() == {name: 1 for name in names}, check_new.output
    assert {name: container_ids(name) for name in names} == ids

    # A different spec is a conflict: the task fails, names the cloudlet, leaves the service alone.
    conflict = fleet2.playbook("-e", "example_launch_port=7001")
    assert conflict.returncode != 0
    assert conflict.failed() == {name: 1 for name in names}, conflict.output
    for name in names:
        assert f"Ensuring service 'echo' on cloudlet '{name}'" in conflict.flat
    assert "conflicting service spec" in conflict.flat
    assert {name: container_ids(name) for name in names} == ids

    # The session module on the same cloudlets: issue a credential, use it, end the session.
    host = names[0]
    stack = fleet2.stacks[0]
    env = fleet2.env(CLOUDLET_CONTROLLER_URL=stack.controller_url, CLOUDLET_CONTROLLER_TOKEN=fleet2.token)
    run, issued = fleet2.module(host, "cloudlet.fleet.session", {"name": "echo"}, env=env)
    assert run.returncode == 0, run.output
    assert issued["changed"] is False  # issuing stores nothing on the cloudlet (the module's docs)
    assert issued["port"] == services[host]["session_port"] and issued["cloudlet"] == host
    reader, writer, _ = await attach(issued["host"], issued["port"], issued["session"])
    try:
        greeting = await asyncio.wait_for(reader.readline(), 10)
        assert greeting.startswith(b"HELLO cloudlet-demo")
        writer.write(b"PING\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"PONG\n"
        run, ended = fleet2.module(host, "cloudlet.fleet.session",
                                   {"state": "absent", "session": issued["session"]}, env=env)
        assert run.returncode == 0, run.output
        assert ended["changed"] is True
        assert await asyncio.wait_for(reader.read(), 10) == b""  # sessiond closed the ended session
    finally:
        writer.close()
    run, again = fleet2.module(host, "cloudlet.fleet.session", {"state": "absent", "session": issued["session"]}, env=env)
    assert again["changed"] is False, run.output

    run, info = fleet2.module(host, "cloudlet.fleet.service_info", {}, env=env)
    assert [s["name"] for s in info["services"]] == ["echo"], run.output

    # recreate=true replaces the service with the new spec: a new container, listening on 7001.
    new_spec = '{"example_launch_port": 7001, "example_launch_env": {"PORT": "7001"}, "example_launch_recreate": true}'
    recreated = fleet2.playbook("-e", new_spec)
    assert recreated.returncode == 0, recreated.output
    assert recreated.changed() == {name: 1 for name in names}, recreated.output
    for stack in fleet2.stacks:
        status, service = await stack.api("GET", "/v1/services/echo")
        assert status == 200 and service["port"] == 7001 and service["env"] == {"PORT": "7001"}, service
        assert service["state"] == "running"
        new_ids = container_ids(stack.cloudlet)
        assert len(new_ids) == 1 and new_ids != ids[stack.cloudlet]
    recreated_again = fleet2.playbook("-e", new_spec)
    assert recreated_again.changed() == {name: 0 for name in names}, recreated_again.output

    absent = fleet2.playbook("-e", "example_launch_state=absent")
    assert absent.returncode == 0, absent.output
    assert absent.changed() == {name: 1 for name in names}, absent.output
    for stack in fleet2.stacks:
        assert containers_of(stack.cloudlet) == []
        status, _ = await stack.api("GET", "/v1/services/echo")
        assert status == 404
    absent_again = fleet2.playbook("-e", "example_launch_state=absent")
    assert absent_again.changed() == {name: 0 for name in names}, absent_again.output


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_errors_name_the_cloudlet_and_the_cause_and_leave_nothing(fleet1: Fleet) -> None:
    name = fleet1.names[0]
    url = fleet1.stacks[0].controller_url

    wrong_token = fleet1.playbook("-e", "cloudlet_controller_token=cltest-wrong-token-9f2")
    assert wrong_token.returncode != 0
    assert f"on cloudlet '{name}' (controller {url}) failed: wrong controller token (401 unauthorized)" in wrong_token.flat
    assert "cltest-wrong-token-9f2" not in wrong_token.flat  # no_log

    unknown_image = fleet1.playbook("-e", "example_launch_image=localhost/cltest-missing:1")
    assert unknown_image.returncode != 0
    assert f"on cloudlet '{name}' (controller {url}) failed: unknown image" in unknown_image.flat
    assert "localhost/cltest-missing:1" in unknown_image.flat
    assert containers_of(name) == []

    dead = f"http://127.0.0.1:{closed_port()}"
    unreachable = fleet1.playbook("-e", f"cloudlet_controller_url={dead}")
    assert unreachable.returncode != 0
    assert f"on cloudlet at controller {dead} failed: controller unreachable" in unreachable.flat

    status, body = await fleet1.stacks[0].api("GET", "/v1/services")
    assert status == 200 and body["services"] == []

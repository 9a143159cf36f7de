"""The podman runtime against real podman: containers, labels, network, limits, errors, cleanup."""

from __future__ import annotations

import asyncio
import json

import pytest
from cloudlet.controller.runtime.base import (
    LABEL_CLOUDLET,
    LABEL_SERVICE,
    LABEL_SESSION_PORT,
    LABEL_SPEC,
    LABEL_SPEC_HASH,
    ImageNotFound,
    PortTimeout,
    RuntimeUnavailable,
    ServiceFailed,
    ServiceSpec,
)
from cloudlet.controller.runtime.podman import PodmanRuntime
from support.controller import containers_of, podman, read_line

pytestmark = pytest.mark.podman


def demo_spec(image: str, name: str = "demo", **extra: object) -> ServiceSpec:
    body = {"image": image, "port": 7000, "env": {"PORT": "7000"}, **extra}
    return ServiceSpec.from_request(name, body)


async def test_create_labels_network_limits_and_delete(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    spec = demo_spec(demo_image, limits={"cpus": 0.5, "memory_mb": 64})
    try:
        inst = await rt.create(spec, 31555, ready_timeout=30)
        assert inst.state == "running"
        assert inst.session_port == 31555
        host, port = inst.backend.rsplit(":", 1)
        assert port == "7000"
        # the port accepts connections and the demo service greets us
        reader, writer = await asyncio.open_connection(host, 7000)
        assert (await read_line(reader)).startswith("HELLO cloudlet-demo")
        writer.write(b"INCR\nINCR\n")
        assert [await read_line(reader), await read_line(reader)] == ["COUNT 1", "COUNT 2"]
        writer.close()

        info = json.loads(podman("inspect", f"cloudlet-{cloudlet_name}-demo").stdout)[0]
        labels = info["Config"]["Labels"]
        assert labels[LABEL_SERVICE] == "demo"
        assert labels[LABEL_CLOUDLET] == cloudlet_name
        assert labels[LABEL_SESSION_PORT] == "31555"
        assert labels[LABEL_SPEC_HASH] == spec.hash()
        assert ServiceSpec.from_json(json.loads(labels[LABEL_SPEC])) == spec
        assert list(info["NetworkSettings"]["Networks"]) == [f"cloudlet-{cloudlet_name}"]
        assert info["NetworkSettings"]["Networks"][f"cloudlet-{cloudlet_name}"]["IPAddress"] == host
        hc = info["HostConfig"]
        assert hc["Memory"] == 64 * 1024 * 1024
        assert hc["CpuQuota"] == 50_000 and hc["CpuPeriod"] == 100_000
        ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]}
        assert ulimits["RLIMIT_NOFILE"] == (1024, 1024)
        assert ulimits["RLIMIT_NPROC"] == (4096, 4096)

        # state rebuilds from labels alone
        listed = await PodmanRuntime(cloudlet_name, podman_socket).list()
        assert [(i.spec, i.session_port, i.backend, i.state) for i in listed] == [
            (spec, 31555, inst.backend, "running")
        ]
        assert await rt.get("demo") == listed[0]
        assert await rt.get("nope") is None
        assert await rt.delete("demo") is True
        assert await rt.delete("demo") is False
        assert await rt.get("demo") is None
        assert containers_of(cloudlet_name) == []
        assert await rt.list() == []
    finally:
        await rt.close()


async def test_list_ignores_other_cloudlets(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    other = f"{cloudlet_name}-x"
    rt, rt_other = PodmanRuntime(cloudlet_name, podman_socket), PodmanRuntime(other, podman_socket)
    try:
        await rt_other.create(demo_spec(demo_image), 31556, ready_timeout=30)
        assert await rt.list() == []
        assert [i.name for i in await rt_other.list()] == ["demo"]
    finally:
        await rt_other.delete("demo")
        podman("network", "rm", "-f", f"cloudlet-{other}", check=False)
        await rt.close()
        await rt_other.close()


async def test_unknown_image_leaves_nothing(podman_socket: str, cloudlet_name: str) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    try:
        with pytest.raises(ImageNotFound, match="localhost/cltest-no-such-image:1"):
            await rt.create(demo_spec("localhost/cltest-no-such-image:1"), 31557, ready_timeout=10)
        assert containers_of(cloudlet_name) == []
    finally:
        await rt.close()


async def test_port_that_never_opens_times_out_and_is_removed(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    spec = ServiceSpec.from_request("wrongport", {"image": demo_image, "port": 7001})  # demo listens on 7000
    try:
        with pytest.raises(PortTimeout, match="did not accept connections within 2 s"):
            await rt.create(spec, 31558, ready_timeout=2)
        assert containers_of(cloudlet_name) == []
    finally:
        await rt.close()


async def test_container_that_exits_is_reported_with_its_output(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    spec = demo_spec(demo_image, env={"PORT": "not-a-port"})
    try:
        with pytest.raises(ServiceFailed, match="bad PORT not-a-port"):
            await rt.create(spec, 31559, ready_timeout=30)
        assert containers_of(cloudlet_name) == []
    finally:
        await rt.close()


async def test_stopped_container_is_started_again(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    try:
        await rt.create(demo_spec(demo_image), 31560, ready_timeout=30)
        podman("stop", "-t", "0", f"cloudlet-{cloudlet_name}-demo")
        [stopped] = await rt.list()
        assert stopped.state == "failed" and stopped.backend is None
        again = await rt.ensure_running(stopped)
        assert again.state == "running" and again.backend
        reader, writer = await asyncio.open_connection(*again.backend.rsplit(":", 1))
        assert (await read_line(reader)).startswith("HELLO")
        writer.close()
    finally:
        await rt.delete("demo")
        await rt.close()


async def test_unreachable_socket_is_runtime_unavailable(tmp_path) -> None:
    rt = PodmanRuntime("cltest-none", str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(RuntimeUnavailable, match="missing.sock"):
            await rt.ping()
        with pytest.raises(RuntimeUnavailable):
            await rt.list()
    finally:
        await rt.close()


def test_readiness_probe_only_targets_local_links(tmp_path) -> None:
    from cloudlet.controller.runtime.podman import on_local_link

    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default via 192.0.2.1
        "podman1\t0001590A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 10.89.1.0/24
    )
    assert on_local_link("10.89.1.7", str(table))
    assert not on_local_link("10.89.2.7", str(table))  # only the default route: never probe it
    assert not on_local_link("not-an-ip", str(table))


async def test_foreign_container_with_the_same_name_is_a_clear_conflict(podman_socket: str, demo_image: str, cloudlet_name: str) -> None:
    name = f"cloudlet-{cloudlet_name}-demo"
    podman("create", "--name", name, "--label", f"cloudlet.cloudlet={cloudlet_name}", demo_image)
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    try:
        assert await rt.get("demo") is None  # no readable spec label: not one of ours
        with pytest.raises(Exception, match=f"podman rm -f {name}") as info:
            await rt.create(demo_spec(demo_image), 31561, ready_timeout=10)
        assert getattr(info.value, "code", None) == "conflict" and getattr(info.value, "status", None) == 409
        assert containers_of(cloudlet_name) == [name]  # the foreign container is left alone
    finally:
        await rt.close()

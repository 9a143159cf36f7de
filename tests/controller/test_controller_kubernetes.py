"""The controller process with ``runtime = "kubernetes"``: the real `cloudlet controller` and
`cloudlet sessiond`, with the Kubernetes API test server standing in for k3s.

No client connects through the session port here: the ClusterIP backend exists only in the test
server, and test traffic must not leave the machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support.controller import Stack, poll
from support.k8s_fake import FakeKubernetes, kubeconfig_for

pytestmark = pytest.mark.slow


@pytest.fixture
async def k8s_stack(tmp_path, cloudlet_name: str) -> AsyncIterator[tuple[Stack, FakeKubernetes]]:
    fake = FakeKubernetes()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_for(f"http://127.0.0.1:{port}"))
    s = Stack(tmp_path, cloudlet_name, podman_socket=str(tmp_path / "unused-podman.sock"))
    s.write_controller_config(kubeconfig=str(kubeconfig))
    try:
        await s.start_sessiond()
        await s.start_controller()
        yield s, fake
    finally:
        await s.close()
        await runner.cleanup()


async def test_kubernetes_controller_registers_cluster_ip_and_cleans_up(k8s_stack: tuple[Stack, FakeKubernetes]) -> None:
    stack, fake = k8s_stack
    body = {"image": "localhost/cloudlet-demo:latest", "port": 7000, "limits": {"cpus": 0.5}}
    status, svc = await stack.api("PUT", "/v1/services/web", body)
    assert status == 201, svc
    cluster_ip = fake.services[("edge", "cloudlet-web")]["spec"]["clusterIP"]
    assert svc["runtime"] == "kubernetes" and svc["backend"] == f"{cluster_ip}:7000" and svc["state"] == "running"
    [pod] = fake.sent("POST", "pods")
    assert pod["metadata"]["labels"]["cloudlet.session-port"] == str(svc["session_port"])
    assert pod["metadata"]["labels"]["cloudlet.cloudlet"] == stack.cloudlet
    reg = (await stack.registered())["web"]
    assert reg["backend"] == svc["backend"] and reg["port"] == svc["session_port"]

    status, again = await stack.api("PUT", "/v1/services/web", body)
    assert status == 200 and again["session_port"] == svc["session_port"]
    assert len(fake.sent("POST", "pods")) == 1  # idempotent: no second Pod
    status, health = await stack.api("GET", "/v1/health", token=None)
    assert health["runtime"] == "kubernetes" and health["checks"]["runtime"] == "ok"

    status, _ = await stack.api("DELETE", "/v1/services/web")
    assert status == 204
    assert fake.pods == {} and fake.services == {}
    assert await stack.registered() == {}


async def test_kubernetes_errors_leave_nothing(k8s_stack: tuple[Stack, FakeKubernetes]) -> None:
    stack, fake = k8s_stack
    status, err = await stack.api("PUT", "/v1/services/nope", {"image": "localhost/cltest-missing:1", "port": 7000})
    assert status == 400 and err["error"]["code"] == "image_not_found"
    fake.fail[("POST", "pods")] = (503, "ServiceUnavailable")
    status, err = await stack.api("PUT", "/v1/services/down", {"image": "localhost/cloudlet-demo:latest", "port": 7000})
    assert status == 503 and err["error"]["code"] == "runtime_unavailable"
    assert fake.pods == {} and fake.services == {}
    assert await stack.registered() == {}


async def test_kubernetes_restart_rebuilds_registration_from_labels(k8s_stack: tuple[Stack, FakeKubernetes]) -> None:
    stack, fake = k8s_stack
    status, svc = await stack.api("PUT", "/v1/services/keep", {"image": "localhost/cloudlet-demo:latest", "port": 7000})
    assert status == 201
    stack.kill_controller()
    stack.kill_sessiond()
    import shutil

    shutil.rmtree(stack.dir / "sessiond-state")
    await stack.start_sessiond()
    await stack.start_controller()

    async def restored() -> bool:
        reg = (await stack.registered()).get("keep")
        return bool(reg) and reg["port"] == svc["session_port"] and reg["backend"] == svc["backend"]

    await poll(restored, 30, "reconcile to register keep from the Pod's labels")
    assert len(fake.sent("POST", "pods")) == 1

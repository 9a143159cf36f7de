"""The event path of the kubernetes runtime: a Pod watch, against the Kubernetes API test server.

The real `cloudlet controller` runs with ``reconcile_interval_seconds = 60``, so after its start pass
only the watch can explain what happens; the test server plays the kubelet (``set_ready``) and
someone deleting the Pod (``remove_pod``), and records the exact watch request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from support.controller import LONG_INTERVAL, Stack, metric, metrics_text, poll
from support.k8s_fake import FakeKubernetes, kubeconfig_for

pytestmark = pytest.mark.slow


@pytest.fixture
async def k8s_slow_stack(tmp_path: Path, cloudlet_name: str) -> AsyncIterator[tuple[Stack, FakeKubernetes]]:
    fake = FakeKubernetes()
    runner = web.AppRunner(fake.app(), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_for(f"http://127.0.0.1:{port}"))
    s = Stack(tmp_path, cloudlet_name, podman_socket=str(tmp_path / "unused-podman.sock"),
              reconcile_interval=LONG_INTERVAL)
    s.write_controller_config(kubeconfig=str(kubeconfig))
    try:
        await s.start_sessiond()
        await s.start_controller()
        yield s, fake
    finally:
        await s.close()
        await runner.cleanup()


async def test_pod_watch_unregisters_and_registers_at_once(k8s_slow_stack: tuple[Stack, FakeKubernetes]) -> None:
    stack, fake = k8s_slow_stack

    async def connected() -> bool:
        _, health = await stack.api("GET", "/v1/health", token=None)
        return health["runtime_events"] == "connected"  # type: ignore[index]

    await poll(connected, 30, "the controller's Pod watch")
    status, svc = await stack.api("PUT", "/v1/services/web", {"image": "localhost/cloudlet-demo:latest", "port": 7000})
    assert status == 201, svc
    assert (await stack.registered())["web"]["backend"] == svc["backend"]  # type: ignore[index]

    fake.set_ready("edge", "cloudlet-web", False)  # the kubelet's probe fails

    async def unregistered() -> bool:
        return "web" not in await stack.registered()

    await poll(unregistered, 25, "the unready Pod's registration to go")
    fake.set_ready("edge", "cloudlet-web", True)

    async def registered() -> bool:
        reg = (await stack.registered()).get("web")
        return reg is not None and reg["backend"] == svc["backend"] and reg["port"] == svc["session_port"]  # type: ignore[index]

    await poll(registered, 25, "the ready Pod to be registered again")
    fake.remove_pod("edge", "cloudlet-web")  # deleted behind the controller's back
    await poll(unregistered, 25, "the deleted Pod's registration to go")

    text = await metrics_text(stack)
    assert metric(text, "cloudlet_controller_reconcile_passes_total", trigger="interval") == 0
    for action in ("start", "ready", "unready", "remove"):
        assert metric(text, "cloudlet_controller_runtime_events_total", action=action) >= 1, action

    watches = [r for r in fake.requests if r.method == "GET" and r.path == "/api/v1/namespaces/edge/pods"
               and r.query.get("watch", "").lower() == "true"]
    assert watches, fake.requests
    lists = [r for r in fake.requests if r.method == "GET" and r.path == "/api/v1/namespaces/edge/pods"
             and "watch" not in r.query]
    assert lists[0].query["labelSelector"] == f"cloudlet.cloudlet={stack.cloudlet}"
    first = watches[0].query
    assert first["labelSelector"] == f"cloudlet.cloudlet={stack.cloudlet}"
    assert first["timeoutSeconds"] == "50" and int(first["resourceVersion"]) >= 1

"""The kubernetes runtime against a Kubernetes API test server, and against a real cluster.

No Kubernetes server can run on these machines (docs/controller.md), so the behaviour suite runs
against ``k8s_fake.FakeKubernetes`` and asserts the exact Pod and Service objects sent. The same
behaviour suite runs against a real cluster (k3s) when ``KUBECONFIG`` points at one; the cluster
must have the demo image (``CLOUDLET_TEST_IMAGE``, default localhost/cloudlet-demo:latest) imported.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from cloudlet.controller.config import ConfigError, KubernetesConfig
from cloudlet.controller.runtime.base import (
    ImageNotFound,
    PortTimeout,
    RuntimeUnavailable,
    ServiceFailed,
    ServiceSpec,
)
from cloudlet.controller.runtime.kubernetes import KubernetesApiError, KubernetesRuntime
from support.controller import free_port
from support.k8s_fake import FakeKubernetes, kubeconfig_for

IMAGE = os.environ.get("CLOUDLET_TEST_IMAGE", "localhost/cloudlet-demo:latest")


@dataclass
class Target:
    runtime: KubernetesRuntime
    fake: FakeKubernetes | None  # None: a real cluster


@pytest.fixture(params=["fake", "real"])
async def k8s(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Target]:  # type: ignore[no-untyped-def]
    cloudlet = f"cltest-{secrets.token_hex(4)}"
    if request.param == "real":
        if not os.environ.get("KUBECONFIG"):
            pytest.skip("KUBECONFIG is not set: no real Kubernetes cluster to run the suite against")
        cfg = KubernetesConfig(kubeconfig=os.environ["KUBECONFIG"],
                               namespace=os.environ.get("CLOUDLET_TEST_NAMESPACE", "default"))
        rt = KubernetesRuntime.from_config(cloudlet, cfg)
        try:
            yield Target(rt, None)
        finally:
            for inst in await rt.list():
                await rt.delete(inst.name)
            await rt.close()
        return
    fake = FakeKubernetes()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_for(f"http://127.0.0.1:{port}"))
    rt = KubernetesRuntime.from_config(cloudlet, KubernetesConfig(kubeconfig=str(kubeconfig), namespace="edge"))
    try:
        yield Target(rt, fake)
    finally:
        await rt.close()
        await runner.cleanup()


def spec(name: str = "demo", image: str = IMAGE, port: int = 7000, **extra: object) -> ServiceSpec:
    return ServiceSpec.from_request(name, {"image": image, "port": port, **extra})


def only_fake(k8s: Target) -> FakeKubernetes:
    if k8s.fake is None:
        pytest.skip("asserts on the exact requests, which only the test server records")
    return k8s.fake


# -- behaviour (fake and real) -----------------------------------------------------------------

async def test_create_list_delete(k8s: Target) -> None:
    s = spec(env={"PORT": "7000"}, limits={"cpus": 0.25, "memory_mb": 64})
    await k8s.runtime.ping()
    inst = await k8s.runtime.create(s, 31010, ready_timeout=60)
    assert inst.state == "running" and inst.session_port == 31010
    assert inst.backend is not None and inst.backend.endswith(":7000")
    [listed] = await k8s.runtime.list()
    assert (listed.spec, listed.session_port, listed.backend, listed.state) == (s, 31010, inst.backend, "running")
    assert await k8s.runtime.get("demo") == listed
    assert await k8s.runtime.get("nope") is None
    assert await k8s.runtime.delete("demo") is True
    assert await k8s.runtime.delete("demo") is False
    assert await k8s.runtime.list() == []


async def test_unknown_image_removes_pod_and_service(k8s: Target) -> None:
    with pytest.raises(ImageNotFound, match="ErrImagePull|ImagePullBackOff"):
        await k8s.runtime.create(spec(image="localhost/cltest-missing:1"), 31011, ready_timeout=60)
    assert await k8s.runtime.list() == []


async def test_never_ready_times_out_and_removes_both(k8s: Target) -> None:
    with pytest.raises(PortTimeout, match="did not become Ready"):
        await k8s.runtime.create(spec(port=7999), 31012, ready_timeout=1.5)
    assert await k8s.runtime.list() == []


async def test_crashing_container_is_service_failed(k8s: Target) -> None:
    with pytest.raises(ServiceFailed, match="CrashLoopBackOff|exited"):
        await k8s.runtime.create(spec(env={"PORT": "x"}), 31013, ready_timeout=60)
    assert await k8s.runtime.list() == []


# -- exact requests (fake only) ----------------------------------------------------------------

async def test_exact_pod_and_service_objects(k8s: Target) -> None:
    fake = only_fake(k8s)
    s = spec(env={"PORT": "7000", "A": "b"}, limits={"cpus": 0.5, "memory_mb": 128})
    inst = await k8s.runtime.create(s, 31020, ready_timeout=10)
    cl = k8s.runtime.cloudlet
    [pod] = fake.sent("POST", "pods")
    [svc] = fake.sent("POST", "services")
    created = pod["metadata"]["labels"]["cloudlet.created"]
    labels = {
        "cloudlet.service": "demo",
        "cloudlet.cloudlet": cl,
        "cloudlet.session-port": "31020",
        "cloudlet.spec-hash": s.hash(),
        "cloudlet.created": created,
    }
    metadata = {"name": "cloudlet-demo", "namespace": "edge", "labels": labels,
                "annotations": {"cloudlet.spec": s.canonical()}}
    assert pod == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [{
                "name": "service",
                "image": IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 7000, "protocol": "TCP"}],
                "env": [{"name": "A", "value": "b"}, {"name": "PORT", "value": "7000"}],
                "readinessProbe": {"tcpSocket": {"port": 7000}, "periodSeconds": 1, "failureThreshold": 1},
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"},
                              "requests": {"cpu": "500m", "memory": "128Mi"}},
            }],
            "restartPolicy": "Always",
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
        },
    }
    assert svc == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {"cloudlet.service": "demo", "cloudlet.cloudlet": cl},
            "ports": [{"name": "service", "port": 7000, "targetPort": 7000, "protocol": "TCP"}],
        },
    }
    assert json.loads(pod["metadata"]["annotations"]["cloudlet.spec"])["image"] == IMAGE
    stored_ip = fake.services[("edge", "cloudlet-demo")]["spec"]["clusterIP"]
    assert inst.backend == f"{stored_ip}:7000"
    # Pods and Services go to the configured namespace; lists select by this cloudlet's label
    await k8s.runtime.list()
    lists = [r for r in fake.requests if r.method == "GET" and r.path.endswith(("/pods", "/services"))]
    assert {r.path for r in lists} == {"/api/v1/namespaces/edge/pods", "/api/v1/namespaces/edge/services"}
    assert all(r.query["labelSelector"] == f"cloudlet.cloudlet={cl}" for r in lists)
    # delete removes both with no grace period
    await k8s.runtime.delete("demo")
    deletes = [(r.path, r.query.get("gracePeriodSeconds")) for r in fake.requests if r.method == "DELETE"]
    assert deletes == [("/api/v1/namespaces/edge/services/cloudlet-demo", "0"),
                       ("/api/v1/namespaces/edge/pods/cloudlet-demo", "0")]


async def test_other_cloudlets_pods_are_ignored(k8s: Target) -> None:
    fake = only_fake(k8s)
    other = KubernetesRuntime(f"{k8s.runtime.cloudlet}-x", k8s.runtime.api_client, "edge")
    await other.create(spec("other"), 31021, ready_timeout=10)
    assert await k8s.runtime.list() == []
    assert [i.name for i in await other.list()] == ["other"]
    assert ("edge", "cloudlet-other") in fake.pods


async def test_api_errors(k8s: Target) -> None:
    fake = only_fake(k8s)
    fake.fail[("POST", "pods")] = (500, "InternalError")
    with pytest.raises(RuntimeUnavailable, match="500"):
        await k8s.runtime.create(spec(), 31022, ready_timeout=10)
    assert fake.pods == {} and fake.services == {}

    fake.fail = {("POST", "pods"): (403, "Forbidden")}
    with pytest.raises(KubernetesApiError, match="403 Forbidden") as info:
        await k8s.runtime.create(spec(), 31022, ready_timeout=10)
    assert info.value.code == "runtime_unavailable"

    # the Service is refused after the Pod was created: the Pod is removed again
    fake.fail = {("POST", "services"): (422, "Invalid")}
    with pytest.raises(KubernetesApiError, match="422") as info:
        await k8s.runtime.create(spec(), 31022, ready_timeout=10)
    assert info.value.code == "bad_request"
    assert fake.pods == {} and fake.services == {}
    assert [r.path for r in fake.requests if r.method == "DELETE"][-1] == "/api/v1/namespaces/edge/pods/cloudlet-demo"


async def test_leftover_service_is_replaced_and_missing_service_recreated(k8s: Target) -> None:
    fake = only_fake(k8s)
    leftover = k8s.runtime.service_manifest(spec(), 31023, 1.0)
    fake.services[("edge", "cloudlet-demo")] = {**leftover, "spec": {**leftover["spec"], "clusterIP": "10.43.9.9"}}
    inst = await k8s.runtime.create(spec(), 31023, ready_timeout=10)
    assert inst.backend != "10.43.9.9:7000"
    del fake.services[("edge", "cloudlet-demo")]  # someone deleted the Service
    [broken] = await k8s.runtime.list()
    assert broken.state == "failed" and broken.backend is None
    fixed = await k8s.runtime.ensure_running(broken)
    assert fixed.state == "running"
    assert fixed.backend == f"{fake.services[('edge', 'cloudlet-demo')]['spec']['clusterIP']}:7000"


async def test_unreachable_api_server(tmp_path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_for(f"http://127.0.0.1:{free_port()}"))
    rt = KubernetesRuntime.from_config("cltest-k", KubernetesConfig(kubeconfig=str(kubeconfig)))
    try:
        with pytest.raises(RuntimeUnavailable, match="unreachable"):
            await rt.ping()
        with pytest.raises(RuntimeUnavailable):
            await rt.create(spec(), 31030, ready_timeout=5)
    finally:
        await rt.close()


def test_missing_kubeconfig_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="kubernetes.kubeconfig"):
        KubernetesRuntime.from_config("cltest-k", KubernetesConfig(kubeconfig=str(tmp_path / "none.yaml")))

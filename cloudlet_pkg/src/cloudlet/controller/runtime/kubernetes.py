"""The Kubernetes runtime (k3s in production): a Pod and a ClusterIP Service per service.

Uses the official ``kubernetes`` client; its blocking calls run in a worker thread
(``asyncio.to_thread``), so the controller's event loop never waits on the API server. Objects are
sent as plain dicts (built by :meth:`KubernetesRuntime.pod_manifest` and
:meth:`KubernetesRuntime.service_manifest`), so tests can compare them exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from cloudlet.common.logs import event
from cloudlet.common.names import is_name
from cloudlet.controller.runtime.base import (
    LABEL_CLOUDLET,
    LABEL_CREATED,
    LABEL_SERVICE,
    LABEL_SESSION_PORT,
    LABEL_SPEC,
    LOST,
    RESYNC,
    ChangeCallback,
    ImageNotFound,
    Instance,
    PortTimeout,
    RuntimeEvent,
    RuntimeFailure,
    RuntimeUnavailable,
    ServiceFailed,
    ServiceSpec,
    SpecError,
    labels_for,
    runtime_name,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# the client's config loaders carry no annotations; these are their signatures as used here
_load_incluster_config: Callable[..., None] = k8s_config.load_incluster_config
_load_kube_config: Callable[..., None] = k8s_config.load_kube_config
_new_watch: Callable[[], Any] = k8s_watch.Watch

IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"})
CRASH_ERRORS = frozenset({"CrashLoopBackOff", "CreateContainerError", "CreateContainerConfigError", "RunContainerError"})
REQUEST_TIMEOUT = 15.0
WATCH_SECONDS = 50  # the API server ends each watch after this; the next one continues from its version
WATCH_BACKOFF = (0.1, 5.0)  # first retry, cap (seconds) when the watch breaks
WATCH_STABLE_SECONDS = 1.0  # a watch that stayed up this long resets the backoff


class KubernetesApiError(RuntimeFailure):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status} {reason}: {message}")
        self.http_status = status
        if status in (400, 422):
            self.code, self.status = "bad_request", 400
        elif status in (401, 403):
            self.code, self.status = "runtime_unavailable", 503


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def _name(obj: Any) -> str | None:
    """``metadata.name`` of an API object (the client types ``metadata`` as optional)."""
    meta = obj.metadata
    return str(meta.name) if meta is not None and meta.name else None


def _cluster_ip(svc: k8s.V1Service | None) -> str | None:
    """The Service's ClusterIP; None while unassigned, or for a headless Service (``None``)."""
    ip = svc.spec.cluster_ip if svc is not None and svc.spec is not None else None
    return str(ip) if ip and ip != "None" else None


class KubernetesRuntime:
    """``Runtime`` for Kubernetes / k3s."""

    name = "kubernetes"

    def __init__(self, cloudlet: str, api_client: k8s.ApiClient, namespace: str = "default") -> None:
        self.cloudlet = cloudlet
        self.namespace = namespace
        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)

    @classmethod
    def from_config(cls, cloudlet: str, cfg: Any) -> KubernetesRuntime:
        """Build from ``[kubernetes]``: a kubeconfig file, or ``in-cluster``."""
        from cloudlet.controller.config import ConfigError

        conf = k8s.Configuration()
        try:
            if cfg.kubeconfig == "in-cluster":
                _load_incluster_config(client_configuration=conf)
            else:
                _load_kube_config(
                    config_file=cfg.kubeconfig, context=cfg.context or None, client_configuration=conf
                )
        except (k8s_config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise ConfigError("kubernetes config", [f"kubernetes.kubeconfig: {cfg.kubeconfig}: {exc}"]) from exc
        conf.retries = 1
        return cls(cloudlet, k8s.ApiClient(conf), cfg.namespace)

    def object_name(self, service: str) -> str:
        return f"cloudlet-{runtime_name(service)}"

    # -- manifests -----------------------------------------------------------------------------

    def _metadata(self, spec: ServiceSpec, session_port: int, created: float) -> dict[str, Any]:
        return {
            "name": self.object_name(spec.name),
            "namespace": self.namespace,
            "labels": labels_for(spec, self.cloudlet, session_port, created),
            "annotations": {LABEL_SPEC: spec.canonical()},
        }

    def pod_manifest(self, spec: ServiceSpec, session_port: int, created: float) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "service",
            "image": spec.image,
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": spec.port, "protocol": "TCP"}],
            "env": [{"name": k, "value": v} for k, v in spec.env],
            "readinessProbe": {"tcpSocket": {"port": spec.port}, "periodSeconds": 1, "failureThreshold": 1},
        }
        resources: dict[str, str] = {}
        if spec.limits.cpus is not None:
            resources["cpu"] = f"{round(spec.limits.cpus * 1000)}m"
        if spec.limits.memory_mb is not None:
            resources["memory"] = f"{spec.limits.memory_mb}Mi"
        if resources:
            container["resources"] = {"limits": dict(resources), "requests": dict(resources)}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": self._metadata(spec, session_port, created),
            "spec": {
                "containers": [container],
                "restartPolicy": "Always",
                "enableServiceLinks": False,
                "automountServiceAccountToken": False,
            },
        }

    def service_manifest(self, spec: ServiceSpec, session_port: int, created: float) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self._metadata(spec, session_port, created),
            "spec": {
                "type": "ClusterIP",
                "selector": {LABEL_SERVICE: spec.name, LABEL_CLOUDLET: self.cloudlet},
                "ports": [{"name": "service", "port": spec.port, "targetPort": spec.port, "protocol": "TCP"}],
            },
        }

    # -- API plumbing --------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise RuntimeUnavailable(f"Kubernetes API unreachable: {exc.reason}") from exc
            if exc.status >= 500:
                raise RuntimeUnavailable(
                    f"Kubernetes API answered {exc.status} {exc.reason}: {_api_message(exc)}"
                ) from exc
            raise KubernetesApiError(exc.status, str(exc.reason), _api_message(exc)) from exc
        except (Urllib3Error, OSError) as exc:
            raise RuntimeUnavailable(f"Kubernetes API unreachable: {exc}") from exc

    async def _delete_quietly(self, fn: Callable[..., Any], name: str) -> bool:
        try:
            await self._call(fn, name, self.namespace, grace_period_seconds=0)
        except KubernetesApiError as exc:
            if exc.http_status == 404:
                return False
            raise
        return True

    # -- Runtime interface ---------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(k8s.VersionApi(self.api_client).get_code)

    async def close(self) -> None:
        await asyncio.to_thread(self.api_client.close)

    async def watch(self, on_change: ChangeCallback) -> None:
        """Follow this cloudlet's Pods (list, then watch from that version) until cancelled.

        The client's watch blocks, so it runs in a daemon thread that hands each change to the
        event loop. Reported: ``start`` (a Pod appeared), ``ready`` / ``unready`` (its Ready
        condition changed), ``remove`` (it was deleted); every (re)list is a ``resync``, every break
        a ``lost``. A watch that times out (``WATCH_SECONDS``) continues from its last version; an
        expired version (410) lists again.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        done: asyncio.Future[None] = loop.create_future()

        def emit(ev: RuntimeEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens any more
                loop.call_soon_threadsafe(on_change, ev)

        def finished(exc: BaseException | None) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def run() -> None:
            crash: BaseException | None = None
            try:
                self._watch_pods(emit, stop)
            except Exception as exc:  # handed to the loop: the controller logs it
                crash = exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finished, crash)

        threading.Thread(target=run, name=f"pod-watch-{self.cloudlet}", daemon=True).start()
        try:
            await done
        finally:
            stop.set()  # the thread ends at its next event or watch timeout

    def _watch_pods(self, emit: Callable[[RuntimeEvent], None], stop: threading.Event) -> None:
        selector = f"{LABEL_CLOUDLET}={self.cloudlet}"
        delay, failures = WATCH_BACKOFF[0], 0
        while not stop.is_set():
            connected_at: float | None = None
            try:
                pods = self.core.list_namespaced_pod(
                    self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
                )
                version = pods.metadata.resource_version if pods.metadata else None
                ready = {name: self._ready(p) for p in pods.items or [] if (name := _name(p))}
                emit(RuntimeEvent("", RESYNC))
                connected_at, failures = time.monotonic(), 0
                while not stop.is_set():
                    w = _new_watch()
                    stream: Callable[..., Iterator[dict[str, Any]]] = w.stream
                    for item in stream(
                        self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                        resource_version=version, timeout_seconds=WATCH_SECONDS,
                        _request_timeout=(REQUEST_TIMEOUT, WATCH_SECONDS + REQUEST_TIMEOUT),
                    ):
                        if stop.is_set():
                            w.stop()
                            break
                        ev = self._pod_event(item, ready)
                        if ev is not None:
                            emit(ev)
                    version = w.resource_version or version
                return
            except ApiException as exc:
                reason = f"{exc.status} {exc.reason}"
            except (Urllib3Error, OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if connected_at is not None:
                emit(RuntimeEvent("", LOST))
                if time.monotonic() - connected_at >= WATCH_STABLE_SECONDS:
                    delay = WATCH_BACKOFF[0]
            failures += 1
            event(log, logging.WARNING if failures == 1 else logging.DEBUG,
                  "kubernetes Pod watch lost; listing again", error=reason, retry_in=round(delay, 2))
            stop.wait(delay)
            delay = min(delay * 2, WATCH_BACKOFF[1])

    def _pod_event(self, item: dict[str, Any], ready: dict[str, bool]) -> RuntimeEvent | None:
        """One watch event -> a RuntimeEvent (a Pod appeared, changed readiness, or went), or None."""
        kind, pod = item.get("type"), item.get("object")
        if pod is None or isinstance(pod, dict) or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return None
        name = _name(pod)
        if name is None:
            return None
        labels = (pod.metadata.labels if pod.metadata else None) or {}
        service = labels.get(LABEL_SERVICE)
        if labels.get(LABEL_CLOUDLET) != self.cloudlet or not is_name(service):
            return None
        if kind == "DELETED":
            ready.pop(name, None)
            return RuntimeEvent(service, "remove", name)
        now_ready, was = self._ready(pod), ready.get(name)
        ready[name] = now_ready
        if was is None:
            return RuntimeEvent(service, "start", name)
        if was != now_ready:
            return RuntimeEvent(service, "ready" if now_ready else "unready", name)
        return None

    async def create(self, spec: ServiceSpec, session_port: int, ready_timeout: float) -> Instance:
        created = float(int(time.time()))
        name = self.object_name(spec.name)
        pod_body = self.pod_manifest(spec, session_port, created)
        svc_body = self.service_manifest(spec, session_port, created)
        await self._call(self.core.create_namespaced_pod, self.namespace, pod_body)
        event(log, logging.INFO, "pod created", service=spec.name, pod=name, namespace=self.namespace)
        try:
            try:
                svc = await self._call(self.core.create_namespaced_service, self.namespace, svc_body)
            except KubernetesApiError as exc:
                if exc.http_status != 409:
                    raise
                # a Service left over from a crashed controller: replace it
                await self._delete_quietly(self.core.delete_namespaced_service, name)
                svc = await self._call(self.core.create_namespaced_service, self.namespace, svc_body)
            cluster_ip = _cluster_ip(svc)
            await self._wait_ready(spec, ready_timeout)
            if not cluster_ip:
                cluster_ip = _cluster_ip(await self._call(self.core.read_namespaced_service, name, self.namespace))
            if not cluster_ip:
                raise ServiceFailed(
                    f"service {spec.name}: Service {name} has no ClusterIP (is it headless?); "
                    "the Pod and Service were removed"
                )
            return Instance(spec, session_port, "running", f"{cluster_ip}:{spec.port}", created, name)
        except BaseException:
            await self._remove_both(spec.name)
            raise

    async def _remove_both(self, service: str) -> bool:
        name = self.object_name(service)
        removed = False
        for fn in (self.core.delete_namespaced_service, self.core.delete_namespaced_pod):
            try:
                removed = await self._delete_quietly(fn, name) or removed
            except RuntimeFailure as exc:
                event(log, logging.ERROR, "kubernetes cleanup failed", service=service, error=str(exc))
                raise
        return removed

    def _pod_problem(self, pod: Any, spec: ServiceSpec) -> RuntimeFailure | None:
        status = pod.status
        if status is None:
            return None
        for cs in status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is not None and waiting.reason in IMAGE_ERRORS:
                return ImageNotFound(
                    f"image {spec.image!r} cannot be pulled ({waiting.reason}: {waiting.message or ''}); "
                    "the Pod and Service were removed"
                )
            if waiting is not None and waiting.reason in CRASH_ERRORS:
                return ServiceFailed(
                    f"service {spec.name}: container failed ({waiting.reason}: {waiting.message or ''}); "
                    "the Pod and Service were removed"
                )
            terminated = cs.state.terminated if cs.state else None
            if terminated is not None:
                return ServiceFailed(
                    f"service {spec.name}: container exited (code {terminated.exit_code}, {terminated.reason}) "
                    "before it became ready; the Pod and Service were removed"
                )
        if status.phase in ("Failed", "Succeeded"):
            return ServiceFailed(f"service {spec.name}: Pod phase {status.phase}; the Pod and Service were removed")
        return None

    @staticmethod
    def _ready(pod: Any) -> bool:
        conditions = (pod.status.conditions if pod.status else None) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    async def _wait_ready(self, spec: ServiceSpec, timeout: float) -> None:
        name = self.object_name(spec.name)
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            pod = await self._call(self.core.read_namespaced_pod, name, self.namespace)
            if self._ready(pod):
                return
            problem = self._pod_problem(pod, spec)
            if problem is not None:
                raise problem
            if time.monotonic() >= deadline:
                raise PortTimeout(
                    f"service {spec.name}: Pod {name} did not become Ready (TCP readiness probe on port "
                    f"{spec.port}) within {timeout:g} s; the Pod and Service were removed"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    async def delete(self, name: str) -> bool:
        removed = await self._remove_both(name)
        if removed:
            event(log, logging.INFO, "pod and service removed", service=name)
        return removed

    async def list(self) -> list[Instance]:
        selector = f"{LABEL_CLOUDLET}={self.cloudlet}"
        pods = await self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        services = await self._call(self.core.list_namespaced_service, self.namespace, label_selector=selector)
        ips = {_name(s): _cluster_ip(s) for s in services.items or []}
        out = []
        for pod in pods.items or []:
            inst = self._instance(pod, ips.get(_name(pod)))
            if inst is not None:
                out.append(inst)
        return out

    async def get(self, name: str) -> Instance | None:
        obj = self.object_name(name)
        try:
            pod = await self._call(self.core.read_namespaced_pod, obj, self.namespace)
        except KubernetesApiError as exc:
            if exc.http_status == 404:
                return None
            raise
        try:
            svc = await self._call(self.core.read_namespaced_service, obj, self.namespace)
            cluster_ip = _cluster_ip(svc)
        except KubernetesApiError as exc:
            if exc.http_status != 404:
                raise
            cluster_ip = None
        labels = (pod.metadata.labels if pod.metadata else None) or {}
        if labels.get(LABEL_CLOUDLET) != self.cloudlet:
            return None
        return self._instance(pod, cluster_ip)

    def _instance(self, pod: Any, cluster_ip: str | None) -> Instance | None:
        meta = pod.metadata
        labels, annotations = meta.labels or {}, meta.annotations or {}
        try:
            spec = ServiceSpec.from_json(json.loads(annotations[LABEL_SPEC]))
            session_port = int(labels[LABEL_SESSION_PORT])
            created = float(labels.get(LABEL_CREATED, "0"))
        except (KeyError, ValueError, SpecError, TypeError) as exc:
            event(log, logging.WARNING, "pod with unreadable cloudlet labels ignored", pod=meta.name, error=str(exc))
            return None
        if labels.get(LABEL_SERVICE) != spec.name:
            return None
        ready = self._ready(pod) and cluster_ip is not None
        phase = pod.status.phase if pod.status else None
        state = "running" if ready else ("starting" if phase == "Pending" and self._pod_problem(pod, spec) is None else "failed")
        backend = f"{cluster_ip}:{spec.port}" if ready else None
        return Instance(spec, session_port, state, backend, created, meta.name)

    async def ensure_running(self, instance: Instance) -> Instance:
        """Kubernetes restarts containers itself; recreate a missing Service and report readiness."""
        spec = instance.spec
        name = self.object_name(spec.name)
        try:
            svc = await self._call(self.core.read_namespaced_service, name, self.namespace)
        except KubernetesApiError as exc:
            if exc.http_status != 404:
                raise
            svc = await self._call(
                self.core.create_namespaced_service, self.namespace,
                self.service_manifest(spec, instance.session_port, instance.created),
            )
        pod = await self._call(self.core.read_namespaced_pod, name, self.namespace)
        if not self._ready(pod):
            raise ServiceFailed(f"service {spec.name}: Pod {name} is not Ready yet")
        cluster_ip = _cluster_ip(svc)
        if not cluster_ip:
            raise ServiceFailed(f"service {spec.name}: Service {name} has no ClusterIP yet")
        return Instance(spec, instance.session_port, "running", f"{cluster_ip}:{spec.port}",
                        instance.created, name)

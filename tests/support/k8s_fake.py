"""A Kubernetes API test server (aiohttp) for the kubernetes runtime's tests.

No Kubernetes server can run on these machines, so this app stands in for one: it stores Pods and
Services, records every request with its JSON body (so tests assert the exact objects sent),
filters lists by equality label selectors, assigns ClusterIPs, answers injected errors, and plays
the kubelet for the demo image: a Pod becomes Ready on its second read when its image is the demo
image and its port is 7000; another image fails with ErrImagePull, a non-numeric ``PORT`` env with
CrashLoopBackOff, and another port never becomes Ready.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEMO_PREFIX = "localhost/cloudlet-demo"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeKubernetes:
    requests: list[Recorded] = field(default_factory=list)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    services: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    reads: dict[tuple[str, str], int] = field(default_factory=dict)
    fail: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # (method, kind) -> status
    resource_version: int = 1  # resourceVersion: every Pod change adds one
    watchers: list[tuple[str, dict[str, str], asyncio.Queue[dict[str, Any]]]] = field(default_factory=list)
    _ips: itertools.count = field(default_factory=lambda: itertools.count(10))

    def pod_changed(self, kind: str, pod: dict[str, Any]) -> None:
        """Tell every watch of Pods that match (namespace, equality label selector) about a change."""
        self.resource_version += 1
        pod["metadata"]["resourceVersion"] = str(self.resource_version)
        ns, labels = pod["metadata"].get("namespace"), pod["metadata"].get("labels", {})
        for w_ns, wanted, queue in self.watchers:
            if w_ns == ns and all(labels.get(k) == v for k, v in wanted.items()):
                queue.put_nowait({"type": kind, "object": copy.deepcopy(pod)})

    def set_ready(self, ns: str, name: str, ready: bool) -> None:
        """Play the kubelet: the Pod's Ready condition changes (a watch sees MODIFIED)."""
        pod = self.pods[(ns, name)]
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self.pod_changed("MODIFIED", pod)

    def remove_pod(self, ns: str, name: str) -> None:
        """Someone deletes the Pod behind the controller's back (a watch sees DELETED)."""
        self.pod_changed("DELETED", self.pods.pop((ns, name)))

    def sent(self, method: str, kind: str) -> list[Any]:
        """Bodies of the requests of ``method`` on collection ``kind`` (pods, services)."""
        return [r.body for r in self.requests if r.method == method and r.path.split("/")[5:6] == [kind]]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self.version)
        app.router.add_get("/version/", self.version)
        for kind in ("pods", "services"):
            base = f"/api/v1/namespaces/{{ns}}/{kind}"
            app.router.add_post(base, self.create)
            app.router.add_get(base, self.list)
            app.router.add_get(base + "/{name}", self.read)
            app.router.add_delete(base + "/{name}", self.delete)
        return app

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
             "code": code},
            status=code,
        )

    def _store(self, kind: str) -> dict[tuple[str, str], dict[str, Any]]:
        return self.pods if kind == "pods" else self.services

    async def _record(self, request: web.Request) -> tuple[str, web.Response | None]:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Recorded(request.method, request.path, dict(request.query), body))
        kind = request.path.split("/")[5]
        failure = self.fail.get((request.method, kind))
        if failure:
            return kind, self.status(failure[0], failure[1], f"injected {failure[0]} for {request.method} {kind}")
        return kind, None

    # -- handlers ----------------------------------------------------------------------------

    async def version(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded("GET", "/version", {}, None))
        return web.json_response({
            "major": "1", "minor": "30", "gitVersion": "v1.30.0+fake", "gitCommit": "0" * 40,
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22",
            "compiler": "gc", "platform": "linux/amd64",
        })

    async def create(self, request: web.Request) -> web.Response:
        kind, failure = await self._record(request)
        if failure:
            return failure
        ns = request.match_info["ns"]
        obj = copy.deepcopy(self.requests[-1].body)
        name = obj["metadata"]["name"]
        if (ns, name) in self._store(kind):
            return self.status(409, "AlreadyExists", f'{kind} "{name}" already exists')
        obj["metadata"].setdefault("namespace", ns)
        obj["metadata"]["uid"] = f"uid-{name}"
        if kind == "services":
            obj["spec"]["clusterIP"] = f"10.43.0.{next(self._ips)}"
        else:
            obj["status"] = {"phase": "Pending"}
        self._store(kind)[(ns, name)] = obj
        if kind == "pods":
            self.pod_changed("ADDED", obj)
        return web.json_response(obj, status=201)

    def _kubelet(self, ns: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        n = self.reads[(ns, name)] = self.reads.get((ns, name), 0) + 1
        if n != 2:  # the kubelet decides once; set_ready changes it later
            return
        c = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        if not c["image"].startswith(DEMO_PREFIX):
            waiting = {"reason": "ErrImagePull", "message": f'pull access denied for {c["image"]}'}
            pod["status"] = {"phase": "Pending", "containerStatuses": [
                {"name": "service", "ready": False, "restartCount": 0, "image": c["image"], "imageID": "",
                 "state": {"waiting": waiting}}]}
        elif not env.get("PORT", "7000").isdigit():
            pod["status"] = {"phase": "Running", "containerStatuses": [
                {"name": "service", "ready": False, "restartCount": 3, "image": c["image"], "imageID": "",
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}}}]}
        else:
            ready = c["ports"][0]["containerPort"] == 7000
            pod["status"] = {
                "phase": "Running",
                "podIP": "10.42.0.9",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [{"name": "service", "ready": ready, "restartCount": 0, "image": c["image"],
                                       "imageID": "", "state": {"running": {}}}],
            }
        self.pod_changed("MODIFIED", pod)

    async def read(self, request: web.Request) -> web.Response:
        kind, failure = await self._record(request)
        if failure:
            return failure
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self._store(kind).get((ns, name))
        if obj is None:
            return self.status(404, "NotFound", f'{kind} "{name}" not found')
        if kind == "pods":
            self._kubelet(ns, obj)
        return web.json_response(obj)

    async def list(self, request: web.Request) -> web.Response:
        kind, failure = await self._record(request)
        if failure:
            return failure
        ns = request.match_info["ns"]
        wanted = dict(p.split("=", 1) for p in request.query.get("labelSelector", "").split(",") if p)
        if kind == "pods" and request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, ns, wanted)
        items = [
            o for (n, _), o in self._store(kind).items()
            if n == ns and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        list_kind = "PodList" if kind == "pods" else "ServiceList"
        return web.json_response({"kind": list_kind, "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.resource_version)}, "items": items})

    async def _watch(self, request: web.Request, ns: str, wanted: dict[str, str]) -> web.StreamResponse:
        """A Pod watch from now on (changes after the list the client made first), until
        ``timeoutSeconds`` or the client goes."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        entry = (ns, wanted, queue)
        self.watchers.append(entry)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds", "1800"))
        try:
            await resp.prepare(request)
            while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
                try:
                    item = await asyncio.wait_for(queue.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                await resp.write(json.dumps(item).encode() + b"\n")
        except (ConnectionResetError, OSError):
            pass
        finally:
            self.watchers.remove(entry)
        return resp

    async def delete(self, request: web.Request) -> web.Response:
        kind, failure = await self._record(request)
        if failure:
            return failure
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self._store(kind).pop((ns, name), None)
        if obj is None:
            return self.status(404, "NotFound", f'{kind} "{name}" not found')
        if kind == "pods":
            self.pod_changed("DELETED", obj)
        return web.json_response(obj)


def kubeconfig_for(url: str) -> str:
    """A kubeconfig (YAML is a superset of JSON) pointing at ``url`` with a static token."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
    })

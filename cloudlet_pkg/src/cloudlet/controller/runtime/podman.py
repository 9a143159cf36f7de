"""The podman runtime: the libpod REST API on podman's Unix socket, spoken with aiohttp.

One container per service, named ``cloudlet-<cloudlet>-<service>`` (podman refuses a second
container of that name, so no restart or race can make duplicates), on the cloudlet's own bridge
network (``cloudlet-<cloudlet>`` unless configured), with resource limits and ulimits in the create
request and every fact the controller needs in labels. The backend address the session daemon
relays to is the container's IP on that network plus the container port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

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

API = "/v4.0.0/libpod"
ULIMITS = (("nofile", 1024, 1024), ("nproc", 4096, 4096))
CPU_PERIOD_US = 100_000
# container events that can change what sessiond must relay to (podman >= 4.3 carries the
# container's labels on each of them, so the stream is filtered on this cloudlet's label)
WATCHED_ACTIONS = ("died", "stop", "remove", "start", "restart")
MAX_EVENT_BYTES = 1 << 20  # one event holds every label (the spec label up to ~270 KB)
WATCH_BACKOFF = (0.1, 5.0)  # first retry, cap (seconds) when the events stream breaks
WATCH_STABLE_SECONDS = 1.0  # a stream that stayed up this long resets the backoff


class PodmanError(RuntimeFailure):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"podman API answered {status}: {message}")
        self.http_status = status
        self.api_message = message


class PodmanRuntime:
    """``Runtime`` for podman (libpod REST API >= 4.0)."""

    name = "podman"

    def __init__(
        self,
        cloudlet: str,
        socket_path: str,
        network: str | None = None,
        request_timeout: float = 60.0,
    ) -> None:
        self.cloudlet = cloudlet
        self.socket_path = socket_path
        self.network = network or f"cloudlet-{cloudlet}"
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._network_ready = False

    # -- HTTP plumbing -------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path), timeout=self._timeout
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (200, 201, 204),
        raw: bool = False,
    ) -> tuple[int, Any]:
        url = URL(f"http://podman{API}{path}", encoded=True)
        if params:
            url = url.with_query(params)
        try:
            async with self._http().request(method, url, json=body) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeUnavailable(f"podman API at {self.socket_path} unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise RuntimeUnavailable(f"podman API at {self.socket_path} timed out") from exc
        if status not in ok:
            try:
                message = json.loads(data).get("message") or data.decode(errors="replace")
            except (ValueError, AttributeError):
                message = data.decode(errors="replace")
            raise PodmanError(status, str(message).strip())
        if raw:
            return status, data
        if not data:
            return status, None
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def container_name(self, service: str) -> str:
        return f"cloudlet-{self.cloudlet}-{runtime_name(service)}"

    async def _owned(self, ref: str, service: str | None = None) -> dict[str, Any] | None:
        """Inspect ``ref``; its data only if it carries this cloudlet's labels (and ``service``'s).

        Every stop, start and removal of an existing container goes through this, then acts on the
        inspected container ID, so no name or race can point the runtime at another container.
        """
        try:
            info = await self._inspect(ref)
        except PodmanError as exc:
            if exc.http_status == 404:
                return None
            raise
        labels = (info.get("Config") or {}).get("Labels") or {}
        ours = labels.get(LABEL_CLOUDLET) == self.cloudlet and is_name(labels.get(LABEL_SERVICE))
        if service is not None:
            ours = ours and labels.get(LABEL_SERVICE) == service
        if not ours or not info.get("Id"):
            event(log, logging.WARNING, "container not touched: it does not carry this cloudlet's labels",
                  container=str(info.get("Id", ref))[:12], cloudlet=self.cloudlet, service=service)
            return None
        return info

    # -- Runtime interface ---------------------------------------------------------------------

    async def ping(self) -> None:
        await self._request("GET", "/_ping")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ensure_network(self) -> None:
        if self._network_ready:
            return
        path = f"/networks/{_seg(self.network)}/exists"
        status, _ = await self._request("GET", path, ok=(204, 404))
        if status == 404:
            try:
                await self._request("POST", "/networks/create", body={"name": self.network, "driver": "bridge"})
                event(log, logging.INFO, "podman network created", network=self.network)
            except PodmanError as exc:
                if exc.http_status != 409:  # created concurrently: fine
                    raise
        self._network_ready = True

    async def image_exists(self, image: str) -> bool:
        status, _ = await self._request("GET", f"/images/{_seg(image)}/exists", ok=(204, 404))
        return status == 204

    def create_body(self, spec: ServiceSpec, session_port: int, created: float) -> dict[str, Any]:
        labels = labels_for(spec, self.cloudlet, session_port, created)
        labels[LABEL_SPEC] = spec.canonical()
        body: dict[str, Any] = {
            "name": self.container_name(spec.name),
            "image": spec.image,
            "env": spec.env_dict,
            "labels": labels,
            "hostname": spec.name,
            "netns": {"nsmode": "bridge"},
            "Networks": {self.network: {}},
            "r_limits": [{"type": t, "soft": soft, "hard": hard} for t, soft, hard in ULIMITS],
            "stop_timeout": 5,
        }
        limits: dict[str, Any] = {}
        if spec.limits.cpus is not None:
            limits["cpu"] = {"quota": int(spec.limits.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
        if spec.limits.memory_mb is not None:
            limits["memory"] = {"limit": spec.limits.memory_mb * 1024 * 1024}
        if limits:
            body["resource_limits"] = limits
        return body

    async def create(self, spec: ServiceSpec, session_port: int, ready_timeout: float) -> Instance:
        await self.ensure_network()
        if not await self.image_exists(spec.image):
            raise ImageNotFound(
                f"image {spec.image!r} not found in local podman storage (no registry is used; "
                "build or load it first, e.g. `cloudlet image build-demo`)"
            )
        created = float(int(time.time()))
        name = self.container_name(spec.name)
        try:
            _, info = await self._request("POST", "/containers/create", body=self.create_body(spec, session_port, created))
        except PodmanError as exc:
            if "image not known" in exc.api_message:
                raise ImageNotFound(f"image {spec.image!r} not found in local podman storage") from exc
            if exc.http_status == 409 or "already in use" in exc.api_message:
                conflict = RuntimeFailure(
                    f"a container named {name} exists but is not a readable service of cloudlet "
                    f"{self.cloudlet}; remove it (podman rm -f {name}) and retry: {exc.api_message}"
                )
                conflict.code, conflict.status = "conflict", 409
                raise conflict from exc
            raise
        container_id = str(info.get("Id", name)) if isinstance(info, dict) else name
        event(log, logging.INFO, "container created", service=spec.name, container=container_id[:12])
        try:
            await self._request("POST", f"/containers/{_seg(container_id)}/start", ok=(204, 304))
            return await self._wait_ready(container_id, spec, session_port, created, ready_timeout)
        except BaseException:
            await self._remove(container_id)
            raise

    async def _wait_ready(
        self, container_id: str, spec: ServiceSpec, session_port: int, created: float, timeout: float
    ) -> Instance:
        deadline = time.monotonic() + timeout
        info = await self._inspect(container_id)
        ip = self._ip(info)
        delay = 0.005
        next_check = time.monotonic() + 0.5
        while True:
            if ip and on_local_link(ip):
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(ip, spec.port), timeout=1.0)
                    writer.close()
                    try:
                        await writer.wait_closed()
                    except OSError:
                        pass
                    # the container still holds this address: the answer came from it
                    info = await self._inspect(container_id)
                    if (info.get("State") or {}).get("Running") and self._ip(info) == ip:
                        return Instance(spec, session_port, "running", f"{ip}:{spec.port}", created, container_id)
                    next_check = 0.0
                except (TimeoutError, OSError):
                    pass
            else:
                next_check = 0.0
            now = time.monotonic()
            if now >= deadline:
                raise PortTimeout(
                    f"service {spec.name}: container port {spec.port} did not accept connections within "
                    f"{timeout:g} s; the container was removed"
                )
            if now >= next_check or not ip:
                next_check = now + 0.5
                info = await self._inspect(container_id)
                ip = self._ip(info)
                state = (info.get("State") or {}) if info else {}
                if not state.get("Running", False):
                    logs = await self._logs(container_id)
                    raise ServiceFailed(
                        f"service {spec.name}: container exited (code {state.get('ExitCode')}) before port "
                        f"{spec.port} opened; the container was removed. Last output: {logs or '(none)'}"
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _inspect(self, container_id: str) -> dict[str, Any]:
        _, info = await self._request("GET", f"/containers/{_seg(container_id)}/json")
        return info if isinstance(info, dict) else {}

    def _ip(self, info: dict[str, Any]) -> str | None:
        networks = ((info.get("NetworkSettings") or {}).get("Networks")) or {}
        net = networks.get(self.network) or {}
        ip = net.get("IPAddress")
        return str(ip) if ip else None

    async def _logs(self, container_id: str, tail: int = 5) -> str:
        try:
            _, data = await self._request(
                "GET", f"/containers/{_seg(container_id)}/logs",
                params={"stdout": "true", "stderr": "true", "tail": str(tail)}, raw=True,
            )
        except RuntimeFailure:
            return ""
        return _demux(data)[-500:].strip()

    async def _remove(self, ref: str) -> bool:
        try:
            status, _ = await self._request(
                "DELETE", f"/containers/{_seg(ref)}", params={"force": "true", "v": "true", "timeout": "0"},
                ok=(200, 204, 404),
            )
        except RuntimeFailure as exc:
            event(log, logging.ERROR, "container removal failed", container=ref, error=str(exc))
            raise
        return status != 404

    async def delete(self, name: str) -> bool:
        info = await self._owned(self.container_name(name), name)
        if info is None:
            return False
        removed = await self._remove(str(info["Id"]))
        if removed:
            event(log, logging.INFO, "container removed", service=name)
        return removed

    async def list(self) -> list[Instance]:
        filters = json.dumps({"label": [f"{LABEL_CLOUDLET}={self.cloudlet}"]})
        _, items = await self._request("GET", "/containers/json", params={"all": "true", "filters": filters})
        found = await asyncio.gather(*(self._get_ref(str(item.get("Id", ""))) for item in items or []))
        return [inst for inst in found if inst is not None]

    async def get(self, name: str) -> Instance | None:
        inst = await self._get_ref(self.container_name(name))
        return inst if inst is not None and inst.name == name else None

    async def _get_ref(self, ref: str) -> Instance | None:
        try:
            info = await self._inspect(ref)
        except PodmanError as exc:
            if exc.http_status == 404:  # gone (or removed between list and inspect)
                return None
            raise
        return self._from_inspect(info)

    def _from_inspect(self, info: dict[str, Any]) -> Instance | None:
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_CLOUDLET) != self.cloudlet:
            return None
        try:
            spec = ServiceSpec.from_json(json.loads(labels[LABEL_SPEC]))
            session_port = int(labels[LABEL_SESSION_PORT])
            created = float(labels.get(LABEL_CREATED, "0"))
        except (KeyError, ValueError, SpecError, TypeError) as exc:
            event(log, logging.WARNING, "container with unreadable cloudlet labels ignored",
                  container=str(info.get("Id", ""))[:12], error=str(exc))
            return None
        if labels.get(LABEL_SERVICE) != spec.name:
            return None
        status = (info.get("State") or {}).get("Status", "")
        ip = self._ip(info) if status == "running" else None
        backend = f"{ip}:{spec.port}" if ip else None
        if backend:
            state = "running"
        elif status in ("created", "configured", "initialized"):
            state = "starting"
        else:
            state = "failed"
        return Instance(spec, session_port, state, backend, created, str(info.get("Id", "")))

    # -- events --------------------------------------------------------------------------------

    def events_filters(self) -> str:
        return json.dumps({
            "type": ["container"],
            "label": [f"{LABEL_CLOUDLET}={self.cloudlet}"],
            "event": list(WATCHED_ACTIONS),
        })

    async def watch(self, on_change: ChangeCallback) -> None:
        """Follow libpod's events stream (``GET /libpod/events?stream=true``) until cancelled.

        Each connect is announced as ``resync`` (events may have been missed while it was down),
        each break as ``lost``; reconnects back off from 0.1 s to 5 s, and a stream that stayed
        up for a second starts again at 0.1 s.
        """
        delay = WATCH_BACKOFF[0]
        failures = 0
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=None)
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path), timeout=timeout
        ) as http:
            while True:
                connected_at: float | None = None
                try:
                    async for ev in self._follow_events(http):
                        if ev.action == RESYNC:
                            connected_at = time.monotonic()
                            event(log, logging.INFO, "podman events stream connected", socket=self.socket_path,
                                  after_failures=failures)
                            failures = 0
                        on_change(ev)
                    reason = "stream ended"
                except (TimeoutError, aiohttp.ClientError, OSError, PodmanError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if connected_at is not None:
                    on_change(RuntimeEvent("", LOST))
                    if time.monotonic() - connected_at >= WATCH_STABLE_SECONDS:
                        delay = WATCH_BACKOFF[0]
                failures += 1
                # one warning per outage; the retries after it are debug noise
                event(log, logging.WARNING if failures == 1 else logging.DEBUG,
                      "podman events stream lost; reconnecting", socket=self.socket_path,
                      error=reason, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_BACKOFF[1])

    async def _follow_events(self, http: aiohttp.ClientSession) -> AsyncIterator[RuntimeEvent]:
        url = URL(f"http://podman{API}/events", encoded=True).with_query(
            {"stream": "true", "filters": self.events_filters()}
        )
        async with http.get(url) as resp:
            if resp.status != 200:
                raise PodmanError(resp.status, (await resp.text()).strip()[:500])
            yield RuntimeEvent("", RESYNC)
            async for line in _lines(resp.content, MAX_EVENT_BYTES):
                ev = parse_event(line, self.cloudlet)
                if ev is not None:
                    yield ev

    async def ensure_running(self, instance: Instance) -> Instance:
        if instance.state == "running":
            return instance
        if await self._owned(instance.ref, instance.name) is None:
            raise ServiceFailed(f"service {instance.name}: container {instance.ref[:12]} is gone or not this cloudlet's")
        await self._request("POST", f"/containers/{_seg(instance.ref)}/start", ok=(204, 304))
        return await self._wait_ready(instance.ref, instance.spec, instance.session_port, instance.created, 30.0)


def _seg(value: str) -> str:
    """``value`` as one URL path segment: every reserved character (``/``, ``%``, ``?``, ...) quoted."""
    return quote(value, safe="")


def on_local_link(ip: str, route_table: str = "/proc/net/route") -> bool:
    """True if ``ip`` is reached directly through a local interface (a podman bridge), not a gateway.

    When a container exits, netavark may remove its bridge; its old IP would then be routed to the
    default gateway, and a readiness probe must never send traffic there.
    """
    try:
        addr = int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")
        with open(route_table) as f:
            lines = f.read().splitlines()[1:]
    except (ValueError, OSError):
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, gateway, mask = int(fields[1], 16), int(fields[2], 16), int(fields[7], 16)
        if mask != 0 and gateway == 0 and addr & mask == dest:
            return True
    return False


def parse_event(line: bytes, cloudlet: str) -> RuntimeEvent | None:
    """One line of libpod's events stream -> a RuntimeEvent of one of ``cloudlet``'s services, or None.

    A line is a JSON object such as ``{"Type": "container", "Action": "died", "Actor": {"ID": "...",
    "Attributes": {"name": "...", "cloudlet.service": "demo", ...}}, ...}`` (labels are attributes).
    """
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("Type") != "container":
        return None
    action = data.get("Action") or data.get("status")
    actor = data.get("Actor")
    if action not in WATCHED_ACTIONS or not isinstance(actor, dict):
        return None
    attrs = actor.get("Attributes")
    if not isinstance(attrs, dict) or attrs.get(LABEL_CLOUDLET) != cloudlet:
        return None
    service = attrs.get(LABEL_SERVICE)
    if not is_name(service):
        return None
    return RuntimeEvent(service, str(action), str(actor.get("ID", ""))[:12])


async def _lines(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Newline-separated lines of a stream; a line longer than ``limit`` is dropped (bounded memory)."""
    buf = bytearray()
    skipping = False
    async for chunk in content.iter_any():
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl]) if nl <= limit and not skipping else b""
            if nl > limit and not skipping:
                event(log, logging.WARNING, "podman event longer than the limit dropped", limit=limit)
            del buf[: nl + 1]
            skipping = False
            if line.strip():
                yield line
        if len(buf) > limit:
            if not skipping:
                event(log, logging.WARNING, "podman event longer than the limit dropped", limit=limit)
            buf.clear()
            skipping = True


def _demux(data: bytes) -> str:
    """Decode podman's multiplexed log stream (8-byte frame headers) or plain text."""
    out: list[bytes] = []
    pos = 0
    while pos + 8 <= len(data) and data[pos] in (0, 1, 2) and data[pos + 1 : pos + 4] == b"\0\0\0":
        (size,) = struct.unpack(">I", data[pos + 4 : pos + 8])
        out.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + size
    if not out:
        return data.decode(errors="replace")
    return b"".join(out).decode(errors="replace")

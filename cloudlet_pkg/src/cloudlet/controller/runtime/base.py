"""The one small interface every container runtime implements, and the data it speaks.

A runtime runs one container per service and keeps everything the controller needs to rebuild its
state in labels on that container (service, cloudlet, session port, spec and its hash), so a
restarted controller asks the runtime, not a database.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cloudlet.common.names import InvalidName, check_name

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")  # fullmatch
MAX_IMAGE_LEN = 255
MAX_ENV = 64
MAX_ENV_VALUE = 4096

LABEL_SERVICE = "cloudlet.service"
LABEL_CLOUDLET = "cloudlet.cloudlet"
LABEL_SESSION_PORT = "cloudlet.session-port"
LABEL_SPEC_HASH = "cloudlet.spec-hash"
LABEL_SPEC = "cloudlet.spec"
LABEL_CREATED = "cloudlet.created"


class RuntimeFailure(Exception):
    """A runtime operation failed. ``code`` is the API error code, ``status`` the HTTP status."""

    code = "internal"
    status = 500


class BadName(RuntimeFailure):
    """A service name that breaks the name rule reached a runtime (the API refuses it earlier)."""

    code = "bad_request"
    status = 400


def runtime_name(service: str) -> str:
    """``service`` if it is a valid name, else :class:`BadName` (no runtime object is ever touched)."""
    try:
        return check_name(service)
    except InvalidName as exc:
        raise BadName(str(exc)) from exc


class ImageNotFound(RuntimeFailure):
    code = "image_not_found"
    status = 400


class RuntimeUnavailable(RuntimeFailure):
    code = "runtime_unavailable"
    status = 503


class PortTimeout(RuntimeFailure):
    code = "port_timeout"
    status = 504


class ServiceFailed(RuntimeFailure):
    """The container exited or crashed before its port opened."""

    code = "service_failed"
    status = 502


class SpecError(ValueError):
    """A service spec is invalid; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Limits:
    cpus: float | None = None
    memory_mb: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory_mb": self.memory_mb}


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What a client asks for: everything that decides whether two creates are 'the same'."""

    name: str
    image: str
    port: int
    env: tuple[tuple[str, str], ...] = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "port": self.port,
            "env": self.env_dict,
            "limits": self.limits.to_json(),
        }

    def canonical(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:32]

    @classmethod
    def from_request(cls, name: str, body: Any) -> ServiceSpec:
        """Validate an API request body (``PUT /v1/services/{name}``)."""
        try:
            check_name(name)
        except InvalidName as exc:
            raise SpecError(str(exc)) from exc
        if not isinstance(body, dict):
            raise SpecError("request body must be a JSON object")
        unknown = set(body) - {"image", "port", "env", "limits", "name"}
        if unknown:
            raise SpecError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if "name" in body and body["name"] != name:
            raise SpecError(f"body name {body['name']!r} differs from the URL's {name!r}")
        image = body.get("image")
        if not isinstance(image, str) or not image or len(image) > MAX_IMAGE_LEN or any(c.isspace() for c in image):
            raise SpecError("image must be a non-empty image reference without spaces (max 255 chars)")
        port = body.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise SpecError("port must be an integer 1..65535 (the container port of the service)")
        env_in = body.get("env")
        env_in = {} if env_in is None else env_in
        if not isinstance(env_in, dict) or len(env_in) > MAX_ENV:
            raise SpecError(f"env must be an object of at most {MAX_ENV} string values")
        env: list[tuple[str, str]] = []
        for key, value in env_in.items():
            if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
                raise SpecError(f"invalid env name {key!r}")
            if not isinstance(value, str) or len(value) > MAX_ENV_VALUE:
                raise SpecError(f"env {key} must be a string of at most {MAX_ENV_VALUE} chars")
            env.append((key, value))
        limits_in = body.get("limits")
        limits_in = {} if limits_in is None else limits_in  # ([] or "" are errors, not "no limits")
        if not isinstance(limits_in, dict) or set(limits_in) - {"cpus", "memory_mb"}:
            raise SpecError("limits must be an object with optional cpus and memory_mb")
        cpus = limits_in.get("cpus")
        if cpus is not None and (
            not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or not 0.01 <= cpus <= 256
        ):
            raise SpecError("limits.cpus must be a number 0.01..256")
        memory = limits_in.get("memory_mb")
        if memory is not None and (
            not isinstance(memory, int) or isinstance(memory, bool) or not 6 <= memory <= 1048576
        ):
            raise SpecError("limits.memory_mb must be an integer 6..1048576")
        return cls(
            name=name,
            image=image,
            port=port,
            env=tuple(sorted(env)),
            limits=Limits(float(cpus) if cpus is not None else None, memory),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceSpec:
        """Read a spec back from a runtime label (same validation as a request)."""
        return cls.from_request(str(data.get("name", "")), data)


@dataclass(frozen=True, slots=True)
class Instance:
    """A service as the runtime sees it; rebuilt from labels after any restart."""

    spec: ServiceSpec
    session_port: int
    state: str  # running | starting | failed
    backend: str | None  # host:port the sessiond relays to (None while not running)
    created: float
    ref: str  # runtime's own id (container id, pod name)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    """A change a runtime reported, handed to the ``on_change`` callback of :meth:`Runtime.watch`.

    ``action`` is the runtime's word for a service's change (podman: ``died``, ``stop``, ``remove``,
    ``start``, ``restart``), or one of two stream states with an empty ``service``:
    ``resync`` (the event stream is (re)connected; changes may have been missed while it was down)
    and ``lost`` (the stream broke; the runtime reconnects with backoff).
    """

    service: str
    action: str
    ref: str = ""  # the runtime's id of the object (container id prefix, Pod name)


RESYNC = "resync"
LOST = "lost"

ChangeCallback = Callable[[RuntimeEvent], None]


def labels_for(spec: ServiceSpec, cloudlet: str, session_port: int, created: float) -> dict[str, str]:
    return {
        LABEL_SERVICE: spec.name,
        LABEL_CLOUDLET: cloudlet,
        LABEL_SESSION_PORT: str(session_port),
        LABEL_SPEC_HASH: spec.hash(),
        LABEL_CREATED: str(int(created)),
    }


class Runtime(Protocol):
    """What the controller needs from a container runtime."""

    name: str

    async def ping(self) -> None:
        """Raise RuntimeUnavailable if the runtime cannot be reached."""

    async def create(self, spec: ServiceSpec, session_port: int, ready_timeout: float) -> Instance:
        """Start the service and return once its port accepts TCP connections.

        On any failure nothing is left behind (container, Pod, Service) and a RuntimeFailure is
        raised: ImageNotFound, PortTimeout, ServiceFailed, RuntimeUnavailable.
        """

    async def delete(self, name: str) -> bool:
        """Remove everything of service ``name``; False if there was nothing."""

    async def list(self) -> list[Instance]:
        """Every service of this cloudlet, from the runtime's labels."""

    async def get(self, name: str) -> Instance | None:
        """One service of this cloudlet (cheaper than ``list``), or None."""

    async def ensure_running(self, instance: Instance) -> Instance:
        """Start a stopped service again (after a host reboot); return its fresh state."""

    async def watch(self, on_change: ChangeCallback) -> None:
        """Follow the runtime's events until cancelled; call ``on_change`` for each relevant one.

        Only this cloudlet's services are reported. The callback must not block (the controller
        only schedules a reconcile pass). A broken event source is reconnected with capped backoff,
        announced by ``lost`` and ``resync`` events. A runtime without an event source returns at
        once: the periodic reconcile alone keeps it in step.
        """

    async def close(self) -> None:
        """Release connections."""

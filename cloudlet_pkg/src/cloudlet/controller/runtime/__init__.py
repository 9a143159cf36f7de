"""Container runtimes behind one interface (``base.Runtime``): podman and kubernetes."""

from cloudlet.controller.runtime.base import (
    ImageNotFound,
    Instance,
    Limits,
    PortTimeout,
    Runtime,
    RuntimeEvent,
    RuntimeFailure,
    RuntimeUnavailable,
    ServiceFailed,
    ServiceSpec,
    SpecError,
)

__all__ = [
    "ImageNotFound",
    "Instance",
    "Limits",
    "PortTimeout",
    "Runtime",
    "RuntimeEvent",
    "RuntimeFailure",
    "RuntimeUnavailable",
    "ServiceFailed",
    "ServiceSpec",
    "SpecError",
]

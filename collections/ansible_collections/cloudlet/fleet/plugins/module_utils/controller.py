# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""HTTP client for the cloudlet controller API, shared by the cloudlet.fleet modules.

This module util is PRIVATE to the collection: it may change or go away in any release, without
notice; use the modules, not this file.

Only what ansible-core ships with is used (``open_url``), so the modules run on any control node or
cloudlet without the cloudlet Python package. Every failure becomes a ``ControllerError`` whose
``cause`` names what went wrong (unreachable, timeout, unauthorized, image_not_found, conflict, ...);
``ControllerClient.failure_message`` turns it into a message that also names the cloudlet.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import ssl
import typing as t
from urllib.error import HTTPError, URLError
from urllib.parse import quote

from ansible.module_utils.basic import AnsibleModule, env_fallback
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import SSLValidationError, open_url

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
"""Names of cloudlets and services (docs/architecture.md)."""

HEALTH_TIMEOUT = 5.0
"""Seconds to wait for ``GET /v1/health`` when an error message wants the cloudlet's name."""

CONTROLLER_ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "controller_url": {
        "type": "str",
        "required": True,
        "fallback": (env_fallback, ["CLOUDLET_CONTROLLER_URL"]),
    },
    "controller_token": {
        "type": "str",
        "required": True,
        "no_log": True,
        "fallback": (env_fallback, ["CLOUDLET_CONTROLLER_TOKEN"]),
    },
    "validate_certs": {"type": "bool", "default": True},
    "ca_path": {"type": "path", "fallback": (env_fallback, ["CLOUDLET_CA_PATH"])},
    "timeout": {"type": "float", "default": 120.0},
}

CAUSES: dict[str, str] = {
    "unreachable": "controller unreachable",
    "timeout": "controller did not answer in time",
    "unauthorized": "wrong controller token (401 unauthorized)",
    "image_not_found": "unknown image",
    "conflict": "conflicting service spec",
    "not_found": "not found",
    "bad_request": "request refused as invalid",
    "runtime_unavailable": "container runtime unavailable",
    "port_timeout": "service did not start listening in time",
    "service_failed": "service container exited before its port opened",
    "sessiond_unavailable": "the cloudlet's session daemon is unavailable",
    "no_free_port": "no free session port left on the cloudlet",
    "limit": "the cloudlet runs as many services as it may",
    "internal": "controller internal error",
    "tls": "TLS certificate validation failed",
    "bad_response": "unexpected answer from the controller",
    "invalid_name": "invalid name",
    "invalid_argument": "invalid module argument",
    "forbidden": "the credential may not do this (403 forbidden)",
}
"""Every ``ControllerError.cause`` with the words used for it in messages."""


def controller_argument_spec(**options: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    """The shared connection options plus the module's own ``options``."""
    spec = copy.deepcopy(CONTROLLER_ARGUMENT_SPEC)
    spec.update(options)
    return spec


class ControllerError(Exception):
    """A request to the controller failed; ``cause`` is one of ``CAUSES``."""

    def __init__(self, cause: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail
        self.status = status

    @property
    def cause_text(self) -> str:
        return CAUSES.get(self.cause, self.cause)


def check_name(kind: str, name: str) -> None:
    """Refuse a service, cloudlet or device name the controller would refuse, before any request."""
    if not NAME_PATTERN.match(name):
        raise ControllerError(
            "invalid_name",
            "%s name %r must match [a-z0-9][a-z0-9-]{0,31}" % (kind, name),
        )


def _is_timeout(reason: object) -> bool:
    return isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in to_text(reason)


class ControllerClient:
    """One cloudlet controller: JSON requests with the bearer token, errors as ``ControllerError``."""

    def __init__(self, url: str, token: str, validate_certs: bool = True, timeout: float = 120.0,
                 ca_path: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        self.timeout = timeout
        self._cloudlet: str | None = None
        self._health_error: ControllerError | None = None

    @classmethod
    def from_module(cls, module: AnsibleModule) -> ControllerClient:
        params = module.params
        return cls(
            params["controller_url"],
            params["controller_token"],
            validate_certs=params["validate_certs"],
            timeout=params["timeout"],
            ca_path=params.get("ca_path"),
        )

    # -- transport -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: t.Any = None,
        auth: bool = True,
        timeout: float | None = None,
    ) -> tuple[int, t.Any]:
        """Send one request; return (status, decoded JSON or None); raise ``ControllerError``."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = "Bearer %s" % self.token
        try:
            response = open_url(
                self.url + path,
                data=data,
                headers=headers,
                method=method,
                validate_certs=self.validate_certs,
                ca_path=self.ca_path,
                timeout=self.timeout if timeout is None else timeout,
                follow_redirects="none",
                http_agent="ansible-cloudlet.fleet",
            )
            status = response.getcode()
            raw = response.read()
        except HTTPError as err:
            raise self._http_error(err) from None
        except SSLValidationError as err:
            raise ControllerError("tls", to_text(err)) from None
        except URLError as err:
            cause = "timeout" if _is_timeout(err.reason) else "unreachable"
            if isinstance(err.reason, ssl.SSLError):
                cause = "tls"
            raise ControllerError(cause, to_text(err.reason)) from None
        except (socket.timeout, TimeoutError) as err:
            raise ControllerError("timeout", "no answer within %s s (%s)" % (self._timeout_of(timeout), to_text(err))) from None
        except (UrlsConnectionError, OSError) as err:
            raise ControllerError("unreachable", to_text(err)) from None
        return status, self._decode(raw, status)

    def _timeout_of(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    @staticmethod
    def _decode(raw: bytes, status: int) -> t.Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ControllerError(
                "bad_response", "HTTP %d with a body that is not JSON: %r" % (status, raw[:200]), status
            ) from None

    @staticmethod
    def _http_error(err: HTTPError) -> ControllerError:
        status = err.code
        code = None
        message = to_text(err.reason)
        try:
            raw = err.read()
        except Exception:  # the body is only a better message; the status is enough
            raw = b""
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            code = payload["error"].get("code")
            message = to_text(payload["error"].get("message") or message)
        elif raw:
            message = to_text(raw[:200], errors="replace")
        if status == 401:
            cause = "unauthorized"
        elif code in CAUSES:
            cause = code
        elif status == 404:
            cause = "not_found"
        elif status == 409:
            cause = "conflict"
        elif status == 400:
            cause = "bad_request"
        else:
            cause = code or "internal"
        return ControllerError(cause, "HTTP %d: %s" % (status, message), status)

    # -- cloudlet identity -----------------------------------------------------------------------

    def health(self) -> dict[str, t.Any]:
        """``GET /v1/health`` (no token needed)."""
        status, body = self.request("GET", "/v1/health", auth=False, timeout=min(self.timeout, HEALTH_TIMEOUT))
        if not isinstance(body, dict):
            raise ControllerError("bad_response", "GET /v1/health answered %r" % (body,), status)
        if isinstance(body.get("cloudlet"), str):
            self._cloudlet = body["cloudlet"]
        return body

    def cloudlet_name(self) -> str | None:
        """The cloudlet's name from its health endpoint, or None if it cannot be asked."""
        if self._cloudlet is None and self._health_error is None:
            try:
                self.health()
            except ControllerError as err:
                self._health_error = err
        return self._cloudlet

    def describe(self, ask: bool = True) -> str:
        """``cloudlet 'a' (controller http://...)``, or without the name if it is not known."""
        name = self.cloudlet_name() if ask else self._cloudlet
        if name:
            return "cloudlet %r (controller %s)" % (name, self.url)
        return "cloudlet at controller %s" % self.url

    def failure_message(self, action: str, err: ControllerError) -> str:
        """``<action> on cloudlet 'a' (controller URL): <cause>: <detail>``."""
        # An unreachable or silent controller would not tell its name either; do not wait twice.
        ask = err.cause not in ("unreachable", "timeout", "tls", "invalid_name")
        return "%s on %s failed: %s: %s" % (action, self.describe(ask=ask), err.cause_text, err.detail)

    def fail(self, module: AnsibleModule, action: str, err: ControllerError, **result: t.Any) -> t.NoReturn:
        """``fail_json`` with a message naming the cloudlet and the cause."""
        module.fail_json(
            msg=self.failure_message(action, err),
            cause=err.cause,
            status=err.status,
            cloudlet=self._cloudlet,
            controller_url=self.url,
            **result,
        )
        raise AssertionError("fail_json returned")  # pragma: no cover - fail_json exits

    # -- services --------------------------------------------------------------------------------

    def list_services(self) -> list[dict[str, t.Any]]:
        status, body = self.request("GET", "/v1/services")
        if not isinstance(body, dict) or not isinstance(body.get("services"), list):
            raise ControllerError("bad_response", "GET /v1/services answered %r" % (body,), status)
        return body["services"]

    def get_service(self, name: str) -> dict[str, t.Any] | None:
        """The service, or None if the cloudlet has no service of that name."""
        try:
            status, body = self.request("GET", "/v1/services/%s" % quote(name, safe=""))
        except ControllerError as err:
            if err.cause == "not_found":
                return None
            raise
        if not isinstance(body, dict):
            raise ControllerError("bad_response", "GET /v1/services/%s answered %r" % (name, body), status)
        return body

    def put_service(self, name: str, spec: dict[str, t.Any]) -> tuple[bool, dict[str, t.Any]]:
        """Create the service; return (created, service). Same spec: (False, service); other: conflict."""
        status, body = self.request("PUT", "/v1/services/%s" % quote(name, safe=""), body=spec)
        if not isinstance(body, dict):
            raise ControllerError("bad_response", "PUT /v1/services/%s answered %r" % (name, body), status)
        return status == 201, body

    def delete_service(self, name: str) -> bool:
        """Remove the service; False if it did not exist."""
        try:
            self.request("DELETE", "/v1/services/%s" % quote(name, safe=""))
        except ControllerError as err:
            if err.cause == "not_found":
                return False
            raise
        return True

    # -- sessions --------------------------------------------------------------------------------

    def create_session(self, service: str) -> dict[str, t.Any]:
        status, body = self.request("POST", "/v1/services/%s/sessions" % quote(service, safe=""), body={})
        if not isinstance(body, dict) or not body.get("session"):
            raise ControllerError("bad_response", "POST /v1/services/%s/sessions answered without a session" % service, status)
        return body

    # -- devices ---------------------------------------------------------------------------------

    def get_device(self, device: str) -> dict[str, t.Any] | None:
        """The device record (hash, scope, expiry, revoked), or None if this cloudlet has none."""
        try:
            status, body = self.request("GET", "/v1/devices/%s" % quote(device, safe=""))
        except ControllerError as err:
            if err.cause == "not_found":
                return None
            raise
        if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
            raise ControllerError("bad_response", "GET /v1/devices/%s answered %r" % (device, body), status)
        return body

    def put_device(self, device: str, record: dict[str, t.Any]) -> str:
        """Register the device; ``created``, ``changed`` or ``unchanged``."""
        status, body = self.request("PUT", "/v1/devices/%s" % quote(device, safe=""), body=record)
        if not isinstance(body, dict) or body.get("result") not in ("created", "changed", "unchanged"):
            raise ControllerError("bad_response", "PUT /v1/devices/%s answered %r" % (device, body), status)
        return body["result"]

    def revoke_device(self, device: str) -> bool:
        """Revoke the device; False if this cloudlet does not know it."""
        try:
            self.request("DELETE", "/v1/devices/%s" % quote(device, safe=""))
        except ControllerError as err:
            if err.cause == "not_found":
                return False
            raise
        return True

    def end_session(self, credential: str) -> bool:
        """End the session; False if the controller does not know it."""
        try:
            self.request("DELETE", "/v1/sessions/%s" % quote(credential, safe=""))
        except ControllerError as err:
            if err.cause == "not_found":
                return False
            raise
        return True


# -- service specs ---------------------------------------------------------------------------------

SPEC_KEYS = ("image", "port", "env", "limits")


def normalize_limits(limits: dict[str, t.Any] | None) -> dict[str, t.Any]:
    """Limits without unset entries; cpus as float and memory_mb as int, so 1 == 1.0."""
    result: dict[str, t.Any] = {}
    for key, value in (limits or {}).items():
        if value is None:
            continue
        if key == "cpus":
            result[key] = float(value)
        elif key == "memory_mb":
            result[key] = int(value)
        else:
            result[key] = value
    return result


def normalize_spec(spec: dict[str, t.Any]) -> dict[str, t.Any]:
    """The comparable part of a service: image, port, env (strings), limits (unset dropped)."""
    env = spec.get("env") or {}
    return {
        "image": spec.get("image"),
        "port": int(spec["port"]) if spec.get("port") is not None else None,
        "env": {to_text(key): to_text(value) for key, value in env.items()},
        "limits": normalize_limits(spec.get("limits")),
    }


def spec_differences(current: dict[str, t.Any], desired: dict[str, t.Any]) -> list[str]:
    """Names of the spec fields that differ between two (normalized) specs."""
    return [key for key in SPEC_KEYS if current.get(key) != desired.get(key)]

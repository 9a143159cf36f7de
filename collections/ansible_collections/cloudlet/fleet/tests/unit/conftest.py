# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Fixtures for the unit tests: a local HTTP controller that records requests, and a module runner.

``controller`` is a real HTTP server on 127.0.0.1 (ephemeral port, its own thread) that speaks the
controller API of docs/api.md with in-memory state and records every request, so tests assert on the
exact requests a module sent. ``run_module`` runs a module's ``main()`` the way Ansible does (module
arguments in, JSON result on stdout, exit code) and returns the parsed result.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock
from urllib.parse import unquote

import pytest

from ansible.module_utils import basic

TOKEN = "unit-test-token-7f3a"
CLOUDLET = "a"
KNOWN_IMAGE = "localhost/cloudlet-demo:latest"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: t.Any


@dataclass
class ControllerState:
    token: str = TOKEN
    cloudlet: str = CLOUDLET
    images: set[str] = field(default_factory=lambda: {KNOWN_IMAGE, "localhost/cloudlet-demo:v2"})
    services: dict[str, dict[str, t.Any]] = field(default_factory=dict)
    sessions: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, t.Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    next_port: int = 31000
    delay: float = 0.0
    counter: int = 0
    max_services: int = 100


def _spec(body: dict[str, t.Any]) -> dict[str, t.Any]:
    limits = body.get("limits") or {}
    return {
        "image": body["image"],
        "port": body["port"],
        "env": dict(body.get("env") or {}),
        "limits": {
            "cpus": float(limits["cpus"]) if limits.get("cpus") is not None else None,
            "memory_mb": limits.get("memory_mb"),
        },
    }


class Handler(BaseHTTPRequestHandler):
    server: "ControllerServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: t.Any) -> None:  # noqa: A002 - http.server's name
        pass

    def _send(self, status: int, payload: t.Any = None) -> None:
        raw = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if raw:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _handle(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        path = self.path
        state.requests.append(Recorded(self.command, path, dict(self.headers.items()), body))
        if state.delay:
            time.sleep(state.delay)
        if self.command == "GET" and path == "/v1/health":
            return self._send(200, {"status": "ok", "cloudlet": state.cloudlet, "runtime": "podman"})
        if self.headers.get("Authorization") != "Bearer %s" % state.token:
            return self._error(401, "unauthorized", "missing or wrong bearer token")
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts == ["v1", "services"] and self.command == "GET":
            return self._send(200, {"services": list(state.services.values())})
        if len(parts) == 3 and parts[:2] == ["v1", "services"]:
            return self._service(parts[2], body)
        if len(parts) == 4 and parts[:2] == ["v1", "services"] and parts[3] == "sessions" and self.command == "POST":
            if parts[2] not in state.services:
                return self._error(404, "not_found", "no service %r" % parts[2])
            state.counter += 1
            credential = "v2.%s.%s..1764136800.nonce%04d.mac" % (parts[2], state.cloudlet, state.counter)
            state.sessions[credential] = parts[2]
            service = state.services[parts[2]]
            return self._send(
                201,
                {"session": credential, "id": "nonce%04d" % state.counter, "service": parts[2],
                 "cloudlet": state.cloudlet, "host": "127.0.0.1", "port": service["session_port"],
                 "issued": 1764136800},
            )
        if len(parts) == 3 and parts[:2] == ["v1", "devices"]:
            return self._device(parts[2], body)
        if len(parts) == 3 and parts[:2] == ["v1", "sessions"] and self.command == "DELETE":
            if state.sessions.pop(parts[2], None) is None:
                return self._error(404, "not_found", "no such session")
            return self._send(204)
        return self._error(404, "not_found", "no route %s %s" % (self.command, path))

    def _device(self, device: str, body: t.Any) -> None:
        """The device endpoints of docs/api.md, with the controller's validation."""
        state = self.server.state
        current = state.devices.get(device)
        if self.command == "GET":
            if current is None:
                return self._error(404, "not_found", "no device %s" % device)
            return self._send(200, current)
        if self.command == "DELETE":
            if current is None:
                return self._error(404, "not_found", "no device %s" % device)
            current["revoked"] = True
            return self._send(204)
        if self.command == "PUT":
            if not isinstance(body, dict) or set(body) - {"sha256", "services", "expires", "description"}:
                return self._error(400, "bad_request", "unknown field(s)")
            if len(body.get("sha256", "")) != 64 or not isinstance(body.get("expires"), int):
                return self._error(400, "bad_request", "sha256 and expires are required")
            if body["expires"] <= time.time():
                return self._error(400, "bad_request", "expires is in the past")
            record = {"device": device, "sha256": body["sha256"], "services": sorted(set(body["services"])),
                      "expires": body["expires"], "revoked": False, "created": 1764136800,
                      "description": body.get("description", "")}
            if current == record:
                return self._send(200, {"device": device, "result": "unchanged", "services": record["services"],
                                        "expires": record["expires"]})
            state.devices[device] = record
            return self._send(201 if current is None else 200,
                              {"device": device, "result": "created" if current is None else "changed",
                               "services": record["services"], "expires": record["expires"]})
        return self._error(405, "bad_request", "method not allowed")

    def _service(self, name: str, body: t.Any) -> None:
        state = self.server.state
        current = state.services.get(name)
        if self.command == "GET":
            if current is None:
                return self._error(404, "not_found", "no service %r" % name)
            return self._send(200, current)
        if self.command == "DELETE":
            if state.services.pop(name, None) is None:
                return self._error(404, "not_found", "no service %r" % name)
            return self._send(204)
        if self.command == "PUT":
            spec = _spec(body)
            if current is not None:
                if {k: current[k] for k in spec} == spec:
                    return self._send(200, current)
                return self._error(409, "conflict", "service %r exists with another spec" % name)
            if len(state.services) >= state.max_services:
                return self._error(409, "limit", "cloudlet runs max_services=%d services" % state.max_services)
            if spec["image"] not in state.images:
                return self._error(400, "image_not_found", "image %s not found in podman" % spec["image"])
            service = dict(spec, name=name, state="running", session_port=state.next_port,
                           session_host="127.0.0.1", cloudlet=state.cloudlet, runtime="podman",
                           backend="10.88.0.5:%d" % spec["port"], created="2026-11-26T06:00:00Z")
            state.next_port += 1
            state.services[name] = service
            return self._send(201, service)
        return self._error(405, "bad_request", "method not allowed")

    do_GET = do_PUT = do_DELETE = do_POST = _handle


class ControllerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ControllerState()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    @property
    def requests(self) -> list[Recorded]:
        return self.state.requests

    def writes(self) -> list[tuple[str, str]]:
        """(method, path) of every request that is not a GET."""
        return [(r.method, r.path) for r in self.state.requests if r.method != "GET"]

    def args(self, **extra: t.Any) -> dict[str, t.Any]:
        """Module arguments that reach this controller with the right token."""
        return dict({"controller_url": self.url, "controller_token": TOKEN, "timeout": 10}, **extra)


@pytest.fixture
def controller() -> t.Iterator[ControllerServer]:
    server = ControllerServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def silent_server() -> t.Iterator[str]:
    """A URL whose server accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    sock.close()


@dataclass
class ModuleResult:
    rc: int
    result: dict[str, t.Any]
    stdout: str

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))


def _patched_args(args: dict[str, t.Any]) -> t.ContextManager[None]:
    try:
        from ansible.module_utils.testing import patch_module_args
    except ImportError:  # ansible-core < 2.19
        payload = json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode()
        return mock.patch.object(basic, "_ANSIBLE_ARGS", payload)
    return patch_module_args(args)


@pytest.fixture
def run_module() -> t.Callable[..., ModuleResult]:
    """Run ``module.main()`` with ``args``; check_mode/diff as Ansible passes them."""

    def run(module: t.Any, args: dict[str, t.Any], check_mode: bool = False, diff: bool = False) -> ModuleResult:
        args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        out = io.StringIO()
        rc = None
        with _patched_args(args), contextlib.redirect_stdout(out):
            try:
                module.main()
            except SystemExit as exit_:
                rc = exit_.code
        assert rc is not None, "module returned without exit_json/fail_json"
        text = out.getvalue()
        return ModuleResult(rc=int(rc), result=json.loads(text), stdout=text)

    return run


@pytest.fixture(autouse=True)
def _no_controller_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLOUDLET_CONTROLLER_URL", "CLOUDLET_CONTROLLER_TOKEN", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert sys.version_info >= (3, 8)

# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The shared controller client: requests, error causes, cloudlet naming, spec comparison."""

from __future__ import annotations

import pytest

from ansible_collections.cloudlet.fleet.plugins.module_utils.controller import (
    ControllerClient,
    ControllerError,
    check_name,
    normalize_spec,
    spec_differences,
)

TOKEN = "unit-test-token-7f3a"


def client_for(controller, token=TOKEN, timeout=10.0):
    return ControllerClient(controller.url + "/", token, timeout=timeout)


def test_health_needs_no_token_and_names_the_cloudlet(controller):
    client = client_for(controller, token="whatever")

    assert client.health()["cloudlet"] == "a"
    assert "Authorization" not in controller.requests[0].headers
    assert client.describe() == "cloudlet 'a' (controller %s)" % controller.url


def test_requests_carry_the_bearer_token_and_json(controller):
    client = client_for(controller)

    created, body = client.put_service("echo", {"image": "localhost/cloudlet-demo:latest", "port": 7000})

    assert created is True and body["session_port"] == 31000
    request = controller.requests[0]
    assert request.headers["Authorization"] == "Bearer " + TOKEN
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == {"image": "localhost/cloudlet-demo:latest", "port": 7000}


@pytest.mark.parametrize(
    ("setup", "call", "cause", "status"),
    [
        (None, lambda c: c.list_services(), "unauthorized", 401),
        ("service", lambda c: c.put_service("echo", {"image": "localhost/cloudlet-demo:v2", "port": 7000}), "conflict", 409),
        (None, lambda c: c.put_service("echo", {"image": "localhost/nope:1", "port": 7000}), "image_not_found", 400),
        (None, lambda c: c.create_session("ghost"), "not_found", 404),
    ],
)
def test_http_errors_become_causes(controller, setup, call, cause, status):
    if setup:
        client_for(controller).put_service("echo", {"image": "localhost/cloudlet-demo:latest", "port": 7000})
    client = client_for(controller, token="wrong" if cause == "unauthorized" else TOKEN)

    with pytest.raises(ControllerError) as info:
        call(client)

    assert info.value.cause == cause
    assert info.value.status == status
    assert "HTTP %d" % status in info.value.detail


def test_missing_things_are_not_errors(controller):
    client = client_for(controller)

    assert client.get_service("ghost") is None
    assert client.delete_service("ghost") is False
    assert client.end_session("v1.ghost.1.n.m") is False


def test_failure_message_names_cloudlet_and_cause(controller):
    client = client_for(controller)
    err = ControllerError("image_not_found", "HTTP 400: image x not found", 400)

    message = client.failure_message("Ensuring service 'echo'", err)

    assert message == (
        "Ensuring service 'echo' on cloudlet 'a' (controller %s) failed: unknown image: HTTP 400: image x not found"
        % controller.url
    )


def test_unreachable_controller(closed_port):
    client = ControllerClient("http://127.0.0.1:%d" % closed_port, TOKEN)

    with pytest.raises(ControllerError) as info:
        client.list_services()

    assert info.value.cause == "unreachable"
    assert client.cloudlet_name() is None
    assert client.describe() == "cloudlet at controller http://127.0.0.1:%d" % closed_port


def test_silent_controller_times_out(silent_server):
    client = ControllerClient(silent_server, TOKEN, timeout=0.3)

    with pytest.raises(ControllerError) as info:
        client.list_services()

    assert info.value.cause == "timeout"


def test_slow_answer_times_out(controller):
    controller.state.delay = 1.0
    client = client_for(controller, timeout=0.3)

    with pytest.raises(ControllerError) as info:
        client.list_services()

    assert info.value.cause == "timeout"


def test_non_json_answer_is_a_bad_response():
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        conn = listener.accept()[0]
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    client = ControllerClient("http://127.0.0.1:%d" % listener.getsockname()[1], TOKEN, timeout=5)
    try:
        with pytest.raises(ControllerError) as info:
            client.list_services()
    finally:
        thread.join(5)
        listener.close()

    assert info.value.cause == "bad_response"
    assert "hello" in info.value.detail


def test_spec_comparison_ignores_unset_limits_and_number_types():
    controller_view = {
        "name": "echo", "image": "i", "port": 7000, "env": {"A": "1"},
        "limits": {"cpus": 1.0, "memory_mb": None}, "state": "running", "session_port": 31000,
    }
    requested = normalize_spec({"image": "i", "port": 7000, "env": {"A": 1}, "limits": {"cpus": 1, "memory_mb": None}})

    assert spec_differences(normalize_spec(controller_view), requested) == []
    assert spec_differences(normalize_spec(controller_view), dict(requested, port=7001, env={})) == ["port", "env"]


@pytest.mark.parametrize("name", ["a", "edge-tokyo-1", "x" * 32])
def test_valid_names(name):
    check_name("service", name)


@pytest.mark.parametrize("name", ["", "-a", "A", "a_b", "x" * 33, "a/b"])
def test_invalid_names(name):
    with pytest.raises(ControllerError) as info:
        check_name("service", name)
    assert info.value.cause == "invalid_name"

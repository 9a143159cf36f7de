# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""cloudlet.fleet.service against a local recording controller (see tests/unit/conftest.py)."""

from __future__ import annotations

import pytest

from ansible_collections.cloudlet.fleet.plugins.modules import service

SPEC = {
    "name": "echo",
    "image": "localhost/cloudlet-demo:latest",
    "port": 7000,
    "env": {"GREETING": "hello", "WORKERS": 4},
    "limits": {"cpus": 0.5, "memory_mb": 256},
}
SENT_SPEC = {
    "image": "localhost/cloudlet-demo:latest",
    "port": 7000,
    "env": {"GREETING": "hello", "WORKERS": "4"},
    "limits": {"cpus": 0.5, "memory_mb": 256},
}


def test_creates_the_service_and_returns_its_session_port(controller, run_module):
    run = run_module(service, controller.args(**SPEC))

    assert run.rc == 0, run.result
    assert run.result["changed"] is True
    assert run.result["service"]["session_port"] == 31000
    assert run.result["service"]["state"] == "running"
    assert run.result["cloudlet"] == "a"
    put = [r for r in controller.requests if r.method == "PUT"]
    assert [(r.path, r.body) for r in put] == [("/v1/services/echo", SENT_SPEC)]
    assert put[0].headers["Authorization"] == "Bearer unit-test-token-7f3a"


def test_second_run_is_unchanged_and_sends_no_write(controller, run_module):
    run_module(service, controller.args(**SPEC))
    writes_before = controller.writes()

    again = run_module(service, controller.args(**SPEC))

    assert again.rc == 0, again.result
    assert again.result["changed"] is False
    assert again.result["service"]["session_port"] == 31000
    assert controller.writes() == writes_before


def test_integer_cpus_equal_the_controllers_float(controller, run_module):
    spec = dict(SPEC, limits={"cpus": 1, "memory_mb": None})
    run_module(service, controller.args(**spec))
    assert controller.state.services["echo"]["limits"] == {"cpus": 1.0, "memory_mb": None}

    again = run_module(service, controller.args(**spec))

    assert again.result["changed"] is False
    assert len(controller.writes()) == 1


def test_check_mode_predicts_creation_without_writing(controller, run_module):
    run = run_module(service, controller.args(**SPEC), check_mode=True, diff=True)

    assert run.rc == 0, run.result
    assert run.result["changed"] is True
    assert run.result["service"]["session_port"] is None
    assert run.result["service"]["image"] == SPEC["image"]
    assert run.result["diff"] == {"before": {}, "after": SENT_SPEC}
    assert controller.writes() == []
    assert controller.state.services == {}


def test_check_mode_on_an_existing_service_is_unchanged(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**SPEC), check_mode=True)

    assert run.result["changed"] is False
    assert len(controller.writes()) == 1


def test_diff_shows_the_spec_before_and_after_removal(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(name="echo", state="absent"), diff=True)

    assert run.result["changed"] is True
    assert run.result["diff"]["before"] == SENT_SPEC
    assert run.result["diff"]["after"] == {}


def test_conflicting_spec_fails_with_the_controllers_message(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**dict(SPEC, image="localhost/cloudlet-demo:v2")))

    assert run.rc == 1
    assert run.result["cause"] == "conflict"
    msg = run.result["msg"]
    assert "cloudlet 'a'" in msg and controller.url in msg
    assert "exists with another spec" in msg  # the controller's own words
    assert "different image" in msg
    assert "recreate=true" in msg
    assert controller.state.services["echo"]["image"] == SPEC["image"]


def test_conflict_in_check_mode_fails_without_writing(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**dict(SPEC, port=7001)), check_mode=True)

    assert run.rc == 1
    assert run.result["cause"] == "conflict"
    assert "different port" in run.result["msg"]
    assert controller.writes() == [("PUT", "/v1/services/echo")]


def test_recreate_replaces_a_different_spec(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**dict(SPEC, image="localhost/cloudlet-demo:v2", recreate=True)), diff=True)

    assert run.rc == 0, run.result
    assert run.result["changed"] is True
    assert run.result["service"]["image"] == "localhost/cloudlet-demo:v2"
    assert run.result["diff"]["before"]["image"] == SPEC["image"]
    assert run.result["diff"]["after"]["image"] == "localhost/cloudlet-demo:v2"
    assert controller.writes() == [
        ("PUT", "/v1/services/echo"),
        ("DELETE", "/v1/services/echo"),
        ("PUT", "/v1/services/echo"),
    ]


def test_recreate_in_check_mode_writes_nothing(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**dict(SPEC, port=7001, recreate=True)), check_mode=True)

    assert run.result["changed"] is True
    assert run.result["service"]["port"] == 7001
    assert controller.writes() == [("PUT", "/v1/services/echo")]


def test_absent_removes_then_is_unchanged(controller, run_module):
    run_module(service, controller.args(**SPEC))

    first = run_module(service, controller.args(name="echo", state="absent"))
    second = run_module(service, controller.args(name="echo", state="absent"))

    assert first.result["changed"] is True
    assert second.result["changed"] is False
    assert first.result["service"] == {}
    assert controller.state.services == {}
    assert controller.writes() == [("PUT", "/v1/services/echo"), ("DELETE", "/v1/services/echo")]


def test_absent_in_check_mode_removes_nothing(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(name="echo", state="absent"), check_mode=True)

    assert run.result["changed"] is True
    assert "echo" in controller.state.services
    assert controller.writes() == [("PUT", "/v1/services/echo")]


def test_unknown_image_names_the_cloudlet_and_leaves_nothing(controller, run_module):
    run = run_module(service, controller.args(**dict(SPEC, image="localhost/nope:1")))

    assert run.rc == 1
    assert run.result["cause"] == "image_not_found"
    assert run.result["changed"] is False
    msg = run.result["msg"]
    assert msg.startswith("Ensuring service 'echo' on cloudlet 'a' (controller %s) failed: unknown image" % controller.url)
    assert "localhost/nope:1" in msg
    assert controller.state.services == {}


def test_wrong_token_fails_as_unauthorized_and_hides_the_token(controller, run_module):
    run = run_module(service, controller.args(**dict(SPEC, controller_token="wrong-token-x")))

    assert run.rc == 1
    assert run.result["cause"] == "unauthorized"
    assert run.result["status"] == 401
    assert "wrong controller token" in run.result["msg"]
    assert "cloudlet 'a'" in run.result["msg"]
    assert "wrong-token-x" not in run.stdout
    assert controller.writes() == []


def test_token_is_not_in_the_output(controller, run_module):
    run = run_module(service, controller.args(**SPEC))

    assert run.rc == 0
    assert "unit-test-token-7f3a" not in run.stdout


def test_unreachable_controller_names_the_url(closed_port, run_module):
    url = "http://127.0.0.1:%d" % closed_port
    run = run_module(service, {"controller_url": url, "controller_token": "unused-token-1", **SPEC})

    assert run.rc == 1
    assert run.result["cause"] == "unreachable"
    assert run.result["msg"].startswith("Ensuring service 'echo' on cloudlet at controller %s failed: controller unreachable" % url)


def test_silent_controller_times_out(silent_server, run_module):
    run = run_module(service, {"controller_url": silent_server, "controller_token": "unused-token-1", "timeout": 0.5, **SPEC})

    assert run.rc == 1
    assert run.result["cause"] == "timeout"
    assert silent_server in run.result["msg"]
    assert "did not answer in time" in run.result["msg"]


def test_present_needs_image_and_port(controller, run_module):
    run = run_module(service, controller.args(name="echo"))

    assert run.rc == 1
    assert "image" in run.result["msg"] and "port" in run.result["msg"]
    assert controller.requests == []


def test_invalid_name_is_refused_before_any_request(controller, run_module):
    run = run_module(service, controller.args(**dict(SPEC, name="Echo_1")))

    assert run.rc == 1
    assert run.result["cause"] == "invalid_name"
    assert "[a-z0-9][a-z0-9-]{0,31}" in run.result["msg"]
    assert controller.requests == []


def test_unknown_limit_is_refused(controller, run_module):
    run = run_module(service, controller.args(**dict(SPEC, limits={"gpus": 1})))

    assert run.rc == 1
    assert "gpus" in run.result["msg"]
    assert controller.requests == []


def test_connection_options_come_from_the_environment(controller, run_module, monkeypatch):
    monkeypatch.setenv("CLOUDLET_CONTROLLER_URL", controller.url)
    monkeypatch.setenv("CLOUDLET_CONTROLLER_TOKEN", "unit-test-token-7f3a")

    run = run_module(service, dict(SPEC))

    assert run.rc == 0, run.result
    assert run.result["changed"] is True


@pytest.mark.parametrize("missing", ["controller_url", "controller_token"])
def test_connection_options_are_required(controller, run_module, missing):
    args = controller.args(**SPEC)
    del args[missing]

    run = run_module(service, args)

    assert run.rc == 1
    assert missing in run.result["msg"]
    assert controller.requests == []


def test_recreate_with_an_unknown_image_reports_the_removal(controller, run_module):
    run_module(service, controller.args(**SPEC))

    run = run_module(service, controller.args(**dict(SPEC, image="localhost/nope:1", recreate=True)))

    assert run.rc == 1
    assert run.result["cause"] == "image_not_found"
    assert run.result["changed"] is True  # the old service was removed before the create failed
    assert controller.state.services == {}


def test_service_limit_is_not_mistaken_for_a_conflict(controller, run_module):
    controller.state.max_services = 0

    run = run_module(service, controller.args(**SPEC))

    assert run.rc == 1
    assert run.result["cause"] == "limit"
    assert run.result["status"] == 409
    assert "runs as many services as it may" in run.result["msg"]
    assert "max_services=0" in run.result["msg"]

# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""cloudlet.fleet.session against a local recording controller (see tests/unit/conftest.py)."""

from __future__ import annotations

from ansible_collections.cloudlet.fleet.plugins.modules import service, session

ECHO = {"name": "echo", "image": "localhost/cloudlet-demo:latest", "port": 7000}


def test_issues_a_new_session_each_run_and_reports_no_change_on_the_cloudlet(controller, run_module):
    run_module(service, controller.args(**ECHO))

    first = run_module(session, controller.args(name="echo"))
    second = run_module(session, controller.args(name="echo"))

    assert first.rc == 0, first.result
    # a credential is checked by its MAC: issuing one stores nothing on the cloudlet
    assert first.result["changed"] is False and second.result["changed"] is False
    assert first.result["session"] == "v2.echo.a..1764136800.nonce0001.mac"
    assert first.result["id"] == "nonce0001"
    assert first.result["host"] == "127.0.0.1"
    assert first.result["port"] == 31000
    assert first.result["service"] == "echo"
    assert first.result["cloudlet"] == "a"
    assert second.result["session"] != first.result["session"]
    assert [p for m, p in controller.writes()].count("/v1/services/echo/sessions") == 2


def test_check_mode_issues_nothing(controller, run_module):
    run_module(service, controller.args(**ECHO))

    run = run_module(session, controller.args(name="echo"), check_mode=True)

    assert run.rc == 0, run.result
    assert run.result["changed"] is False  # as a real run: nothing on the cloudlet would change
    assert "session" not in run.result
    assert controller.state.sessions == {}
    assert controller.writes() == [("PUT", "/v1/services/echo")]


def test_check_mode_fails_for_an_unknown_service(controller, run_module):
    run = run_module(session, controller.args(name="ghost"), check_mode=True)

    assert run.rc == 1
    assert run.result["cause"] == "not_found"
    assert "'ghost'" in run.result["msg"]


def test_unknown_service_fails(controller, run_module):
    run = run_module(session, controller.args(name="ghost"))

    assert run.rc == 1
    assert run.result["cause"] == "not_found"
    assert run.result["msg"].startswith("Issuing a session for service 'ghost' on cloudlet 'a'")


def test_ends_a_session_then_is_unchanged(controller, run_module):
    run_module(service, controller.args(**ECHO))
    credential = run_module(session, controller.args(name="echo")).result["session"]

    first = run_module(session, controller.args(state="absent", session=credential))
    second = run_module(session, controller.args(state="absent", session=credential))

    assert first.result["changed"] is True
    assert second.result["changed"] is False
    assert controller.state.sessions == {}
    assert ("DELETE", "/v1/sessions/" + credential) in controller.writes()
    assert credential not in first.stdout  # no_log input is masked in the result


def test_end_in_check_mode_ends_nothing(controller, run_module):
    run_module(service, controller.args(**ECHO))
    credential = run_module(session, controller.args(name="echo")).result["session"]

    run = run_module(session, controller.args(state="absent", session=credential), check_mode=True)

    assert run.result["changed"] is True
    assert credential in controller.state.sessions
    assert not any(method == "DELETE" for method, path in controller.writes())


def test_state_decides_the_required_option(controller, run_module):
    no_name = run_module(session, controller.args())
    no_session = run_module(session, controller.args(state="absent"))

    assert no_name.rc == 1 and "name" in no_name.result["msg"]
    assert no_session.rc == 1 and "session" in no_session.result["msg"]
    assert controller.requests == []


def test_wrong_token_fails(controller, run_module):
    run = run_module(session, controller.args(name="echo", controller_token="wrong-token-x"))

    assert run.rc == 1
    assert run.result["cause"] == "unauthorized"

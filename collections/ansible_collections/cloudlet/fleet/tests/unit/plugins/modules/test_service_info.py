# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""cloudlet.fleet.service_info against a local recording controller (see tests/unit/conftest.py)."""

from __future__ import annotations

from ansible_collections.cloudlet.fleet.plugins.modules import service, service_info

ECHO = {"name": "echo", "image": "localhost/cloudlet-demo:latest", "port": 7000}


def test_lists_every_service(controller, run_module):
    run_module(service, controller.args(**ECHO))
    run_module(service, controller.args(**dict(ECHO, name="echo2")))

    run = run_module(service_info, controller.args())

    assert run.rc == 0, run.result
    assert run.result["changed"] is False
    assert sorted(s["name"] for s in run.result["services"]) == ["echo", "echo2"]
    assert sorted(s["session_port"] for s in run.result["services"]) == [31000, 31001]
    assert run.result["cloudlet"] == "a"


def test_gets_one_service(controller, run_module):
    run_module(service, controller.args(**ECHO))

    run = run_module(service_info, controller.args(name="echo"))

    assert [s["name"] for s in run.result["services"]] == ["echo"]
    assert ("GET", "/v1/services/echo") in [(r.method, r.path) for r in controller.requests]


def test_missing_service_gives_an_empty_list(controller, run_module):
    run = run_module(service_info, controller.args(name="ghost"))

    assert run.rc == 0, run.result
    assert run.result["services"] == []


def test_check_mode_reads_the_same(controller, run_module):
    run_module(service, controller.args(**ECHO))

    run = run_module(service_info, controller.args(), check_mode=True)

    assert [s["name"] for s in run.result["services"]] == ["echo"]
    assert controller.writes() == [("PUT", "/v1/services/echo")]


def test_wrong_token_fails(controller, run_module):
    run = run_module(service_info, controller.args(controller_token="wrong-token-x"))

    assert run.rc == 1
    assert run.result["cause"] == "unauthorized"
    assert run.result["msg"].startswith("Listing services on cloudlet 'a'")


def test_unreachable_controller_fails(closed_port, run_module):
    run = run_module(service_info, {"controller_url": "http://127.0.0.1:%d" % closed_port, "controller_token": "x-token"})

    assert run.rc == 1
    assert run.result["cause"] == "unreachable"
    assert "127.0.0.1:%d" % closed_port in run.result["msg"]

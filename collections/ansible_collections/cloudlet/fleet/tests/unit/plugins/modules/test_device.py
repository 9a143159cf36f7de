# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""cloudlet.fleet.device against a local recording controller (see tests/unit/conftest.py)."""

from __future__ import annotations

import hashlib

import pytest

from ansible_collections.cloudlet.fleet.plugins.modules import device

SECRET = "Zq3sVb8kTn4wYh2mPx7cLd9rFg6jKs5eAu1oWi0yBvN"
SHA = hashlib.sha256(SECRET.encode()).hexdigest()
PHONE = {"device": "phone-1", "secret": SECRET, "services": ["demo"], "expires": "2099-06-30"}
JUNE_30_2099 = 4086460800


def test_registers_then_is_unchanged(controller, run_module):
    first = run_module(device, controller.args(**PHONE))
    second = run_module(device, controller.args(**PHONE))

    assert first.rc == 0, first.result
    assert (first.result["changed"], first.result["result"]) == (True, "created")
    assert (second.result["changed"], second.result["result"]) == (False, "unchanged")
    assert controller.writes() == [("PUT", "/v1/devices/phone-1")]
    [put] = [r for r in controller.requests if r.method == "PUT"]
    assert put.body == {"sha256": SHA, "services": ["demo"], "expires": JUNE_30_2099, "description": ""}
    assert first.result["device"] == {"device": "phone-1", "services": ["demo"], "expires": JUNE_30_2099,
                                      "description": "", "revoked": False}
    assert first.result["cloudlet"] == "a"


def test_the_secret_and_its_hash_never_leave_in_the_result(controller, run_module):
    runs = [run_module(device, controller.args(**PHONE), diff=True),
            run_module(device, controller.args(**dict(PHONE, services=["demo", "other"])), diff=True),
            run_module(device, controller.args(**dict(PHONE, state="revoked")), diff=True)]

    for run in runs:
        assert run.rc == 0, run.result
        assert SECRET not in run.stdout and SHA not in run.stdout
    assert runs[1].result["diff"]["before"]["services"] == ["demo"]
    assert runs[1].result["diff"]["after"]["services"] == ["demo", "other"]
    assert runs[1].result["diff"]["after"]["secret"] == "(unchanged)"


def test_a_new_secret_or_scope_or_expiry_is_a_change(controller, run_module):
    run_module(device, controller.args(**PHONE))
    other = "N" * 43
    changes = [dict(PHONE, secret=other), dict(PHONE, secret=other, services=["*"]),
               dict(PHONE, secret=other, services=["*"], expires="2099-07-01T00:00:00Z"),
               dict(PHONE, secret=other, services=["*"], expires="2099-07-01T00:00:00Z", description="Alice")]

    runs = [run_module(device, controller.args(**args), diff=True) for args in changes]

    assert [r.result["result"] for r in runs] == ["changed"] * 4
    assert runs[0].result["diff"]["after"]["secret"] == "(replaced)"
    assert controller.state.devices["phone-1"]["sha256"] == hashlib.sha256(other.encode()).hexdigest()
    assert controller.state.devices["phone-1"]["expires"] == JUNE_30_2099 + 86400
    assert controller.state.devices["phone-1"]["description"] == "Alice"


def test_sha256_instead_of_the_secret(controller, run_module):
    args = {k: v for k, v in PHONE.items() if k != "secret"}
    first = run_module(device, controller.args(sha256=SHA.upper(), **args))
    again = run_module(device, controller.args(**PHONE))  # the same secret, given as itself

    assert first.result["result"] == "created"
    assert again.result["changed"] is False


def test_check_mode_predicts_and_writes_nothing(controller, run_module):
    run = run_module(device, controller.args(**PHONE), check_mode=True)
    assert (run.rc, run.result["changed"], run.result["result"]) == (0, True, "created")
    assert controller.writes() == [] and controller.state.devices == {}

    run_module(device, controller.args(**PHONE))
    same = run_module(device, controller.args(**PHONE), check_mode=True)
    revoke = run_module(device, controller.args(device="phone-1", state="revoked"), check_mode=True)
    assert same.result["changed"] is False
    assert (revoke.result["changed"], revoke.result["result"]) == (True, "revoked")
    assert controller.state.devices["phone-1"]["revoked"] is False
    assert controller.writes() == [("PUT", "/v1/devices/phone-1")]


def test_revocation_is_idempotent_and_a_new_registration_brings_the_device_back(controller, run_module):
    run_module(device, controller.args(**PHONE))

    first = run_module(device, controller.args(device="phone-1", state="revoked"))
    second = run_module(device, controller.args(device="phone-1", state="revoked"))
    unknown = run_module(device, controller.args(device="ghost", state="revoked"))
    back = run_module(device, controller.args(**PHONE))

    assert (first.result["changed"], first.result["device"]["revoked"]) == (True, True)
    assert second.result["changed"] is False
    assert unknown.result["changed"] is False and unknown.result["device"] == {}
    assert back.result["result"] == "changed" and controller.state.devices["phone-1"]["revoked"] is False
    assert controller.writes() == [("PUT", "/v1/devices/phone-1"), ("DELETE", "/v1/devices/phone-1"),
                                   ("PUT", "/v1/devices/phone-1")]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (dict(PHONE, device="Phone_1"), "device name 'Phone_1'"),
        (dict(PHONE, secret="short"), "secret must be 20 to 100"),
        (dict(PHONE, secret=SECRET + "!"), "secret must be 20 to 100"),
        (dict(PHONE, expires="next tuesday"), "expires='next tuesday'"),
        (dict(PHONE, expires="2099-06-30T12:00:00"), "with a zone"),
        (dict(PHONE, services=["Bad Name"]), "service name 'Bad Name'"),
        (dict(PHONE, services=[]), "at least one service"),
    ],
)
def test_bad_arguments_fail_before_any_request(controller, run_module, args, words):
    run = run_module(device, controller.args(**args))

    assert run.rc == 1
    assert words in run.result["msg"]
    assert SECRET not in run.stdout
    assert [r for r in controller.requests if r.path.startswith("/v1/devices")] == []


def test_the_controller_refusal_is_reported_with_its_cause(controller, run_module):
    run = run_module(device, controller.args(**dict(PHONE, expires="2001-01-01")))

    assert run.rc == 1
    assert run.result["cause"] == "bad_request"
    assert "expires is in the past" in run.result["msg"]
    assert run.result["msg"].startswith("Registering device 'phone-1' on cloudlet 'a'")


def test_required_options(controller, run_module):
    no_secret = run_module(device, controller.args(device="x", services=["demo"], expires="2099-01-01"))
    both = run_module(device, controller.args(sha256=SHA, **PHONE))
    no_scope = run_module(device, controller.args(device="x", secret=SECRET))

    assert no_secret.rc == 1 and "secret" in no_secret.result["msg"]
    assert both.rc == 1 and "mutually exclusive" in both.result["msg"]
    assert no_scope.rc == 1 and "services" in no_scope.result["msg"]
    assert controller.requests == []


def test_wrong_token_fails(controller, run_module):
    run = run_module(device, controller.args(controller_token="wrong-token-x", **PHONE))

    assert run.rc == 1
    assert run.result["cause"] == "unauthorized"
    assert SECRET not in run.stdout

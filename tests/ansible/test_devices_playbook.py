"""cloudlet.fleet.devices end to end: ansible-playbook registers a device on every real cloudlet.

The same device credential then works on each cloudlet (sessions, fleet map), a second run changes
nothing, check mode writes nothing, a revocation reaches every cloudlet and ends the device's live
session, and the secret shows up in no Ansible output and no daemon log.
"""

from __future__ import annotations

import json
import time
import tomllib

import pytest
from cloudlet.client import SessionClient, SessionRefused
from support.ansible_fleet import REPO, Fleet
from support.controller import read_line

pytestmark = [pytest.mark.podman, pytest.mark.slow]

PLAYBOOK = REPO / "playbooks" / "devices.yml"
EXPIRES = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 200 * 86400))  # within device_lifetime_days_max


def devices_vars(*devices: dict[str, object]) -> list[str]:
    return ["-e", json.dumps({"cloudlet_devices": list(devices)})]


async def test_devices_playbook_registers_everywhere_idempotently_and_revokes(fleet2: Fleet) -> None:
    names = fleet2.names
    for stack in fleet2.stacks:
        status, _ = await stack.api("PUT", "/v1/services/echo", {"image": "localhost/cloudlet-demo:latest",
                                                                 "port": 7000})
        assert status == 201
    phone = {"device": "phone-1", "services": ["echo"], "expires": EXPIRES, "description": "test phone"}

    check_new = fleet2.playbook("--check", *devices_vars(phone), playbook=PLAYBOOK)
    assert check_new.returncode == 0, check_new.output
    assert check_new.changed() and all(n >= 1 for n in check_new.changed().values()), check_new.output
    devices_dir = fleet2.dir / "credentials" / "devices"
    assert not (devices_dir / "phone-1.secret").exists()
    for stack in fleet2.stacks:
        assert (await stack.api("GET", "/v1/devices"))[1] == {"devices": []}

    first = fleet2.playbook("--diff", *devices_vars(phone), playbook=PLAYBOOK)
    assert first.returncode == 0, first.output
    secret = (devices_dir / "phone-1.secret").read_text().strip()
    credential = (devices_dir / "phone-1.credential").read_text().strip()
    assert credential == f"cd1.phone-1.{secret}" and len(secret) == 43
    assert oct((devices_dir / "phone-1.credential").stat().st_mode & 0o777) == "0o600"
    profile = tomllib.loads((devices_dir / "phone-1.toml").read_text())["device"]
    assert profile["credential"] == credential and profile["services"] == ["echo"]
    assert profile["controllers"] == [s.controller_url for s in fleet2.stacks]
    for name in names:
        assert f"device phone-1 on cloudlet {name}: created" in first.flat, first.output

    # the one credential works on every cloudlet: a session, and the map names both cloudlets
    for stack in fleet2.stacks:
        status, record = await stack.api("GET", "/v1/devices/phone-1")
        assert status == 200 and record["services"] == ["echo"] and record["description"] == "test phone"  # type: ignore[index]
        status, sess = await stack.api("POST", "/v1/services/echo/sessions", token=credential)
        assert status == 201, sess
        assert sess["device"] == "phone-1" and sess["cloudlet"] == stack.cloudlet  # type: ignore[index]
    live = SessionClient(sess["host"], sess["port"], sess["session"])  # type: ignore[index]
    await live.open()
    assert live.reader is not None
    assert (await read_line(live.reader)).startswith("HELLO cloudlet-demo")

    second = fleet2.playbook(*devices_vars(phone), playbook=PLAYBOOK)
    assert second.returncode == 0, second.output
    assert set(second.changed().values()) == {0}, second.output
    assert (devices_dir / "phone-1.secret").read_text().strip() == secret

    # a changed scope is a change on every cloudlet, the secret stays
    wider = dict(phone, services=["echo", "other"])
    changed = fleet2.playbook("--diff", *devices_vars(wider), playbook=PLAYBOOK)
    assert changed.returncode == 0, changed.output
    for name in names:
        assert f"device phone-1 on cloudlet {name}: changed" in changed.flat

    # revocation reaches every cloudlet: refused everywhere, the live session ends, files go
    check_revoke = fleet2.playbook("--check", *devices_vars(dict(phone, state="revoked")), playbook=PLAYBOOK)
    assert check_revoke.returncode == 0 and (devices_dir / "phone-1.secret").exists(), check_revoke.output
    status, _ = await fleet2.stacks[0].api("POST", "/v1/services/echo/sessions", token=credential)
    assert status == 201  # check mode revoked nothing
    revoke = fleet2.playbook(*devices_vars(dict(phone, state="revoked")), playbook=PLAYBOOK)
    assert revoke.returncode == 0, revoke.output
    for stack in fleet2.stacks:
        status, err = await stack.api("POST", "/v1/services/echo/sessions", token=credential)
        assert status == 401 and err["error"]["code"] == "device_revoked"  # type: ignore[index]
    assert await live.reader.read(65536) == b""
    with pytest.raises(SessionRefused):
        await SessionClient(sess["host"], sess["port"], sess["session"]).open()  # type: ignore[index]
    assert not any((devices_dir / f"phone-1.{kind}").exists() for kind in ("secret", "credential", "toml"))
    again = fleet2.playbook(*devices_vars(dict(phone, state="revoked")), playbook=PLAYBOOK)
    assert set(again.changed().values()) == {0}, again.output

    # the secret is in no Ansible output (diff included) and no daemon log
    for run in (check_new, first, second, changed, check_revoke, revoke, again):
        assert secret not in run.output
    for stack in fleet2.stacks:
        logs = (stack.dir / "controller.log").read_text() + (stack.dir / "sessiond.log").read_text()
        assert secret not in logs and '"device":"phone-1"' in logs


async def test_a_bad_device_entry_stops_before_anything_changes(fleet1: Fleet) -> None:
    bad = fleet1.playbook(*devices_vars({"device": "Phone_1", "services": ["echo"], "expires": "2099-01-01"}),
                          playbook=PLAYBOOK)
    assert bad.returncode != 0
    assert "cloudlet_devices entry Phone_1" in bad.flat
    assert not (fleet1.dir / "credentials" / "devices").exists()
    assert (await fleet1.stacks[0].api("GET", "/v1/devices"))[1] == {"devices": []}

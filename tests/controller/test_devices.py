"""Device credentials against real controllers and sessiond on podman: scope, refusals, expiry,
revocation, no secret in any log, the fleet map across two cloudlets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from cloudlet.client.library import ping
from support.controller import Stack, cleanup_cloudlet, demo_body, free_port, read_line

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet", "device", "--controller", stack.controller_url,
                           "--token-file", str(stack.dir / "token"), *args], capture_output=True, text=True, timeout=60)


async def launched(stack: Stack, image: str, *names: str) -> None:
    for name in names:
        status, svc = await stack.api("PUT", f"/v1/services/{name}", demo_body(image))
        assert status == 201, svc


async def attach_and_greet(sess: dict) -> SessionClient:  # type: ignore[type-arg]
    c = SessionClient(sess["host"], sess["port"], sess["session"])
    await c.open()
    assert c.reader is not None
    assert (await read_line(c.reader)).startswith("HELLO cloudlet-demo")
    return c


async def test_a_device_credential_does_what_it_may_and_nothing_else(stack: Stack, demo_image: str) -> None:
    await launched(stack, demo_image, "demo", "other")
    issued = cli(stack, "issue", "phone-1", "--service", "demo", "--days", "1")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert re.fullmatch(r"cd1\.phone-1\.[A-Za-z0-9_-]{43}", token)
    secret = token.split(".", 2)[2]
    listed = cli(stack, "list", "--json")
    assert listed.returncode == 0 and secret not in listed.stdout
    [record] = json.loads(listed.stdout)
    assert record["device"] == "phone-1" and record["services"] == ["demo"] and not record["revoked"]

    # what it may do
    status, sess = await stack.api("POST", "/v1/services/demo/sessions", token=token)
    assert status == 201, sess
    assert sess["device"] == "phone-1" and sess["session"].split(".")[3] == "phone-1"  # type: ignore[index]
    assert [e["cloudlet"] for e in sess["map"]["cloudlets"]] == [stack.cloudlet]  # type: ignore[index]
    status, fleet_map = await stack.api("GET", "/v1/services/demo/map", token=token)
    assert status == 200 and fleet_map["anchor"] == stack.cloudlet  # type: ignore[index]
    c = await attach_and_greet(sess)  # type: ignore[arg-type]
    _, listed_sessions = await stack.sessiond("GET", "/v1/sessions")
    assert [s["device"] for s in listed_sessions["sessions"]] == ["phone-1"]  # type: ignore[index]
    assert '"device":"phone-1"' in (stack.dir / "sessiond.log").read_text()  # sessiond logs the id too

    # what it may not do: every refusal a clear 401/403 with a code
    refused = {
        ("GET", "/v1/services"): (403, "forbidden"),
        ("GET", "/v1/services/demo"): (403, "forbidden"),
        ("PUT", "/v1/services/demo"): (403, "forbidden"),
        ("DELETE", "/v1/services/demo"): (403, "forbidden"),
        ("GET", "/v1/devices"): (403, "forbidden"),
        ("DELETE", "/v1/devices/phone-1"): (403, "forbidden"),
        ("POST", "/v1/services/other/sessions"): (403, "out_of_scope"),
        ("GET", "/v1/services/other/map"): (403, "out_of_scope"),
    }
    for (method, path), (code_status, code) in refused.items():
        status, err = await stack.api(method, path, demo_body(demo_image) if method == "PUT" else None, token=token)
        assert (status, err["error"]["code"]) == (code_status, code), (method, path, status, err)  # type: ignore[index]
    for bad in (token[:-5], token + "x", "cd1.phone-1." + "A" * 43, "cd1.nobody." + secret, "cd1.phone-1"):
        status, err = await stack.api("POST", "/v1/services/demo/sessions", token=bad)
        assert status == 401 and err["error"]["code"] == "unauthorized", (bad[:20], err)  # type: ignore[index]

    # its own sessions only
    status, admin_sess = await stack.api("POST", "/v1/services/demo/sessions")
    assert status == 201
    status, err = await stack.api("DELETE", f"/v1/sessions/{admin_sess['session']}", token=token)  # type: ignore[index]
    assert status == 403 and err["error"]["code"] == "not_yours"  # type: ignore[index]
    status, _ = await stack.api("DELETE", f"/v1/sessions/{sess['session']}", token=token)  # type: ignore[index]
    assert status == 204
    await c.close()

    # refusals are counted, and logged with the device id, never a secret
    _, metrics = await stack.api("GET", "/metrics", token=None)
    for code in ("forbidden", "out_of_scope", "unauthorized", "not_yours"):
        assert f'cloudlet_controller_auth_refusals_total{{code="{code}"}}' in str(metrics), code
    logs = (stack.dir / "controller.log").read_text() + (stack.dir / "sessiond.log").read_text()
    assert secret not in logs and token not in logs
    assert '"device":"phone-1"' in logs


async def test_expiry_and_revocation_reach_the_controller_and_sessiond(stack: Stack, demo_image: str) -> None:
    await launched(stack, demo_image, "demo")
    secret = "s" * 43
    status, _ = await stack.api("PUT", "/v1/devices/short", {
        "sha256": hashlib.sha256(secret.encode()).hexdigest(), "services": ["*"], "expires": int(time.time()) + 3})
    assert status == 201
    token = f"cd1.short.{secret}"
    status, sess = await stack.api("POST", "/v1/services/demo/sessions", token=token)
    assert status == 201
    await asyncio.sleep(3.5)
    status, err = await stack.api("POST", "/v1/services/demo/sessions", token=token)
    assert status == 401 and err["error"]["code"] == "device_expired"  # type: ignore[index]
    with pytest.raises(SessionRefused) as info:  # the session credential it got before: sessiond refuses it too
        await SessionClient(sess["host"], sess["port"], sess["session"]).open()  # type: ignore[index]
    assert info.value.status == Status.DEVICE_REFUSED and "expired" in str(info.value)

    issued = cli(stack, "issue", "tablet", "--service", "demo")
    token = issued.stdout.strip()
    status, sess = await stack.api("POST", "/v1/services/demo/sessions", token=token)
    assert status == 201
    live = await attach_and_greet(sess)  # type: ignore[arg-type]
    revoked = cli(stack, "revoke", "tablet")
    assert revoked.returncode == 0, revoked.stderr
    status, err = await stack.api("POST", "/v1/services/demo/sessions", token=token)
    assert status == 401 and err["error"]["code"] == "device_revoked"  # type: ignore[index]
    assert live.reader is not None  # its live session ended at once (no daemon restarted)
    assert await asyncio.wait_for(live.reader.read(65536), 10) == b""
    with pytest.raises(SessionRefused) as info:
        await SessionClient(sess["host"], sess["port"], sess["session"]).open()  # type: ignore[index]
    assert info.value.status in (Status.DEVICE_REFUSED, Status.SESSION_ENDED)
    status, listed = await stack.api("GET", "/v1/devices")
    assert {d["device"]: d["revoked"] for d in listed["devices"]}["tablet"] is True  # type: ignore[index]


async def test_fleet_map_lists_every_cloudlet_running_the_service(tmp_path: Path, podman_socket: str, demo_image: str,
                                                                 cloudlet_name: str) -> None:
    b_name = cloudlet_name + "-b"
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Stack(tmp_path / "a", cloudlet_name, podman_socket, listen=f"127.0.0.1:{ports[0]}",
              fleet_members=[(b_name, urls[1])])
    b = Stack(tmp_path / "b", b_name, podman_socket, listen=f"127.0.0.1:{ports[1]}", token=a.token,
              fleet_members=[(cloudlet_name, urls[0])])
    (b.dir / "fleet.secret").write_text((a.dir / "fleet.secret").read_text())  # one fleet: one secret, one token
    try:
        for s in (a, b):
            await s.start_sessiond()
            await s.start_controller()
        await launched(a, demo_image, "demo")
        secret = "m" * 43
        for s in (a, b):  # one device, registered on every cloudlet (what cloudlet.fleet.device does)
            status, _ = await s.api("PUT", "/v1/devices/car", {
                "sha256": hashlib.sha256(secret.encode()).hexdigest(), "services": ["demo"],
                "expires": int(time.time()) + 600})
            assert status == 201
        token = f"cd1.car.{secret}"
        status, fleet_map = await a.api("GET", "/v1/services/demo/map", token=token)
        assert status == 200, fleet_map
        assert [e["cloudlet"] for e in fleet_map["cloudlets"]] == [a.cloudlet]  # type: ignore[index]
        assert fleet_map["unavailable"] == [b_name]  # type: ignore[index]  # b does not run it (yet)
        await launched(b, demo_image, "demo")
        await asyncio.sleep(2.1)  # past map_cache_seconds
        status, fleet_map = await a.api("GET", "/v1/services/demo/map", token=token)
        assert status == 200
        assert sorted(e["cloudlet"] for e in fleet_map["cloudlets"]) == sorted([a.cloudlet, b_name])  # type: ignore[index]
        assert all(e["probe"]["op"] == "ping" for e in fleet_map["cloudlets"])  # type: ignore[index]
        for e in fleet_map["cloudlets"]:  # type: ignore[index]  # every probe endpoint answers a PING
            assert await ping(e["probe"]["host"], e["probe"]["port"]) < 2.0
        # the device works on b too, with the same credential, and the session reply carries the map
        status, sess = await b.api("POST", "/v1/services/demo/sessions", token=token)
        assert status == 201 and sess["cloudlet"] == b_name and len(sess["map"]["cloudlets"]) == 2  # type: ignore[index]
        c = await attach_and_greet(sess)  # type: ignore[arg-type]
        await c.close()
    finally:
        await a.close()
        await b.close()
        cleanup_cloudlet(b_name)

"""The controller API over TLS with a fleet CA: a client that trusts the CA connects; one without it,
or one that asks for another host name, is refused; plain HTTP is served on loopback only; the
fleet map is read from https members; the device CLI verifies the certificate."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from support.controller import Stack, cleanup_cloudlet, demo_body, free_port
from support.tls import CA

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def tls_lines(cert: Path, key: Path) -> str:
    return f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'


async def get(url: str, ssl_arg: ssl.SSLContext | bool | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url, ssl=ssl_arg if ssl_arg is not None else True) as resp:
            return resp.status, await resp.text()


async def test_https_with_the_fleet_ca_and_nothing_else(tmp_path: Path, podman_socket: str,
                                                      cloudlet_name: str) -> None:
    ca = CA.create(tmp_path / "ca")
    cert, key = ca.issue(tmp_path / "ca", "a", dns=["cloudlet-a.test"], ips=["127.0.0.1"])
    local_port = free_port()
    stack = Stack(tmp_path, cloudlet_name, podman_socket, controller_extra=tls_lines(cert, key),
                  local_listen=f"127.0.0.1:{local_port}", ca_file=str(ca.path))
    try:
        await stack.start_sessiond()
        await stack.start_controller()
        assert stack.controller_url.startswith("https://127.0.0.1:")
        port = stack.controller_url.rsplit(":", 1)[1]

        # trusted CA, right name: served, and the API works with the admin token
        status, body = await get(stack.controller_url + "/v1/health", ssl.create_default_context(cafile=ca.path))
        assert status == 200 and cloudlet_name in body
        status, listed = await stack.api("GET", "/v1/services")
        assert status == 200 and listed == {"services": []}

        # no CA: the system trust store does not know the fleet CA
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await get(stack.controller_url + "/v1/health")
        assert "certificate verify failed" in str(info.value)
        # another fleet's CA
        other = CA.create(tmp_path / "other", "another fleet")
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(stack.controller_url + "/v1/health", ssl.create_default_context(cafile=other.path))
        # the right CA, the wrong name: "localhost" is not on the certificate
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await get(f"https://localhost:{port}/v1/health", ssl.create_default_context(cafile=ca.path))
        assert "match" in str(info.value) or "mismatch" in str(info.value)
        # plain HTTP on the TLS port gets no API
        with pytest.raises(aiohttp.ClientError):
            await get(f"http://127.0.0.1:{port}/v1/health")

        # the loopback listener: plain HTTP for local tools, the same API behind the same token
        assert stack.local_url == f"http://127.0.0.1:{local_port}"
        status, body = await get(stack.local_url + "/v1/health")
        assert status == 200
        issued = subprocess.run(
            [sys.executable, "-m", "cloudlet", "device", "--controller", stack.local_url, "--token-file",
             str(stack.dir / "token"), "issue", "phone-1", "--service", "*", "--days", "1"],
            capture_output=True, text=True, timeout=60)
        assert issued.returncode == 0, issued.stderr
        # the device CLI over https: refused without the CA, listed with it
        base = [sys.executable, "-m", "cloudlet", "device", "--controller", stack.controller_url,
                "--token-file", str(stack.dir / "token")]
        untrusted = subprocess.run([*base, "list"], capture_output=True, text=True, timeout=60)
        assert untrusted.returncode != 0 and "certificate verify failed" in untrusted.stderr
        trusted = subprocess.run([*base, "--ca-file", str(ca.path), "list"], capture_output=True, text=True, timeout=60)
        assert trusted.returncode == 0 and "phone-1" in trusted.stdout, trusted.stderr
    finally:
        await stack.close()


@pytest.mark.parametrize(("lines", "words"), [
    ('local_listen = "0.0.0.0:8701"', "controller.local_listen: plain HTTP is served on loopback only"),
    ('tls_cert_file = "/x.crt"', "tls_cert_file and tls_key_file go together"),
    ('listen = "0.0.0.0:8700"', "listen 0.0.0.0:8700 is not loopback: serve it over TLS"),
    ('listen = "192.0.2.1:8700"', "listen 192.0.2.1:8700 is not loopback"),
])
def test_plain_http_off_loopback_and_a_half_tls_pair_are_refused(tmp_path: Path, lines: str, words: str) -> None:
    (tmp_path / "bad.toml").write_text(f'[controller]\ncloudlet = "a"\n{lines}\n')
    done = subprocess.run([sys.executable, "-m", "cloudlet", "controller", "--config", str(tmp_path / "bad.toml"),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert words in done.stderr


def test_plain_http_off_loopback_only_when_asked_for(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_text('[controller]\ncloudlet = "a"\nlisten = "0.0.0.0:8700"\n'
                                       "insecure_plain_http = true\n")
    done = subprocess.run([sys.executable, "-m", "cloudlet", "controller", "--config", str(tmp_path / "lab.toml"),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert "not loopback" not in done.stderr


async def test_the_fleet_map_is_read_from_https_members(tmp_path: Path, podman_socket: str, demo_image: str,
                                                      cloudlet_name: str) -> None:
    ca = CA.create(tmp_path / "ca")
    b_name = cloudlet_name + "-b"
    ports = [free_port(), free_port()]
    stacks: list[Stack] = []
    for name, port, other, other_port in [(cloudlet_name, ports[0], b_name, ports[1]),
                                          (b_name, ports[1], cloudlet_name, ports[0])]:
        (tmp_path / name).mkdir()
        cert, key = ca.issue(tmp_path / "ca", name, dns=[name + ".test"], ips=["127.0.0.1"])
        s = Stack(tmp_path / name, name, podman_socket, listen=f"127.0.0.1:{port}",
                  fleet_members=[(other, f"https://127.0.0.1:{other_port}")], fleet_ca_file=str(ca.path),
                  controller_extra=tls_lines(cert, key), ca_file=str(ca.path),
                  **({"token": stacks[0].token} if stacks else {}))
        stacks.append(s)
    a, b = stacks
    (b.dir / "fleet.secret").write_text((a.dir / "fleet.secret").read_text())  # one fleet
    try:
        for s in (a, b):
            await s.start_sessiond()
            await s.start_controller()
        for s in (a, b):
            status, svc = await s.api("PUT", "/v1/services/demo", demo_body(demo_image))
            assert status == 201, svc
        secret = "t" * 43
        for s in (a, b):
            status, _ = await s.api("PUT", "/v1/devices/car", {
                "sha256": hashlib.sha256(secret.encode()).hexdigest(), "services": ["demo"],
                "expires": int(time.time()) + 600})
            assert status == 201
        status, fleet_map = await a.api("GET", "/v1/services/demo/map", token=f"cd1.car.{secret}")
        assert status == 200, fleet_map
        assert sorted(e["cloudlet"] for e in fleet_map["cloudlets"]) == sorted([a.cloudlet, b_name])  # type: ignore[index]
        assert fleet_map["unavailable"] == []  # type: ignore[index]
    finally:
        for s in (a, b):
            await s.close()
        cleanup_cloudlet(b_name)
        await asyncio.sleep(0)

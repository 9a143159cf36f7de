"""Handover A -> B -> C across network namespaces, each cloudlet with its own sshd and sessiond."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from cloudlet.protocol import credentials
from support.netns import SECRET, SERVICE_PORT, Bed, attach_once, netns_unavailable, run_device, scrape_metrics

pytestmark = [pytest.mark.netns, pytest.mark.sshd, pytest.mark.slow]

CLOUDLETS = ["a", "b", "c"]


@pytest.fixture
def bed() -> Iterator[Bed]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"multi-host test bed unavailable: {reason}")
    b = Bed()
    try:
        b.create_network({"a": 1, "b": 2, "c": 3, "dev": 9})
        b.setup_cloudlets(CLOUDLETS)
        b.start_echo(b.nodes["a"])
        for name in CLOUDLETS:
            b.start_sessiond(b.nodes[name])
        yield b
    finally:
        b.destroy()


async def api(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:
        async with http.request(method, f"http://sessiond{path}", json=body) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else None)


async def wait_api(bed: Bed, name: str, timeout: float = 30) -> None:
    node = bed.nodes[name]
    deadline = time.monotonic() + timeout
    while True:
        assert node.sessiond is not None
        if node.sessiond.poll() is not None:
            raise AssertionError(f"sessiond {name} exited: {node.log()[-3000:]}")
        try:
            status, _ = await api(node.control_socket, "GET", "/v1/health")
            if status == 200:
                return
        except (aiohttp.ClientError, OSError):
            pass
        assert time.monotonic() < deadline, f"sessiond {name} did not answer: {node.log()[-3000:]}"
        await asyncio.sleep(0.05)


async def peers(bed: Bed, name: str) -> dict[str, dict[str, Any]]:
    status, body = await api(bed.nodes[name].control_socket, "GET", "/v1/peers")
    assert status == 200, body
    return {p["name"]: p for p in body["peers"]}


async def wait_peer(bed: Bed, name: str, peer: str, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = (await peers(bed, name))[peer]
        if p["state"] == state:
            return p
        assert time.monotonic() < deadline, f"{name} -> {peer} never {state}: {p}"
        await asyncio.sleep(0.05)


async def test_handover_a_b_c_over_ssh_tunnels_every_byte_checked(bed: Bed) -> None:
    for name in CLOUDLETS:
        await wait_api(bed, name)
        backend = "127.0.0.1:7000" if name == "a" else "127.0.0.1:9"
        status, svc = await api(bed.nodes[name].control_socket, "PUT", "/v1/services/echo",
                                {"backend": backend, "port": SERVICE_PORT, "listen": "0.0.0.0"})
        assert status in (200, 201), svc
    for name in ("b", "c"):
        p = await wait_peer(bed, name, "a", "up")
        assert p["transport"] == "ssh" and p["cipher"] == "aes128-gcm@openssh.com"
    cred = credentials.issue(SECRET, "echo", "a").token
    hosts = {n: bed.nodes[n].address for n in CLOUDLETS}
    out = await asyncio.to_thread(run_device, bed, json.dumps({"hosts": hosts, "port": SERVICE_PORT, "credential": cred}))
    assert out.returncode == 0, out.stderr + "\n".join(bed.nodes[n].log()[-2000:] for n in CLOUDLETS)
    result = json.loads(out.stdout)
    assert result["checked"] == 1_000_000 + 2 * (300_000 + 2_000_000) + 300_000
    assert result["end"] == "OK"
    # the forwarded legs really went through the SSH tunnels: channels opened on b and c, and a's sshd
    # accepted each cloudlet's own key (the device never reached a's peer endpoint directly)
    for name in ("b", "c"):
        p = (await peers(bed, name))["a"]
        assert p["state"] == "up" and p["channels"] == 0 and p["channels_opened"] >= 1, p
        assert p["rtt_ms"] is not None and 0 < p["rtt_ms"] < 1000, p
    sshd_log = bed.nodes["a"].sshd.log_text()  # type: ignore[union-attr]
    assert sshd_log.count("Accepted publickey for cltunnel from 10.213.0.2") >= 1
    assert sshd_log.count("Accepted publickey for cltunnel from 10.213.0.3") >= 1
    status, body = await api(bed.nodes["a"].control_socket, "GET", "/v1/sessions")
    assert status == 200 and body["sessions"] == []

    # a's sshd dies: b refuses a forwarded attach fast with PEER_UNAVAILABLE; back up -> works again
    cred2 = credentials.issue(SECRET, "echo", "a").token
    a_sshd = bed.nodes["a"].sshd
    assert a_sshd is not None
    a_sshd.kill()
    deadline = time.monotonic() + 20
    while (await peers(bed, "b"))["a"]["state"] == "up":
        assert time.monotonic() < deadline, "b never noticed that a's sshd died"
        await asyncio.sleep(0.05)
    refused = json.loads((await asyncio.to_thread(attach_once, bed, json.dumps(
        {"host": hosts["b"], "port": SERVICE_PORT, "credential": cred2, "target": "a"}))).stdout)
    assert refused["status"] == "PEER_UNAVAILABLE" and refused["ms"] < 1000, refused
    a_sshd.start()
    p = await wait_peer(bed, "b", "a", "up")
    assert p["reconnects"] >= 1
    ok = json.loads((await asyncio.to_thread(attach_once, bed, json.dumps(
        {"host": hosts["b"], "port": SERVICE_PORT, "credential": cred2, "target": "a"}))).stdout)
    assert ok["status"] == "OK", ok
    # b's sessiond exports the tunnel metrics on its own registry
    text = await asyncio.to_thread(scrape_metrics, bed, "b")
    assert 'cloudlet_tunnel_up{peer="a"} 1.0' in text and 'cloudlet_tunnel_up{peer="c"} 1.0' in text
    reconnects = [line for line in text.splitlines() if line.startswith('cloudlet_tunnel_reconnects_total{peer="a"}')]
    assert reconnects and float(reconnects[0].split()[-1]) >= 1.0, reconnects
    refusals = [line for line in text.splitlines()
                if line.startswith('cloudlet_tunnel_channel_open_failures_total{peer="a"}')]
    assert refusals and float(refusals[0].split()[-1]) >= 1.0, refusals  # the refused attach above
    assert 'cloudlet_tunnel_rtt_seconds{peer="a"}' in text

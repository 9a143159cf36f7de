"""`cloudlet agent run --profile` against a real controller and sessiond on podman: each program
connection gets its own session with the device's own credential; revoking the device closes them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.controller import Stack, demo_body, poll, read_line

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def device_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet", "device", "--controller", stack.controller_url,
                           "--token-file", str(stack.dir / "token"), *args], capture_output=True, text=True, timeout=60)


async def test_the_agent_gets_a_session_per_connection_from_the_controller(stack: Stack, demo_image: str,
                                                                          tmp_path: Path) -> None:
    status, svc = await stack.api("PUT", "/v1/services/demo", demo_body(demo_image))
    assert status == 201, svc
    issued = device_cli(stack, "issue", "tablet-7", "--service", "demo", "--days", "1")
    assert issued.returncode == 0, issued.stderr
    profile = tmp_path / "tablet-7.toml"
    profile.write_text(f'[device]\nid = "tablet-7"\ncredential = "{issued.stdout.strip()}"\n'
                       f'services = ["demo"]\ncontrollers = ["{stack.controller_url}"]\n')
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudlet", "agent", "run", "--profile", str(profile), "--listen", "127.0.0.1:0",
        "--control-socket", str(tmp_path / "agent.sock"), "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert agent.stdout is not None and agent.stderr is not None
        info = json.loads(await asyncio.wait_for(agent.stdout.readline(), 30))
        assert info["cloudlet"] == stack.cloudlet and info["cloudlets"] == [stack.cloudlet]
        port = int(info["listen"].rsplit(":", 1)[1])
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        greetings = [await read_line(r, 30) for r, _ in conns]
        assert all(g.startswith("HELLO cloudlet-demo") for g in greetings)
        assert len({g.split("conn=")[1] for g in greetings}) == 3  # three backend connections
        for i, (r, w) in enumerate(conns):
            w.write(f"ECHO from {i}\n".encode())
            assert await read_line(r) == f"from {i}"
        _, listed = await stack.sessiond("GET", "/v1/sessions")
        assert [s["device"] for s in listed["sessions"]] == ["tablet-7"] * 3  # type: ignore[index]
        status_proc = subprocess.run([sys.executable, "-m", "cloudlet", "agent", "status", "--control-socket",
                                      str(tmp_path / "agent.sock")], capture_output=True, text=True, timeout=30)
        status_json = json.loads(status_proc.stdout)
        assert status_json["connections"] == 3 and status_json["service"] == "demo"
        assert status_json["nearness"][stack.cloudlet]["up"] is True

        revoked = device_cli(stack, "revoke", "tablet-7")
        assert revoked.returncode == 0, revoked.stderr
        for r, _ in conns:  # the device's sessions end: each program connection sees the end
            assert await asyncio.wait_for(r.read(), 30) == b""
        r4, _ = await asyncio.open_connection("127.0.0.1", port)  # and no new session is given
        assert await asyncio.wait_for(r4.read(), 30) == b""

        async def agent_says_no() -> bool:
            return (await poll_metrics(tmp_path / "agent.sock")) >= 1

        await poll(agent_says_no, 10, "the refused connection counted")
    finally:
        agent.terminate()
        _, err = await asyncio.wait_for(agent.communicate(), 30)
    assert issued.stdout.strip().split(".", 2)[2] not in err.decode()  # the device secret is never logged


async def poll_metrics(sock: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "cloudlet", "agent", "metrics", "--control-socket", str(sock)],
                         capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("cloudlet_agent_connections_refused_total "):
            return float(line.split()[1])
    return 0.0

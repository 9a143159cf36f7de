"""A config reload changes peers and limits in place and touches no session (sessiond/reload.py).

Real ``cloudlet sessiond`` subprocesses reloaded the way the unit's ``ExecReload`` does it
(``cloudlet sessiond --config FILE --reload``) and by SIGHUP; byte-checked sessions, local and
forwarded, that must keep their connection; an echo backend that counts its connections.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from cloudlet_bench.harness.sessiond import SessiondProcess, peer_table, write_config
from support.sessiond import Backend, issue, start_sessiond_process, wait_for


@pytest.fixture
async def echo() -> AsyncIterator[Backend]:
    b = await Backend(echo=True).start()
    yield b
    await b.stop()


def _table(proc: SessiondProcess, secret_file: Path, **options: Any) -> dict[str, Any]:
    directory = proc.config_path.parent
    return {"cloudlet": proc.name, "secret_file": str(secret_file), "control_socket": proc.control_socket,
            "state_dir": str(directory / "state"), "peer_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
            **options}


def _reload(proc: SessiondProcess) -> subprocess.CompletedProcess[str]:
    """What ``systemctl reload cloudlet-sessiond`` runs (the unit's ExecReload)."""
    return subprocess.run([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(proc.config_path), "--reload"],
                          capture_output=True, text=True, timeout=60, check=False)


async def _peers(proc: SessiondProcess) -> dict[str, str]:
    _, body = await proc.api("GET", "/v1/peers")
    return {p["name"]: p.get("address", "") for p in body["peers"]}


async def _metrics(proc: SessiondProcess) -> str:
    _, health = await proc.api("GET", "/v1/health")
    async with aiohttp.ClientSession() as http, http.get(f"http://{health['metrics_listen']}/metrics") as resp:
        return await resp.text()


async def _echoes(client: SessionClient, tag: bytes) -> None:
    await client.send(tag)
    assert await asyncio.wait_for(client.recv_exactly(len(tag)), 10) == tag


async def test_adding_and_removing_a_peer_touches_no_session(tmp_path: Path, secret_file: Path, echo: Backend) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    b = await start_sessiond_process(tmp_path / "b", secret_file, "b", peers={"a": a.peer_listen})
    c = await start_sessiond_process(tmp_path / "c", secret_file, "c")
    try:
        port_a = await a.put_service("svc", echo.address)
        port_b = await b.put_service("svc", "127.0.0.1:9")
        local = SessionClient("127.0.0.1", port_a, issue("svc", anchor="a"), resumable=True)
        forwarded = SessionClient("127.0.0.1", port_a, issue("svc", anchor="a"), resumable=True)
        await local.open()
        await forwarded.open()
        await forwarded.handover("127.0.0.1", port_b, target="a")  # now b -> a over the hop
        await _echoes(local, b"local-1\n")
        await _echoes(forwarded, b"forwarded-1\n")
        assert len(echo.conns) == 2

        write_config(b.config_path, _table(b, secret_file),
                     {"a": peer_table(a.peer_listen), "c": peer_table(c.peer_listen)})
        done = _reload(b)
        assert done.returncode == 0, done.stderr
        assert "peers added: c" in done.stdout
        assert await _peers(b) == {"a": a.peer_listen, "c": c.peer_listen}
        await _echoes(forwarded, b"forwarded-2\n")  # the same connection, over the same hop

        write_config(b.config_path, _table(b, secret_file), {"a": peer_table(a.peer_listen)})
        b.proc.send_signal(signal.SIGHUP)  # the other way in: the same reload, its outcome in the log
        await wait_for(lambda: '"peers_removed":["c"]' in b.log(), what="the SIGHUP reload")
        assert await _peers(b) == {"a": a.peer_listen}
        await _echoes(forwarded, b"forwarded-3\n")
        await _echoes(local, b"local-2\n")
        assert len(echo.conns) == 2  # no session was rebuilt: the backend saw no new connection
        _, sessions = await a.api("GET", "/v1/sessions")
        assert sorted(s["state"] for s in sessions["sessions"]) == ["attached", "attached"]
        metrics = await _metrics(b)
        assert 'cloudlet_sessiond_reloads_total{result="applied"} 2.0' in metrics
    finally:
        for p in (a, b, c):
            p.stop()


async def test_a_broken_config_is_refused_and_the_running_one_stays(tmp_path: Path, secret_file: Path,
                                                                    echo: Backend) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    b = await start_sessiond_process(tmp_path / "b", secret_file, "b", peers={"a": a.peer_listen})
    try:
        a_port = await a.put_service("svc", echo.address)
        port_b = await b.put_service("svc", "127.0.0.1:9")
        forwarded = SessionClient("127.0.0.1", a_port, issue("svc", anchor="a"), resumable=True)
        await forwarded.open()
        await forwarded.handover("127.0.0.1", port_b, target="a")
        await _echoes(forwarded, b"one\n")
        good = b.config_path.read_text()

        b.config_path.write_text(good.replace("[sessiond]", "[sessiond]\ngrace_seconds = -1\nno_such_key = 1"))
        done = _reload(b)
        assert done.returncode == 2, done.stderr
        assert "sessiond.grace_seconds" in done.stderr and "sessiond.no_such_key" in done.stderr
        assert "reload refused, the running sessiond keeps its config" in done.stderr
        b.config_path.write_text(good + '\n[peers.c]\ntransport = "tcp"\naddress = "nonsense"\n')
        b.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload refused" in b.log(), what="the refused SIGHUP reload in the log")
        assert await _peers(b) == {"a": a.peer_listen}  # nothing applied

        b.config_path.write_text(good.replace('peer_listen = "127.0.0.1:0"', 'peer_listen = "127.0.0.1:1"'))
        done = _reload(b)
        assert done.returncode == 3, done.stderr  # valid, but only a restart can apply it
        assert "sessiond.peer_listen changed" in done.stderr and "systemctl restart" in done.stderr

        await _echoes(forwarded, b"two\n")  # the running daemon never noticed
        b.config_path.write_text(good)
        assert _reload(b).returncode == 0
        metrics = await _metrics(b)
        # the SIGHUP and the restart-only change; --reload refused the first file without asking the daemon
        assert 'cloudlet_sessiond_reloads_total{result="refused"} 2.0' in metrics
    finally:
        a.stop()
        b.stop()


async def test_reloaded_limits_hold_for_new_sessions_and_spare_live_ones(tmp_path: Path, secret_file: Path,
                                                                         echo: Backend) -> None:
    a = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    try:
        port = await a.put_service("svc", echo.address)
        first = SessionClient("127.0.0.1", port, issue("svc"), resumable=True)
        second = SessionClient("127.0.0.1", port, issue("svc"), resumable=True)
        await first.open()
        await second.open()
        write_config(a.config_path, _table(a, secret_file, max_sessions=1, log_level="debug"))
        assert _reload(a).returncode == 0
        with pytest.raises(SessionRefused) as refused:
            await SessionClient("127.0.0.1", port, issue("svc"), resumable=True).open()
        assert refused.value.status == Status.TOO_MANY_SESSIONS
        await _echoes(first, b"still here\n")  # over the new limit, and kept
        await _echoes(second, b"me too\n")
        write_config(a.config_path, _table(a, secret_file, max_sessions=10))
        assert _reload(a).returncode == 0
        third = SessionClient("127.0.0.1", port, issue("svc"), resumable=True)
        await third.open()
        await _echoes(third, b"room again\n")
    finally:
        a.stop()


def test_reload_of_a_daemon_that_is_not_running_says_so(tmp_path: Path, secret_file: Path) -> None:
    cfg = tmp_path / "sessiond.toml"
    write_config(cfg, {"cloudlet": "a", "secret_file": str(secret_file), "control_socket": str(tmp_path / "none.sock"),
                       "state_dir": str(tmp_path / "state")})
    done = subprocess.run([sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg), "--reload"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "cannot reach the running sessiond" in done.stderr

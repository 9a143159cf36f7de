"""The control API on the Unix socket, persistence of services, metrics, and sessiond as a real process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request

import pytest
from cloudlet.client import SessionClient, SessionRefused
from cloudlet.protocol.wire import Status
from support.sessiond import Backend, api, issue, start_sessiond_process


async def test_services_crud_and_errors(make_sessiond, echo_backend: Backend, backend: Backend) -> None:
    a = await make_sessiond("a")
    sock = a.config.control_socket
    status, health = await api(sock, "GET", "/v1/health")
    assert status == 200 and health["status"] == "ok" and health["cloudlet"] == "a" and health["services"] == 0
    status, svc = await api(sock, "PUT", "/v1/services/echo", {"backend": echo_backend.address, "port": 0, "listen": "127.0.0.1"})
    assert status == 200
    assert svc["name"] == "echo" and svc["port"] > 0 and svc["backend"] == echo_backend.address and svc["sessions"] == 0
    port = svc["port"]
    # idempotent
    status, again = await api(sock, "PUT", "/v1/services/echo", {"backend": echo_backend.address, "port": port, "listen": "127.0.0.1"})
    assert status == 200 and again["port"] == port
    c = SessionClient("127.0.0.1", port, issue("echo"))
    await c.open()
    status, listed = await api(sock, "GET", "/v1/services")
    assert [(s["name"], s["sessions"]) for s in listed["services"]] == [("echo", 1)]
    status, sessions = await api(sock, "GET", "/v1/sessions?service=echo")
    (only,) = sessions["sessions"]
    assert only["state"] == "attached" and only["id"] == c.credential.split(".")[5]
    assert set(only) >= {"id", "service", "state", "since", "bytes_up", "bytes_down", "buffered"}
    assert c.credential not in json.dumps(sessions)  # the token itself is never shown
    # changing the backend keeps the port; changing the port rebinds and live sessions stay
    status, moved = await api(sock, "PUT", "/v1/services/echo", {"backend": backend.address, "port": 0, "listen": "127.0.0.1"})
    assert status == 200 and moved["port"] == port and moved["backend"] == backend.address
    await c.send(b"old-backend-still")
    assert await c.recv_exactly(17) == b"old-backend-still"
    # errors
    for method, path, body, code, err in [
        ("PUT", "/v1/services/Bad_Name", {"backend": "127.0.0.1:1"}, 400, "bad_request"),
        ("PUT", "/v1/services/x", {"backend": "nope"}, 400, "bad_request"),
        ("PUT", "/v1/services/x", {"backend": "127.0.0.1:1", "port": "80"}, 400, "bad_request"),
        ("PUT", "/v1/services/x", {"backend": "127.0.0.1:1", "colour": 1}, 400, "bad_request"),
        ("PUT", "/v1/services/x", {"backend": "127.0.0.1:1", "port": port, "listen": "127.0.0.1"}, 409, "port_unavailable"),
        ("DELETE", "/v1/services/none", None, 404, "not_found"),
        ("DELETE", "/v1/sessions/unknown-id", None, 404, "not_found"),
        ("DELETE", "/v1/sessions/v2.echo.a..1.AA.BB", None, 400, "bad_request"),
    ]:
        status, body_ = await api(sock, method, path, body)
        assert status == code and body_["error"]["code"] == err and body_["error"]["message"], (path, status, body_)
    # end a session by id through the API
    status, _ = await api(sock, "DELETE", f"/v1/sessions/{only['id']}")
    assert status == 204
    with pytest.raises(SessionRefused) as e:
        await SessionClient("127.0.0.1", port, c.credential).open()
    assert e.value.status == Status.SESSION_ENDED
    # and by credential
    c2 = SessionClient("127.0.0.1", port, issue("echo"))
    await c2.open()
    assert (await api(sock, "DELETE", f"/v1/sessions/{c2.credential}"))[0] == 204
    # deleting the service ends its sessions and closes the port
    c3 = SessionClient("127.0.0.1", port, issue("echo"))
    await c3.open()
    be = await backend.next_conn()
    assert (await api(sock, "DELETE", "/v1/services/echo"))[0] == 204
    assert await asyncio.wait_for(be.reader.read(10), 5) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    status, peers = await api(sock, "GET", "/v1/peers")
    assert status == 200 and peers == {"peers": []}


async def test_peers_status_and_metrics(make_sessiond, echo_backend: Backend) -> None:
    a = await make_sessiond("a")
    b = await make_sessiond("b", peers={"a": {"transport": "tcp", "address": "%s:%d" % a.peer_address},
                                        "z": {"transport": "tcp", "address": "127.0.0.1:1"}})
    await a.put_service("echo", echo_backend.address)
    entry, _ = await b.put_service("echo", echo_backend.address)
    # b probed its peers at start (connect and close): state is known before any forward ...
    _, peers = await api(b.config.control_socket, "GET", "/v1/peers")
    assert {p["name"]: p["state"] for p in peers["peers"]} == {"a": "up", "z": "down"}
    # ... and a probe is no header error at the peer endpoint
    assert a.metrics.header_errors._value.get() == 0  # type: ignore[attr-defined]
    c = SessionClient("127.0.0.1", entry.port, issue("echo"), "a")
    await c.open()
    await c.send(b"12345")
    assert await c.recv_exactly(5) == b"12345"
    with pytest.raises(SessionRefused):
        await SessionClient("127.0.0.1", entry.port, issue("echo", anchor="z"), "z").open()
    status, peers = await api(b.config.control_socket, "GET", "/v1/peers")
    by_name = {p["name"]: p for p in peers["peers"]}
    assert by_name["a"]["state"] == "up" and by_name["a"]["channels"] == 1 and by_name["a"]["transport"] == "tcp"
    assert by_name["z"]["state"] == "down"
    await c.detach()
    url = "http://%s:%d/metrics" % a.metrics_address
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'cloudlet_sessions{state="detached"} 1.0' in text
    assert 'cloudlet_handovers_total{direction="in"} 1.0' in text
    assert 'cloudlet_session_bytes_total{direction="up"} 5.0' in text
    assert 'cloudlet_session_bytes_total{direction="down"} 5.0' in text
    text_b = await asyncio.to_thread(lambda: urllib.request.urlopen("http://%s:%d/metrics" % b.metrics_address, timeout=5).read().decode())
    assert 'cloudlet_handovers_total{direction="out"} 1.0' in text_b
    assert 'cloudlet_refusals_total{code="PEER_UNAVAILABLE"} 1.0' in text_b


async def test_sessiond_process_end_to_end_with_restart(tmp_path, secret_file, echo_backend: Backend) -> None:
    """The real `cloudlet sessiond --config` process: service via the API, a session, SIGTERM,
    restart: the service listens again on the same port from services.json."""
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a", log_format="json")
    try:
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo", {"backend": echo_backend.address, "listen": "127.0.0.1"})
        assert status == 200
        c = SessionClient("127.0.0.1", svc["port"], issue("echo"))
        await c.open()
        await c.send(b"through a real daemon")
        assert await c.recv_exactly(21) == b"through a real daemon"
        await c.detach()
        assert (await c.open()).resumed
        await c.close()
    finally:
        sp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sp.proc.wait, 15) == 0
    saved = json.loads((tmp_path / "a" / "state" / "services.json").read_text())
    assert saved["services"][0]["port"] == svc["port"]
    logs = [json.loads(line) for line in sp.log().splitlines() if line.startswith("{")]
    assert any(rec["msg"] == "session resumed" and rec.get("session") for rec in logs)
    assert c.credential not in sp.log()  # tokens are never logged
    sp2 = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    try:
        status, listed = await api(sp2.control_socket, "GET", "/v1/services")
        assert [(s["name"], s["port"]) for s in listed["services"]] == [("echo", svc["port"])]
        c2 = SessionClient("127.0.0.1", svc["port"], issue("echo"))
        await c2.open()
        await c2.send(b"after restart")
        assert await c2.recv_exactly(13) == b"after restart"
        await c2.close()
    finally:
        sp2.stop()


async def test_bad_config_is_a_clear_error(tmp_path, secret_file) -> None:
    """Every problem of the file, each naming its key, at once, on stderr; --check-config the same."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[sessiond]\ncloudlet = "a"\nsecret_file = "{secret_file}"\ncolour = "blue"\ngrace_seconds = "ten"\n'
                   'peer_listen = "0.0.0.0:7700"\n[peers.b]\ntransport = "ssh"\nhost = "h"\nport = 70000\n')
    for extra in ([], ["--check-config"]):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg),
                                                    *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2 and out == b""
        text = err.decode()
        for needle in ("sessiond.colour: unknown key", "sessiond.grace_seconds: Input should be a valid number (got 'ten')",
                       "sessiond.peer_listen: not a loopback address", "peers.b.port: Input should be less than or equal to 65535",
                       "peers.b.user: required key is missing", "peers.b.endpoint: required key is missing"):
            assert needle in text, text
        assert "problems:" in text and "Traceback" not in text
    cfg.write_text(f'[sessiond]\ncloudlet = "a"\nsecret_file = "{tmp_path / "nope"}"\n')
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg),
                                                "--check-config", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"sessiond.secret_file:" in err
    cfg.write_text(f'[sessiond]\ncloudlet = "a"\nsecret_file = "{secret_file}"\n')
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg),
                                                "--check-config", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"is valid" in out, err


async def test_sessiond_tells_systemd_it_is_ready(tmp_path, secret_file) -> None:
    """Type=notify units: sessiond sends READY=1 to $NOTIFY_SOCKET once it listens."""
    import socket as _socket

    from cloudlet_bench.harness.sessiond import write_config

    notify = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    cfg = tmp_path / "sessiond.toml"
    write_config(cfg, {"cloudlet": "a", "secret_file": str(secret_file), "control_socket": str(tmp_path / "s.sock"),
                       "state_dir": str(tmp_path / "state"), "peer_listen": "127.0.0.1:0", "metrics_listen": ""})
    import os

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudlet", "sessiond", "--config", str(cfg),
                                                env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        msg = await asyncio.to_thread(notify.recv, 100)
        assert msg == b"READY=1"
        status, health = await api(str(tmp_path / "s.sock"), "GET", "/v1/health")
        assert status == 200 and health["metrics_listen"] is None
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        notify.close()


async def test_real_process_splice_path_under_uvloop(tmp_path, secret_file, echo_backend: Backend) -> None:
    """The daemon as deployed (uvloop, default splice threshold): 24 MiB echoed intact with a detach
    and resume in the middle, and the splice fast path was taken."""
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a", metrics_listen="127.0.0.1:0")
    try:
        status, svc = await api(sp.control_socket, "PUT", "/v1/services/echo",
                                {"backend": echo_backend.address, "listen": "127.0.0.1"})
        assert status == 200
        c = SessionClient("127.0.0.1", svc["port"], issue("echo"))
        await c.open()
        pattern = bytes(i % 253 for i in range(1 << 16))
        total = 24 * 1024 * 1024
        got = bytearray()

        async def send() -> None:
            for _ in range(total // len(pattern)):
                await c.send(pattern)

        sender = asyncio.create_task(send())
        while len(got) < total // 2:
            got += await asyncio.wait_for(c.recv(), 20)
        await sender
        await c.detach()
        await c.open()
        while len(got) < total:
            data = await asyncio.wait_for(c.recv(), 20)
            assert data
            got += data
        assert bytes(got) == pattern * (total // len(pattern))
        _, health = await api(sp.control_socket, "GET", "/v1/health")
        url = "http://%s/metrics" % health["metrics_listen"]
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        upgrades = [line for line in text.splitlines() if line.startswith("cloudlet_splice_upgrades_total ")]
        assert upgrades and float(upgrades[0].split()[1]) >= 1, upgrades
        started = [json.loads(line) for line in sp.log().splitlines() if '"sessiond started"' in line]
        assert started[0]["loop"] == "uvloop"
        await c.close()
    finally:
        sp.stop()

"""`cloudlet session cat|list|end` against a real sessiond process."""

from __future__ import annotations

import asyncio
import sys

from support.sessiond import Backend, api, issue, start_sessiond_process


async def cli(*args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudlet", "session", *args,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out, err


async def test_cat_list_end(tmp_path, secret_file, echo_backend: Backend) -> None:
    sp = await start_sessiond_process(tmp_path / "a", secret_file, "a")
    try:
        _, svc = await api(sp.control_socket, "PUT", "/v1/services/echo", {"backend": echo_backend.address, "listen": "127.0.0.1"})
        cred = tmp_path / "cred"
        cred.write_text(issue("echo") + "\n")
        addr = f"127.0.0.1:{svc['port']}"
        rc, out, err = await cli("cat", "--address", addr, "--credential-file", str(cred), "-v", stdin=b"hello\nworld\n")
        assert rc == 0, err
        assert out == b"hello\nworld\n"
        assert b"new session" in err
        rc, out, _ = await cli("list", "--socket", sp.control_socket)
        assert rc == 0 and b"detached" in out and b"echo" in out
        rc, out, err = await cli("cat", "--address", addr, "--credential-file", str(cred), "-v", "--linger", "1", stdin=b"again")
        assert rc == 0 and out == b"again" and b"resumed" in err
        rc, out, _ = await cli("end", "--address", addr, "--credential-file", str(cred))
        assert rc == 0 and b"session ended" in out
        rc, out, err = await cli("cat", "--address", addr, "--credential-file", str(cred), stdin=b"x")
        assert rc == 3 and b"SESSION_ENDED" in err
        rc, _, err = await cli("cat", "--address", addr, "--credential", "forged", stdin=b"x")
        assert rc == 3 and b"BAD_CREDENTIAL" in err
    finally:
        sp.stop()


async def test_cat_exits_when_the_backend_closes_with_stdin_open(make_sessiond) -> None:
    async def bye(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye\n")
        await w.drain()
        w.close()

    srv = await asyncio.start_server(bye, "127.0.0.1", 0)
    a = await make_sessiond("a")
    entry, _ = await a.put_service("bye", "127.0.0.1:%d" % srv.sockets[0].getsockname()[1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudlet", "session", "cat", "--address", f"127.0.0.1:{entry.port}",
        "--credential", issue("bye"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), 30)  # stdin stays open: the close must end it
    assert out == b"bye\n"
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    srv.close()

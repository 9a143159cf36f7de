"""`cloudlet bench proxy`: the session relay against direct TCP and socat, in one run.

Throughput: one TCP stream of ``--gib`` GiB from a source thread to a sink thread, (1) direct,
(2) through ``socat -b 262144``, (3) through a real ``cloudlet sessiond`` subprocess (session header,
then raw bytes). The other direction (``down_*``: a ``socat`` source reading /dev/zero, so the
backend is never the bottleneck) is measured direct, through a mode 0 session and through a mode 2
(resumable) session, which keeps a replay copy of what it sends and never uses splice. Latency:
``--pings`` rounds of one-byte ping-pongs, one on each of the three paths per round, the order
rotating (cloudlet_bench.latency_stats): the relay's added latency is the median of the per-round
differences (relay minus direct) with a 95 % interval, its tail the p99 difference over the same
rounds with a bootstrap interval; an estimate within the noise is printed as null, with a note.
Memory: ``--idle`` idle sessions opened through sessiond; RSS growth of the
sessiond process per session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import threading
import time
from typing import Any

from cloudlet.common.loop import raise_nofile_limit
from cloudlet.protocol.wire import REPLY_FIXED, Mode, Op, encode_header, parse_reply

from cloudlet_bench.harness.sessiond import Fleet, rss_kib
from cloudlet_bench.latency_stats import added, interleave

CHUNK = 1 << 20


def _listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s


class Sink:
    """Sink and echo servers in a child process (so the source, the relay and the sink do not share
    a GIL). The sink reads each connection until the expected byte count arrived (a session's FIN only
    detaches, so the backend sees no EOF) and reports bytes and first-to-last-byte time."""

    def __init__(self) -> None:
        import multiprocessing

        self.sock = _listener()
        self.port = self.sock.getsockname()[1]
        self.echo_sock = _listener()
        self.echo_port = self.echo_sock.getsockname()[1]
        self.parent, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(target=self._child, args=(child,), daemon=True)
        self.proc.start()

    def _child(self, pipe: Any) -> None:
        threading.Thread(target=_echo_loop, args=(self.echo_sock,), daemon=True).start()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        expect = 0
        while True:
            conn, _ = self.sock.accept()
            total = 0
            first = 0.0
            while True:
                n = conn.recv_into(view)
                if not n:
                    break
                if not total:
                    first = time.perf_counter()
                    if pipe.poll():
                        expect = pipe.recv()
                total += n
                if total >= expect > 0:
                    break
            elapsed = time.perf_counter() - first
            conn.close()
            if total:  # not a port probe
                pipe.send((total, elapsed))

    def measure(self, nbytes: int, send: Any) -> tuple[int, float]:
        self.parent.send(nbytes)
        send()
        if not self.parent.poll(120):
            raise RuntimeError("sink did not finish")
        result: tuple[int, float] = self.parent.recv()  # the sink sends (bytes, seconds)
        return result

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(5)
        self.sock.close()
        self.echo_sock.close()


def _echo_loop(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_echo_serve, args=(conn,), daemon=True).start()


def _echo_serve(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def _connect(port: int, credential: str | None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if credential is not None:
        s.sendall(encode_header(credential))
        data = b""
        while True:
            data += s.recv(REPLY_FIXED.size + 255)
            parsed = parse_reply(data)
            if parsed is not None:
                break
        reply, _ = parsed
        if not reply.ok:
            raise RuntimeError(f"sessiond refused: {reply.status.name} {reply.message}")
    return s


def throughput(port: int, sink: Sink, nbytes: int, credential: str | None = None) -> float:
    s = _connect(port, credential)
    payload = memoryview(b"\xa5" * CHUNK)

    def send() -> None:
        sent = 0
        while sent < nbytes:
            s.sendall(payload)
            sent += CHUNK

    total, elapsed = sink.measure(nbytes, send)
    s.close()
    if credential is not None:  # end the session (a plain close only detaches it)
        e = socket.create_connection(("127.0.0.1", port))
        e.sendall(encode_header(credential, op=Op.END))
        e.recv(REPLY_FIXED.size + 255)
        e.close()
    if total != nbytes:
        raise RuntimeError(f"sink got {total} bytes, sent {nbytes}")
    return total * 8 / elapsed / 1e9


def download(port: int, nbytes: int, credential: str | None = None, mode: Mode = Mode.RAW) -> float:
    """Read ``nbytes`` from a source backend (directly, or through a session in ``mode``); Gbit/s."""
    s = socket.create_connection(("127.0.0.1", port))
    got = 0
    if credential is not None:
        s.sendall(encode_header(credential, "", Op.ATTACH, mode))
        data = b""
        while (parsed := parse_reply(data)) is None:
            chunk = s.recv(REPLY_FIXED.size + 300)
            if not chunk:
                raise RuntimeError("sessiond closed before its reply")
            data += chunk
        reply, rest = parsed
        if not reply.ok:
            raise RuntimeError(f"sessiond refused: {reply.status.name} {reply.message}")
        got = len(rest)
    buf = bytearray(CHUNK)
    started = time.perf_counter()
    while got < nbytes:
        n = s.recv_into(buf)
        if not n:
            raise RuntimeError(f"source closed after {got} bytes")
        got += n
    elapsed = time.perf_counter() - started
    s.close()
    if credential is not None:
        e = socket.create_connection(("127.0.0.1", port))
        e.sendall(encode_header(credential, op=Op.END))
        e.recv(REPLY_FIXED.size + 255)
        e.close()
    return got * 8 / elapsed / 1e9


def _pinger(port: int, credential: str | None = None) -> tuple[socket.socket, Any]:
    """A connection through a path and one ping-pong on it (microseconds) per call."""
    s = _connect(port, credential)

    def one() -> float:
        t0 = time.perf_counter()
        s.sendall(b"p")
        if not s.recv(1):
            raise RuntimeError("echo closed")
        return (time.perf_counter() - t0) * 1e6

    return s, one


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            await asyncio.sleep(0.025)
    raise RuntimeError(f"port {port} never opened")


def _socat(target: int) -> tuple[subprocess.Popen[bytes], int]:
    probe = _listener()
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(["socat", "-b", "262144", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                             f"TCP:127.0.0.1:{target}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def _source() -> tuple[subprocess.Popen[bytes], int]:
    """socat sending /dev/zero to every connection, as fast as it can."""
    probe = _listener()
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(["socat", "-u", "-b", "262144", "OPEN:/dev/zero",
                             f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


async def idle_sessions(fleet: Fleet, sd: Any, count: int) -> float:
    """Open ``count`` idle sessions through sessiond; RSS growth per session in KiB."""
    held: list[Any] = []

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    backend = await asyncio.start_server(accept, "127.0.0.1", 0, backlog=4096)
    port = await sd.put_service("idle", "127.0.0.1:%d" % backend.sockets[0].getsockname()[1])
    # warm up allocator and code paths with a few sessions first
    clients: list[asyncio.StreamWriter] = []

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(encode_header(fleet.credential("idle", "bench")))
        data = await r.readexactly(REPLY_FIXED.size)
        _, _, status, _, mlen = REPLY_FIXED.unpack(data)
        msg = await r.readexactly(mlen) if mlen else b""
        if status != 0:
            raise RuntimeError(f"idle session {len(clients)} refused with status {status}: {msg.decode()}")
        clients.append(w)

    await asyncio.gather(*(one() for _ in range(50)))
    await asyncio.sleep(0.5)
    before = rss_kib(sd.proc.pid)
    done = 0
    while done < count:
        batch = min(250, count - done)
        await asyncio.gather(*(one() for _ in range(batch)))
        done += batch
    await asyncio.sleep(1.0)
    after = rss_kib(sd.proc.pid)
    for w in clients:
        w.close()
    for w in held:
        w.close()
    backend.close()
    return (after - before) / count


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("socat"):
        raise SystemExit("socat is needed for the baseline (apt-get install socat)")
    limit = raise_nofile_limit(2 * args.idle + 1024)
    # sessiond and this process each hold two sockets per idle session; a hard limit we may not
    # raise (no CAP_SYS_RESOURCE) caps the count, which the result then says
    idle = min(args.idle, max(0, (limit - 600) // 2))
    nbytes = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    sink = Sink()
    fleet = Fleet()
    socat_procs: list[subprocess.Popen[bytes]] = []
    try:
        sd = await fleet.start("bench", loop=args.loop, max_sessions=idle + 1000)
        sink_svc = await sd.put_service("sink", f"127.0.0.1:{sink.port}")
        echo_svc = await sd.put_service("echo", f"127.0.0.1:{sink.echo_port}")
        socat_sink, socat_sink_port = _socat(sink.port)
        socat_echo, socat_echo_port = _socat(sink.echo_port)
        source, source_port = _source()
        socat_procs += [socat_sink, socat_echo, source]
        await _wait_port(socat_sink_port)
        await _wait_port(socat_echo_port)
        await _wait_port(source_port)
        source_svc = await sd.put_service("source", f"127.0.0.1:{source_port}")
        rates: dict[str, list[float]] = {"direct": [], "socat": [], "session": [], "down_direct": [],
                                         "down_session": [], "down_resumable": []}
        for _ in range(args.rounds):  # interleaved, so a load spike hits all three alike
            rates["direct"].append(await asyncio.to_thread(throughput, sink.port, sink, nbytes))
            rates["socat"].append(await asyncio.to_thread(throughput, socat_sink_port, sink, nbytes))
            rates["session"].append(await asyncio.to_thread(throughput, sink_svc, sink, nbytes, fleet.credential("sink", "bench")))
            rates["down_direct"].append(await asyncio.to_thread(download, source_port, nbytes))
            rates["down_session"].append(await asyncio.to_thread(download, source_svc, nbytes, fleet.credential("source", "bench")))
            rates["down_resumable"].append(await asyncio.to_thread(
                download, source_svc, nbytes, fleet.credential("source", "bench"), Mode.RESUMABLE))
        socks, pingers = [], {}
        for name, port, cred in (("direct", sink.echo_port, None), ("socat", socat_echo_port, None),
                                 ("session", echo_svc, fleet.credential("echo", "bench"))):
            sock, pingers[name] = _pinger(port, cred)
            socks.append(sock)
        try:  # sample by sample, the order rotating: every round's three samples saw the same moment
            lat = await asyncio.to_thread(interleave, pingers, args.pings)
        finally:
            for sock in socks:
                sock.close()
        idle_kib = await idle_sessions(fleet, sd, idle) if idle else None
        best = {k: max(v) for k, v in rates.items()}
        p50 = {k: statistics.median(v) for k, v in lat.items()}
        p99 = {k: _pct(v, 0.99) for k, v in lat.items()}
        return {
            "bytes_per_run": nbytes,
            "rounds": args.rounds,
            "loop": args.loop,
            "direct_gbps": round(best["direct"], 3),
            "socat_gbps": round(best["socat"], 3),
            "session_gbps": round(best["session"], 3),
            "ratio_vs_direct": round(best["session"] / best["direct"], 3),
            "ratio_vs_socat": round(best["session"] / best["socat"], 3),
            "down_direct_gbps": round(best["down_direct"], 3),
            "down_session_gbps": round(best["down_session"], 3),
            "down_resumable_gbps": round(best["down_resumable"], 3),
            "down_resumable_vs_session": round(best["down_resumable"] / best["down_session"], 3),
            "direct_latency_us_p50": round(p50["direct"], 1),
            "socat_latency_us_p50": round(p50["socat"], 1),
            "session_latency_us_p50": round(p50["session"], 1),
            "direct_latency_us_p99": round(p99["direct"], 1),
            "session_latency_us_p99": round(p99["session"], 1),
            "latency_rounds": len(lat["direct"]),
            **added(lat["session"], lat["direct"], "added_latency"),
            **added(lat["socat"], lat["direct"], "socat_added_latency"),
            "idle_sessions": idle,
            "idle_sessions_requested": args.idle,
            "nofile_limit": limit,
            "idle_session_kib": None if idle_kib is None else round(idle_kib, 2),
        }
    finally:
        for p in socat_procs:
            p.terminate()
            p.wait()
        fleet.stop()
        sink.close()


def _main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    result = asyncio.run(run_bench(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28} {v}")
    return 0


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "proxy", help="session relay vs direct TCP and socat: throughput, latency, idle memory",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--gib", type=float, default=1.0, help="GiB per throughput run (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="throughput runs per path, best counts (default 3)")
    p.add_argument("--pings", type=int, default=5000, help="ping-pongs per path (default 5000)")
    p.add_argument("--idle", type=int, default=10000, help="idle sessions for the memory figure (default 10000; 0 skips)")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="sessiond's event loop")
    p.set_defaults(func=_main)

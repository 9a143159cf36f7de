"""`cloudlet bench tunnel`: SSH tunnel throughput and latency against OpenSSH, side by side.

One run starts its own sshd (private config, host key, restricted tunnel key, free loopback port;
see ``cloudlet_bench.harness.sshd``), a sink process that counts bytes, and measures:

- ``openssh_gbps``: a source process sends N MB into OpenSSH ``ssh -N -L`` (compression off, the same
  cipher) -> sshd -> sink, until the sink acknowledges every byte (``down_*``: the sink sends N MB
  back the other way, counted by the client);
- ``asyncssh_gbps``: the same source and sink through ``SshPeerConnector``: a local listener in this
  process opens one channel per connection on the warm tunnel and pipes it (what sessiond does for a
  forwarded session);
- ``channel_open_ms_p50``: opening a channel on the warm tunnel (to the sink, through sshd), with
  its floors side by side: ``ssh_rtt_ms_p50`` (a bare SSH round trip, a global request, on the same
  connection) and ``tcp_connect_ms_p50`` (a plain loopback TCP connect to the sink, which sshd does
  for every open);
- ``cold_connect_ms_p50``: a new SSH connection (TCP, key exchange, public key authentication).

Rounds alternate between OpenSSH and asyncssh; the best round of each is reported (the machine is
shared, the best round is the least disturbed one), with the median of the per-round ratios and the
CPU seconds per GB of the forwarding process (``ssh``, or this process) as load-robust companions.
Needs root (sshd and its tunnel account).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

SINK = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(128)
print(s.getsockname()[1], flush=True)
block = b"\xa5" * (1 << 20)
def handle(c):
    try:
        mode = c.recv(1)
        if mode == b"D":  # download: 8-byte count, then that many bytes, then close
            want = b""
            while len(want) < 8:
                more = c.recv(8 - len(want))
                if not more:
                    return
                want += more
            left = int.from_bytes(want, "big")
            while left > 0:
                chunk = block if left >= len(block) else block[:left]
                c.sendall(chunk)
                left -= len(chunk)
            return
        n = len(mode)  # upload: count until EOF, answer the count
        while mode:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        c.sendall(str(n).encode())
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

SOURCE = r"""
import socket, sys, time
port, total, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = socket.create_connection(("127.0.0.1", port))
t = time.perf_counter()
if mode == "up":
    buf = b"\x5a" * (1 << 20)
    sent = 0
    while sent < total:
        c.sendall(buf)
        sent += len(buf)
    c.shutdown(socket.SHUT_WR)
    ack = c.recv(64)
    got = int(ack.decode() or "0")
else:
    c.sendall(b"D" + total.to_bytes(8, "big"))
    sent, got = total, 0
    buf = bytearray(1 << 20)
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        got += n
dt = time.perf_counter() - t
print(sent, got, dt)
"""

TARGET_RATIO = 0.8
TARGET_OPEN_MS = 1.0


@dataclass
class Run:
    gbps: float
    seconds: float
    cpu_s_per_gb: float = 0.0  # CPU of the forwarding process (ssh, or this process) per GB sent


def _proc_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


async def _source(port: int, nbytes: int, mode: str = "up") -> Run:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SOURCE, str(port), str(nbytes), mode,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"source failed: {err.decode().strip()[-500:]}")
    sent_s, acked_s, dt_s = out.decode().split()
    sent, acked, dt = int(sent_s), int(acked_s), float(dt_s)
    if acked != sent:
        raise RuntimeError(f"{mode}: {acked} of {sent} bytes arrived")
    return Run(gbps=sent * 8 / dt / 1e9, seconds=dt)


class _UpstreamProtocol(asyncio.BufferedProtocol):
    """Client side of the forwarder: the socket is read into one reused 1 MiB buffer and the bytes
    go straight into the channel (no per-read allocation, few event-loop iterations)."""

    HIGH = 1 << 20
    BUFFER = 1 << 20

    def __init__(self, connector: Any, peer: str) -> None:
        self.connector = connector
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.draining = False
        self.buffer = memoryview(bytearray(self.BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.buffer[:nbytes])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP server's transport (asyncio's or uvloop's) reads and writes.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        assert self.transport is not None
        try:
            reader, self.writer = await self.connector.open(self.peer)
        except Exception:
            self.transport.close()
            return
        asyncio.get_running_loop().create_task(self._down(reader))
        for data in self.pending:
            self.writer.write(data)
        self.pending.clear()
        if self.eof:
            self.writer.write_eof()
        else:
            self.transport.resume_reading()

    async def _down(self, reader: asyncio.StreamReader) -> None:
        assert self.transport is not None
        try:
            while data := await reader.read(1 << 18):
                self.transport.write(data)
            if not self.transport.is_closing():
                self.transport.write_eof()
        except (ConnectionError, OSError):
            self.transport.abort()

    def data_received(self, data: memoryview) -> None:
        assert self.transport is not None
        if self.writer is None:  # uvloop may deliver data before pause_reading() takes effect
            self.pending.append(bytes(data))
            self.transport.pause_reading()
            return
        self.writer.transport.write(data)  # consumed (sent or copied) before returning
        if not self.draining and self.writer.transport.get_write_buffer_size() > self.HIGH:
            self.draining = True
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.writer is not None and self.transport is not None
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.transport.abort()
            return
        self.draining = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.writer is not None:
            self.writer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.close()


class _Forwarder:
    """A local listener piping each connection into a new tunnel channel (like ``ssh -L``)."""

    def __init__(self, connector: Any, peer: str) -> None:
        self.connector = connector
        self.peer = peer
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamProtocol(self.connector, self.peer), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _openssh(sshd: Any, cipher: str, sink_port: int) -> tuple[subprocess.Popen[bytes], int]:
    from cloudlet_bench.harness.sshd import free_port

    local = free_port()
    argv = ["ssh", "-N", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "Compression=no", "-o", f"Ciphers={cipher}",
            "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes", "-i", str(sshd.client_key),
            "-p", str(sshd.port), "-L", f"127.0.0.1:{local}:127.0.0.1:{sink_port}", f"{sshd.user}@{sshd.listen_host}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(local, 15, proc)
    except RuntimeError as exc:
        proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"ssh -L did not come up: {exc}: {err.strip()[-500:]}") from None
    return proc, local


async def _connector(sshd: Any, cipher: str, fast_path: bool = True) -> Any:
    from cloudlet.tunnel.connector import SshPeerConnector
    from cloudlet_bench.harness.sshd import wait_tunnels_up

    c = SshPeerConnector.from_config({"bench": sshd.peer_table("bench", ciphers=[cipher], fast_path=fast_path)})
    await c.start()
    if not await wait_tunnels_up(c, 15):
        status = c.status()[0]
        await c.close()
        raise RuntimeError(f"tunnel did not come up: {status['last_error']}")
    return c


async def _throughput_asyncssh(sshd: Any, cipher: str, nbytes: int, fast_path: bool = True, mode: str = "up") -> Run:
    c = await _connector(sshd, cipher, fast_path)
    fwd = _Forwarder(c, "bench")
    await fwd.start()
    try:
        cpu = time.process_time()
        run = await _source(fwd.port, nbytes, mode)
        run.cpu_s_per_gb = (time.process_time() - cpu) / (nbytes / 1e9)
        return run
    finally:
        fwd.close()
        await c.close()


async def _throughput_openssh(sshd: Any, cipher: str, sink_port: int, nbytes: int, mode: str = "up") -> Run:
    proc, local = _openssh(sshd, cipher, sink_port)
    try:
        cpu = _proc_cpu(proc.pid)
        run = await _source(local, nbytes, mode)
        run.cpu_s_per_gb = (_proc_cpu(proc.pid) - cpu) / (nbytes / 1e9)
        return run
    finally:
        proc.kill()
        proc.wait()


async def _channel_open_ms(sshd: Any, cipher: str, count: int,
                           sink_port: int) -> tuple[list[float], list[float], list[float]]:
    """Channel opens on a warm tunnel; the floors: SSH round trips on the same connection and plain
    loopback TCP connects to the same sink (what sshd does for each open)."""
    c = await _connector(sshd, cipher)
    times: list[float] = []
    rtts: list[float] = []
    tcps: list[float] = []
    try:
        conn = c.tunnels["bench"]._conn
        for _ in range(count):
            t = time.perf_counter()
            _r, w = await asyncio.open_connection("127.0.0.1", sink_port)
            tcps.append((time.perf_counter() - t) * 1000)
            w.close()
            t = time.perf_counter()
            await conn._make_global_request(b"keepalive@openssh.com")
            rtts.append((time.perf_counter() - t) * 1000)
        for _ in range(count):
            t = time.perf_counter()
            reader, writer = await c.open("bench")
            times.append((time.perf_counter() - t) * 1000)
            writer.write_eof()
            await reader.read()
            writer.close()
    finally:
        await c.close()
    return times, rtts, tcps


async def _cold_connect_ms(sshd: Any, cipher: str, count: int) -> list[float]:
    import asyncssh

    times = []
    for _ in range(count):
        t = time.perf_counter()
        conn = await asyncssh.connect(sshd.listen_host, port=sshd.port, username=sshd.user, config=None,
                                      client_keys=[str(sshd.client_key)], known_hosts=str(sshd.known_hosts),
                                      agent_path=None, encryption_algs=[cipher], compression_algs=["none"])
        times.append((time.perf_counter() - t) * 1000)
        conn.close()
        await conn.wait_closed()
    return times


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_bench(megabytes: int, rounds: int, cipher: str, compare_ciphers: bool, opens: int, colds: int,
                    progress: Any) -> dict[str, Any]:
    from cloudlet_bench.harness.sshd import TunnelSshd

    nbytes = megabytes * 1024 * 1024
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    sshd = None
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        sshd = TunnelSshd(endpoint=f"127.0.0.1:{sink_port}")
        sshd.start()
        openssh_runs: list[Run] = []
        asyncssh_runs: list[Run] = []
        for i in range(rounds):
            openssh_runs.append(await _throughput_openssh(sshd, cipher, sink_port, nbytes))
            asyncssh_runs.append(await _throughput_asyncssh(sshd, cipher, nbytes))
            progress(f"round {i + 1}/{rounds}: openssh {openssh_runs[-1].gbps:.3f} Gbps, "
                     f"asyncssh {asyncssh_runs[-1].gbps:.3f} Gbps")
        naive = await _throughput_asyncssh(sshd, cipher, nbytes, fast_path=False)
        progress(f"asyncssh without the fast path: {naive.gbps:.3f} Gbps")
        down_o: list[Run] = []
        down_a: list[Run] = []
        for _ in range(max(1, rounds - 1)):
            down_o.append(await _throughput_openssh(sshd, cipher, sink_port, nbytes, "down"))
            down_a.append(await _throughput_asyncssh(sshd, cipher, nbytes, mode="down"))
            progress(f"download: openssh {down_o[-1].gbps:.3f} Gbps, asyncssh {down_a[-1].gbps:.3f} Gbps")
        ciphers: dict[str, dict[str, float]] = {}
        if compare_ciphers:
            small = max(nbytes // 2, 1 << 20)
            for name in ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"):
                o = await _throughput_openssh(sshd, name, sink_port, small)
                a = await _throughput_asyncssh(sshd, name, small)
                ciphers[name] = {"openssh_gbps": round(o.gbps, 3), "asyncssh_gbps": round(a.gbps, 3)}
                progress(f"cipher {name}: openssh {o.gbps:.3f} Gbps, asyncssh {a.gbps:.3f} Gbps")
        open_ms, rtt_ms, tcp_ms = await _channel_open_ms(sshd, cipher, opens, sink_port)
        cold_ms = await _cold_connect_ms(sshd, cipher, colds)
        best_o = max(r.gbps for r in openssh_runs)
        best_a = max(r.gbps for r in asyncssh_runs)
        ratio = best_a / best_o if best_o else 0.0
        paired = statistics.median(a.gbps / o.gbps for a, o in zip(asyncssh_runs, openssh_runs, strict=True))
        result: dict[str, Any] = {
            "openssh_gbps": round(best_o, 3),
            "asyncssh_gbps": round(best_a, 3),
            "ratio_vs_openssh": round(ratio, 3),
            "ratio_paired_median": round(paired, 3),
            "openssh_cpu_s_per_gb": round(statistics.median(r.cpu_s_per_gb for r in openssh_runs), 3),
            "asyncssh_cpu_s_per_gb": round(statistics.median(r.cpu_s_per_gb for r in asyncssh_runs), 3),
            "channel_open_ms_p50": round(statistics.median(open_ms), 3),
            "channel_open_ms_p90": round(_p(open_ms, 0.9), 3),
            "ssh_rtt_ms_p50": round(statistics.median(rtt_ms), 3),
            "tcp_connect_ms_p50": round(statistics.median(tcp_ms), 3),
            "cold_connect_ms_p50": round(statistics.median(cold_ms), 3),
            "asyncssh_no_fast_path_gbps": round(naive.gbps, 3),
            "down_openssh_gbps": round(max(r.gbps for r in down_o), 3),
            "down_asyncssh_gbps": round(max(r.gbps for r in down_a), 3),
            "down_ratio_vs_openssh": round(max(r.gbps for r in down_a) / max(r.gbps for r in down_o), 3),
            "down_openssh_cpu_s_per_gb": round(statistics.median(r.cpu_s_per_gb for r in down_o), 3),
            "down_asyncssh_cpu_s_per_gb": round(statistics.median(r.cpu_s_per_gb for r in down_a), 3),
            "openssh_gbps_rounds": [round(r.gbps, 3) for r in openssh_runs],
            "asyncssh_gbps_rounds": [round(r.gbps, 3) for r in asyncssh_runs],
            "ciphers": ciphers,
            "cipher": cipher,
            "megabytes": megabytes,
            "rounds": rounds,
            "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "targets": {"ratio_vs_openssh": TARGET_RATIO, "channel_open_ms_p50": TARGET_OPEN_MS},
            "targets_met": {"ratio_vs_openssh": ratio >= TARGET_RATIO,
                            "channel_open_ms_p50": statistics.median(open_ms) <= TARGET_OPEN_MS},
        }
        return result
    finally:
        if sshd is not None:
            sshd.cleanup()
        sink.kill()
        sink.wait()


def main(args: argparse.Namespace) -> int:
    from cloudlet.common.loop import use_fast_loop

    from cloudlet_bench.harness.sshd import sshd_argv_available

    reasons = sshd_argv_available()
    if reasons:
        print("cloudlet bench tunnel: " + "; ".join(reasons), file=sys.stderr)
        return 2
    if args.megabytes < 1 or args.rounds < 1 or args.opens < 1 or args.colds < 1:
        print("cloudlet bench tunnel: --megabytes, --rounds, --opens and --colds must be >= 1", file=sys.stderr)
        return 2
    use_fast_loop(args.loop)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"# {msg}", file=sys.stderr, flush=True)

    result = asyncio.run(run_bench(args.megabytes, args.rounds, args.cipher, not args.no_cipher_compare,
                                   args.opens, args.colds, progress))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key in ("openssh_gbps", "asyncssh_gbps", "ratio_vs_openssh", "ratio_paired_median",
                    "openssh_cpu_s_per_gb", "asyncssh_cpu_s_per_gb", "channel_open_ms_p50",
                    "channel_open_ms_p90", "ssh_rtt_ms_p50", "tcp_connect_ms_p50", "cold_connect_ms_p50", "asyncssh_no_fast_path_gbps",
                    "down_openssh_gbps", "down_asyncssh_gbps", "down_ratio_vs_openssh"):
            print(f"{key:28} {result[key]}")
        for name, figures in result["ciphers"].items():
            print(f"{name:28} openssh {figures['openssh_gbps']} Gbps, asyncssh {figures['asyncssh_gbps']} Gbps")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tunnel",
        help="SSH tunnel throughput and channel/connect latency, against OpenSSH ssh -L",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--megabytes", type=int, default=192, help="MiB sent per throughput round (default 192)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating OpenSSH/asyncssh rounds (default 3)")
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com", help="cipher of both sides (default aes128-gcm)")
    parser.add_argument("--no-cipher-compare", action="store_true",
                        help="skip the aes128-gcm vs chacha20-poly1305 comparison")
    parser.add_argument("--opens", type=int, default=200, help="channel opens measured (default 200)")
    parser.add_argument("--colds", type=int, default=20, help="cold SSH connections measured (default 20)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="asyncio",
                        help="event loop of the asyncssh side (default asyncio: measured faster than uvloop "
                        "for this data path; auto = uvloop if installed)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=main)

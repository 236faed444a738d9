"""The TLS layer under HBONE alone: one mutual-TLS 1.3 connection, bulk bytes one way.

Run from the repository (no root needed), holding the machine's bench lock::

    flock /work/bench.lock python -m nodeproxy_dev.bench.tls_layer \
        [--mib 512] [--chunk 65536] [--rounds 3] [--parallel 1,2] [--candidates ...] \
        [--json FILE]

Contexts are the mesh's own (`nodeproxy.identity.tls.build_context` with leaves from a fresh
`MeshCA`), so the cipher is the one HBONE negotiates. For each candidate a receiver process
listens on 127.0.0.1, a sender process dials it; both finish the handshake and check the
peer's SPIFFE ID with `verify_peer` (the candidate must expose a usable ``ssl_object``), then
the sender writes `--mib` MiB in `--chunk`-byte writes, obeying pause_writing, and the
receiver counts them with a plain `asyncio.Protocol` (what `H2Session` is). Each process
reports its own CPU seconds (all threads) from the first byte to the last, its wall time
and its peak RSS; with `--parallel N`, N such pairs run at once (one connection each) and the
throughput is the total bytes over the time from the first first byte to the last last byte.

Candidates:

- ``plain``: no TLS (uvloop TCP): the ceiling of loopback and of the Python protocol.
- ``uvloop``: uvloop's SSL transport (`loop.create_connection(ssl=...)`), what HBONE used
  before.
- ``asyncio``: asyncio's own loop and its `sslproto`.
- ``sslproto-uvloop``: asyncio's `sslproto.SSLProtocol` over uvloop's TCP transport.
- ``memorybio``: `nodeproxy.identity.tls_transport` (MemoryBIO records over uvloop TCP),
  what HBONE uses since this benchmark.
- ``aiofastnet``: aiofastnet's TLS transport (it drives OpenSSL itself) on uvloop, if
  importable.

Bounded: each worker has a timeout (`--timeout`), and every process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509

from nodeproxy.identity import tls
from nodeproxy.identity.mesh_ca import IssuedCert, MeshCA

TRUST_DOMAIN = "bench.local"
CANDIDATES = ("plain", "uvloop", "asyncio", "sslproto-uvloop", "memorybio", "aiofastnet")
SENDER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/sender"
RECEIVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/receiver"


# -- one side of a connection (a worker process) ---------------------------------------------

def _context(material: dict[str, str], role: str) -> ssl.SSLContext:
    mine = material[role]
    cert = x509.load_pem_x509_certificate(mine["cert"].encode())
    issued = IssuedCert(spiffe_id=mine["id"], cert_pem=mine["cert"].encode(),
                        key_pem=mine["key"].encode(), chain=(), not_before=0, not_after=0,
                        serial=cert.serial_number, certificate=cert)
    return tls.build_context(issued, material["trust"].encode(), server_side=role == "recv")


class _Counter(asyncio.Protocol):
    """The receiver: counts bytes, answers one byte when `total` have come."""

    def __init__(self, total: int, done: asyncio.Future):
        self.total = total
        self.received = 0
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = (time.time(), time.process_time())
        self.received += len(data)
        if self.received >= self.total and self.last is None:
            self.last = (time.time(), time.process_time())
            assert self.transport is not None
            self.transport.write(b"k")
            if not self.done.done():
                self.done.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError(
                f"closed after {self.received} of {self.total} bytes"))


class _Pump(asyncio.Protocol):
    """The sender: writes `total` bytes in `chunk`-byte writes while not paused."""

    def __init__(self, total: int, chunk: int, done: asyncio.Future):
        self.total = total
        self.payload = os.urandom(chunk)
        self.sent = 0
        self.paused = False
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pump(self) -> None:
        assert self.transport is not None
        write, payload, size = self.transport.write, self.payload, len(self.payload)
        while not self.paused and self.sent < self.total:
            write(payload)
            self.sent += size

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result((time.time(), time.process_time()))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before the answer"))


async def _start(candidate: str, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol,
                 sock: socket.socket, context: ssl.SSLContext | None, server_side: bool,
                 buffer_size: int = 0) -> asyncio.Transport:
    """Connect `protocol` over `sock` (connected or accepted) the candidate's way."""
    factory: Callable[[], asyncio.BaseProtocol] = lambda: protocol  # noqa: E731
    if candidate == "plain":
        if server_side:
            await loop.connect_accepted_socket(factory, sock)
        else:
            await loop.create_connection(factory, sock=sock)
        return protocol.transport  # type: ignore[attr-defined,no-any-return]
    assert context is not None
    if candidate in ("uvloop", "asyncio"):
        if server_side:
            await loop.connect_accepted_socket(factory, sock, ssl=context)
        else:
            await loop.create_connection(factory, sock=sock, ssl=context, server_hostname="")
    elif candidate == "sslproto-uvloop":
        from asyncio import sslproto
        waiter = loop.create_future()
        layer = sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=server_side,
                                     server_hostname=None)
        if server_side:
            await loop.connect_accepted_socket(lambda: layer, sock)
        else:
            await loop.create_connection(lambda: layer, sock=sock)
        await waiter
    elif candidate == "memorybio":
        from nodeproxy.identity import tls_transport
        if buffer_size:
            tls_transport.READ_BUFFER = tls_transport.PLAIN_BUFFER = buffer_size
        if server_side:
            await tls_transport.accept(protocol, context, sock, handshake_timeout=10)
        else:
            await tls_transport.handshake_connected(protocol, context, sock, handshake_timeout=10)
    elif candidate == "aiofastnet":
        import aiofastnet
        if server_side:
            await aiofastnet.connect_accepted_socket(loop, factory, sock, ssl=context)
        else:
            # aiofastnet refuses server_hostname="" (asyncio's "no SNI") and, with sock=,
            # None: it sends this name as SNI (check_hostname is off: nothing checks it).
            await aiofastnet.create_connection(loop, factory, sock=sock, ssl=context,
                                               server_hostname="hbone.invalid")
    else:
        raise ValueError(f"unknown candidate {candidate!r}")
    transport = protocol.transport  # type: ignore[attr-defined]
    expected = SENDER_ID if server_side else RECEIVER_ID
    tls.verify_peer(transport.get_extra_info("ssl_object"), TRUST_DOMAIN, expected=expected)
    return transport  # type: ignore[no-any-return]


def _cipher(transport: asyncio.Transport) -> str:
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return "-"
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0]}" if cipher else "?"


async def _receive(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    context = None if args.candidate == "plain" else _context(
        json.loads(Path(args.material).read_text()), "recv")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    conn, _ = await loop.sock_accept(listener)
    listener.close()
    done = loop.create_future()
    counter = _Counter(args.bytes, done)
    transport = await _start(args.candidate, loop, counter, conn, context, server_side=True,
                             buffer_size=args.tls_buffer)
    await done
    assert counter.first is not None and counter.last is not None
    result = {
        "role": "recv", "bytes": counter.received, "cipher": _cipher(transport),
        "start": counter.first[0], "end": counter.last[0],
        "cpu_s": counter.last[1] - counter.first[1],
        "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    await asyncio.sleep(0.05)   # the answer goes out before the close
    transport.close()
    return result


async def _send(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    context = None if args.candidate == "plain" else _context(
        json.loads(Path(args.material).read_text()), "send")
    sock = socket.create_connection(("127.0.0.1", args.port))
    sock.setblocking(False)
    done = loop.create_future()
    pump = _Pump(args.bytes, args.chunk, done)
    transport = await _start(args.candidate, loop, pump, sock, context, server_side=False,
                             buffer_size=args.tls_buffer)
    if args.write_high:
        transport.set_write_buffer_limits(high=args.write_high)
    print("ready", flush=True)
    sys.stdin.readline()            # "go": every pair starts at once
    start = (time.time(), time.process_time())
    pump.pump()
    end = await done
    result = {
        "role": "send", "bytes": pump.sent, "cipher": _cipher(transport),
        "start": start[0], "end": end[0], "cpu_s": end[1] - start[1],
        "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    transport.close()
    return result


def _worker(args: argparse.Namespace) -> int:
    if args.candidate in ("asyncio",):
        runner: Callable[..., Any] = asyncio.run
    else:
        runner = uvloop.run
    role = _receive if args.worker == "recv" else _send

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(role(args), args.timeout)

    print(json.dumps(runner(bounded())), flush=True)
    return 0


# -- the parent: pairs of workers, rounds, the table -------------------------------------------

@dataclass
class Measured:
    candidate: str
    parallel: int
    round: int
    mb_per_s: float
    send_cpu_s_per_gb: float
    recv_cpu_s_per_gb: float
    rss_kib_per_process: int
    cipher: str


def _material(directory: Path) -> Path:
    ca = MeshCA.generate(TRUST_DOMAIN)
    doc: dict[str, Any] = {"trust": ca.trust_anchor_pem.decode()}
    for role, identity in (("send", SENDER_ID), ("recv", RECEIVER_ID)):
        leaf = ca.issue(identity, 3600)
        doc[role] = {"id": identity, "cert": leaf.chain_pem.decode(),
                     "key": leaf.key_pem.decode()}
    path = directory / "material.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return path


def _worker_argv(role: str, candidate: str, material: Path, args: argparse.Namespace,
                 port: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "nodeproxy_dev.bench.tls_layer", "--worker", role,
            "--candidate", candidate, "--material", str(material),
            "--bytes", str(args.mib * 1024 * 1024), "--chunk", str(args.chunk),
            "--timeout", str(args.timeout), "--port", str(port)]
    if args.write_high:
        argv += ["--write-high", str(args.write_high)]
    if args.tls_buffer:
        argv += ["--tls-buffer", str(args.tls_buffer)]
    return argv


def _run_pairs(candidate: str, parallel: int, material: Path, args: argparse.Namespace
               ) -> list[dict[str, Any]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        receivers = []
        for _ in range(parallel):
            p = subprocess.Popen(_worker_argv("recv", candidate, material, args),
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            receivers.append(p)
        senders = []
        for r in receivers:
            assert r.stdout is not None
            port = int(r.stdout.readline())
            p = subprocess.Popen(_worker_argv("send", candidate, material, args, port),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            senders.append(p)
        for s in senders:
            assert s.stdout is not None
            line = s.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{candidate}: sender did not start ({line!r})")
        for s in senders:
            assert s.stdin is not None
            s.stdin.write("go\n")
            s.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=args.timeout + 10)
            if p.returncode != 0:
                raise RuntimeError(f"{candidate}: a worker failed (exit {p.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _summarize(candidate: str, parallel: int, rnd: int, results: list[dict[str, Any]]
               ) -> Measured:
    recv = [r for r in results if r["role"] == "recv"]
    send = [r for r in results if r["role"] == "send"]
    total = sum(r["bytes"] for r in recv)
    wall = max(r["end"] for r in recv) - min(r["start"] for r in recv)
    gb = total / 1e9
    return Measured(
        candidate=candidate, parallel=parallel, round=rnd,
        mb_per_s=round(total / 1e6 / wall, 1),
        send_cpu_s_per_gb=round(sum(r["cpu_s"] for r in send) / gb, 3),
        recv_cpu_s_per_gb=round(sum(r["cpu_s"] for r in recv) / gb, 3),
        rss_kib_per_process=max(r["rss_kib"] for r in results),
        cipher=recv[0]["cipher"],
    )


def _available(candidate: str) -> str | None:
    if candidate == "aiofastnet":
        try:
            import aiofastnet  # noqa: F401
        except ImportError as e:
            return f"not importable: {e}"
    return None


def crypto_ceiling() -> dict[str, float]:
    """`openssl speed` of the AEADs TLS 1.3 may negotiate, MB/s on 16 KiB records (one core)."""
    out: dict[str, float] = {}
    if shutil.which("openssl") is None:
        return out
    for name in ("aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"):
        run = subprocess.run(["openssl", "speed", "-evp", name, "-seconds", "1", "-bytes",
                              "16384", "-mr"], capture_output=True, text=True, timeout=30)
        for line in run.stdout.splitlines():
            if line.startswith("+F:"):
                # +F:<n>:<name>:<bytes per second for each size>
                out[name] = round(float(line.split(":")[-1]) / 1e6, 1)
    return out


def _table(rows: Sequence[Measured]) -> str:
    """One line per (candidate, connections): median and best MB/s over the rounds, the
    median of the per-round ratios to uvloop (taken in the same round: machine noise
    largely cancels), CPU seconds per GB of each side, median and lowest (other load on
    the machine only ever adds to them: the lowest is the least disturbed)."""
    by: dict[tuple[str, int], list[Measured]] = {}
    for m in rows:
        by.setdefault((m.candidate, m.parallel), []).append(m)
    uvloop_mbs = {(m.parallel, m.round): m.mb_per_s for m in rows if m.candidate == "uvloop"}
    lines = ["| candidate | connections (processes per side) | MB/s median | best | "
             "÷ uvloop (same round, median) | sender CPU s/GB median (lowest) | "
             "receiver CPU s/GB median (lowest) | peak RSS per process MiB | cipher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (candidate, parallel), ms in by.items():
        mbs = [m.mb_per_s for m in ms]
        send = [m.send_cpu_s_per_gb for m in ms]
        recv = [m.recv_cpu_s_per_gb for m in ms]
        ratios = [m.mb_per_s / uvloop_mbs[(parallel, m.round)] for m in ms
                  if uvloop_mbs.get((parallel, m.round))]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "—"
        lines.append(
            f"| {candidate} | {parallel} | {statistics.median(mbs):.0f} | {max(mbs):.0f} "
            f"| {ratio} "
            f"| {statistics.median(send):.2f} ({min(send):.2f}) "
            f"| {statistics.median(recv):.2f} ({min(recv):.2f}) "
            f"| {max(m.rss_kib_per_process for m in ms) / 1024:.1f} | {ms[0].cipher} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.tls_layer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--mib", type=int, default=512, help="MiB per connection")
    parser.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", default="1", help="comma list: pairs run at once")
    parser.add_argument("--write-high", type=int, default=0,
                        help="sender's transport write high-water mark (0: the default)")
    parser.add_argument("--tls-buffer", type=int, default=0,
                        help="memorybio: its ciphertext and plaintext buffers (0: 256 KiB)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--crypto", action="store_true", help="also run openssl speed")
    parser.add_argument("--json", type=Path)
    # worker mode (internal)
    parser.add_argument("--worker", choices=("send", "recv"), help=argparse.SUPPRESS)
    parser.add_argument("--candidate", help=argparse.SUPPRESS)
    parser.add_argument("--material", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    candidates = [c for c in args.candidates.split(",") if c]
    unknown = set(candidates) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidates: {', '.join(sorted(unknown))}")
    parallels = [int(p) for p in args.parallel.split(",")]
    rows: list[Measured] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="nodeproxy-tls-bench-") as tmp:
        material = _material(Path(tmp))
        for rnd in range(args.rounds):
            for candidate in candidates:      # alternate candidates within each round
                why = _available(candidate)
                if why:
                    skipped[candidate] = why
                    continue
                for parallel in parallels:
                    results = _run_pairs(candidate, parallel, material, args)
                    m = _summarize(candidate, parallel, rnd, results)
                    print(f"round {rnd + 1} {candidate} x{parallel}: {m.mb_per_s:.0f} MB/s, "
                          f"send {m.send_cpu_s_per_gb:.2f} / recv {m.recv_cpu_s_per_gb:.2f} "
                          f"CPU s/GB", file=sys.stderr, flush=True)
                    rows.append(m)
    print(_table(rows))
    for candidate, why in skipped.items():
        print(f"\n{candidate}: not measured: {why}")
    ceiling = crypto_ceiling() if args.crypto else {}
    if ceiling:
        print("\nopenssl speed, 16 KiB, one core, MB/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"mib": args.mib, "chunk": args.chunk, "rounds": args.rounds,
                         "parallel": parallels, "write_high": args.write_high,
                         "tls_buffer": args.tls_buffer},
            "rows": [asdict(m) for m in rows], "skipped": skipped, "crypto": ceiling,
            "versions": {"python": sys.version.split()[0], "openssl": ssl.OPENSSL_VERSION,
                         "uvloop": uvloop.__version__},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Traffic peer for the testbed: a server and bounded clients that verify every byte.

Run inside pods as ``python -m nodeproxy_dev.testbed.peer COMMAND``.  Standard
library only (uses uvloop when it happens to be importable).

The server speaks three tiny protocols, chosen by the first byte a client sends:

- ``T`` transfer: then an 8-byte big-endian response length N and a 16-byte
  seed.  The server reads until EOF (the client half-closes), answers with the
  32-byte SHA-256 of what it received, then N bytes of the deterministic stream
  of that seed, then closes.
- ``P`` ping-pong: every byte is echoed back until EOF.
- ``W`` whoami: one JSON line ``{"peer": "<client ip>:<port>", "local": ..., "name": ...}``.

The deterministic stream of (seed, N) is made of 64 KiB blocks; block i is its
index as 8 big-endian bytes followed by a slice of a pool of random bytes drawn
from ``random.Random(seed)``, so it costs a memory copy to make and catches lost,
duplicated, reordered or corrupted data.

Clients print one JSON line (``load --progress`` adds progress lines before it)
and exit 0 only when everything verified.  ``transfer --random-sizes`` draws each
connection's sizes up to --send/--receive; ``--reset-fraction`` makes that share of
connections abort with a reset at a random point (counted apart, not as failures);
``--start-when PATH`` holds every connected connection's first byte until PATH exists
(a test creates it once what it waits for, such as the proxy splicing the flows, holds).
``serve --log-connections`` prints one JSON line per finished transfer connection:
``{"transfer": "eof" | "reset", "received": N, "sha256": hex}``.  Every client loop is bounded in
count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TRANSFER, PINGPONG, WHOAMI = b"T", b"P", b"W"
BLOCK = 64 * 1024
POOL = 1 << 20
STRIDE = 40961  # prime: consecutive blocks start at unrelated pool offsets
WRITE_BATCH = 4  # blocks per write() call
READ_SIZE = 1 << 18
STREAM_LIMIT = 1 << 20
MAX_ERRORS = 5


# ---------------------------------------------------------------------------
# Deterministic stream and its verifier


class Stream:
    """The deterministic byte stream of (seed, length)."""

    def __init__(self, seed: bytes, length: int):
        self.length = length
        self.pool_len = max(1, min(POOL, length))
        self.pool = random.Random(seed).randbytes(self.pool_len + BLOCK)

    def block(self, index: int) -> bytes:
        offset = (index * STRIDE) % self.pool_len
        data = index.to_bytes(8, "big") + self.pool[offset:offset + BLOCK - 8]
        end = self.length - index * BLOCK
        return data if end >= BLOCK else data[:end]

    def chunks(self, batch: int = WRITE_BATCH) -> Iterator[bytes]:
        """The stream in write-sized pieces."""
        blocks = (self.length + BLOCK - 1) // BLOCK
        for first in range(0, blocks, batch):
            yield b"".join(self.block(i) for i in range(first, min(first + batch, blocks)))


class Verifier:
    """Compares received bytes with the expected stream as they arrive."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.position = 0
        self.matches = True
        self.first_difference: int | None = None  # stream offset of the first wrong byte
        self._index = -1
        self._block = b""

    def feed(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            if self.position >= self.stream.length:
                self._differs(self.position)  # more than expected
                self.position += len(data) - start
                return
            index, offset = divmod(self.position, BLOCK)
            if index != self._index:
                self._index, self._block = index, self.stream.block(index)
            n = min(len(data) - start, len(self._block) - offset)
            if data[start:start + n] != self._block[offset:offset + n]:
                self._differs(self.position + next(
                    i for i in range(n) if data[start + i] != self._block[offset + i]))
            start += n
            self.position += n

    def _differs(self, offset: int) -> None:
        self.matches = False
        if self.first_difference is None:
            self.first_difference = offset

    @property
    def complete(self) -> bool:
        return self.matches and self.position == self.stream.length


# ---------------------------------------------------------------------------
# Helpers


def parse_target(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:]+):(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or [IPv6]:PORT")
    return m.group(1), int(m.group(2))


def format_address(host: str, port: int) -> str:
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes, with an optional binary suffix: 100, 64k, 10M, 1G (also KiB, MB...)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return "TimeoutError: timed out"
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[int, float]:
    if not values:
        return {p: 0.0 for p in points}
    ordered = sorted(values)
    return {p: ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def open_connection(host: str, port: int,
                          timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=STREAM_LIMIT), timeout)
    nodelay(writer)
    return reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (TimeoutError, OSError):
        pass


# ---------------------------------------------------------------------------
# Server


class Server:
    """The peer server: transfer, ping-pong and whoami on one port."""

    def __init__(self, name: str, log_connections: bool = False):
        self.name = name
        self.log_connections = log_connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay(writer)
        try:
            kind = await reader.read(1)
            if kind == TRANSFER:
                await self._transfer(reader, writer)
            elif kind == PINGPONG:
                await self._pingpong(reader, writer)
            elif kind == WHOAMI:
                await self._whoami(writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            await close_writer(writer)

    async def _transfer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(24)
        length, seed = int.from_bytes(header[:8], "big"), header[8:]
        digest = hashlib.sha256()
        received = 0
        try:
            while data := await reader.read(READ_SIZE):
                digest.update(data)
                received += len(data)
        except OSError:
            if self.log_connections:
                emit({"transfer": "reset", "received": received})
            raise
        if self.log_connections:
            emit({"transfer": "eof", "received": received, "sha256": digest.hexdigest()})
        writer.write(digest.digest())
        for chunk in Stream(seed, length).chunks():
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()

    async def _pingpong(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()

    async def _whoami(self, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        line = {"peer": format_address(peer[0], peer[1]),
                "local": format_address(local[0], local[1]), "name": self.name}
        writer.write(json.dumps(line, sort_keys=True).encode() + b"\n")
        await writer.drain()


def listen_socket(host: str, port: int) -> socket.socket:
    """One listening socket: dual-stack on '::' when the netns has IPv6, else IPv4."""
    attempts: list[tuple[int, str]] = []
    if host in ("", "::"):
        attempts = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        attempts = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    error: OSError | None = None
    for family, address in attempts:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.listen(1024)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            error = e
    assert error is not None
    raise error


async def serve(args: argparse.Namespace) -> int:
    server_obj = Server(args.name, args.log_connections)
    sock = listen_socket(args.host, args.port)
    server = await asyncio.start_server(server_obj.handle, sock=sock, limit=STREAM_LIMIT)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"listening": format_address(*sock.getsockname()[:2]), "name": args.name,
          "pid": os.getpid()})
    async with server:
        if args.duration:
            try:
                await asyncio.wait_for(stop.wait(), args.duration)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    return 0


# ---------------------------------------------------------------------------
# Clients


@dataclass
class Outcome:
    ok: bool = False
    sent: int = 0
    received: int = 0
    mismatch: bool = False
    error: str | None = None
    seconds: float = 0.0
    reset: str | None = None  # "send" / "receive": this connection aborted on purpose there


class _Abort(Exception):
    """A connection reaches the point where it was chosen to reset."""


def reset_transport(transport: asyncio.WriteTransport) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), dropping anything unsent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _abort(writer: asyncio.StreamWriter) -> None:
    reset_transport(writer.transport)


async def wait_for_file(path: str) -> None:
    """Until `path` exists (the caller bounds the wait)."""
    while not os.path.exists(path):
        await asyncio.sleep(0.01)


async def transfer_once(host: str, port: int, send: int, receive: int, timeout: float,
                        rng: random.Random, reset_at: tuple[str, int] | None = None,
                        start_when: str | None = None) -> Outcome:
    """One verified transfer connection; with reset_at ("send" or "receive", n) it
    aborts with a reset once n bytes of that phase have passed (n below the size); with
    start_when, connected, it sends nothing until that file exists."""
    outcome = Outcome()
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None

    async def run() -> None:
        nonlocal writer
        reader, writer = await open_connection(host, port, timeout)
        if start_when is not None:
            await wait_for_file(start_when)
        seed, send_seed = rng.randbytes(16), rng.randbytes(16)
        writer.write(TRANSFER + receive.to_bytes(8, "big") + seed)
        digest = hashlib.sha256()
        for chunk in Stream(send_seed, send).chunks():
            if reset_at and reset_at[0] == "send" and outcome.sent + len(chunk) > reset_at[1]:
                chunk = chunk[:reset_at[1] - outcome.sent]
                writer.write(chunk)
                await writer.drain()
                outcome.sent += len(chunk)
                raise _Abort("send")
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
            outcome.sent += len(chunk)
        writer.write_eof()
        their_digest = await reader.readexactly(32)
        if their_digest != digest.digest():
            outcome.mismatch = True
        verifier = Verifier(Stream(seed, receive))
        while data := await reader.read(READ_SIZE):
            verifier.feed(data)
            outcome.received += len(data)
            if reset_at and reset_at[0] == "receive" and outcome.received >= reset_at[1]:
                raise _Abort("receive")
        if not verifier.complete:
            outcome.mismatch = True
        if verifier.position != receive:
            outcome.error = f"received {verifier.position} bytes, expected {receive}"
        if verifier.first_difference is not None:  # where to look when it happens
            outcome.error = (f"{outcome.error or 'SHA-256 mismatch'}; the first byte that "
                             f"differs is at offset {verifier.first_difference}")

    try:
        await asyncio.wait_for(run(), timeout)
        outcome.ok = outcome.error is None and not outcome.mismatch
        if outcome.mismatch and outcome.error is None:
            outcome.error = "SHA-256 mismatch"
    except _Abort as e:
        outcome.reset = str(e)
        outcome.ok = not outcome.mismatch
        if writer is not None:
            _abort(writer)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
        outcome.error = describe(e)
    finally:
        if writer is not None:
            await close_writer(writer)
        outcome.seconds = time.perf_counter() - started
    return outcome


async def http_once(host: str, port: int, path: str, timeout: float) -> Outcome:
    """One HTTP/1.1 GET with Connection: close; 2xx/3xx is success."""
    outcome = Outcome()
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None

    async def run() -> None:
        nonlocal writer
        reader, writer = await open_connection(host, port, timeout)
        authority = format_address(host, port)
        request = (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: nodeproxy-peer\r\n"
                   "Connection: close\r\n\r\n").encode()
        writer.write(request)
        await writer.drain()
        outcome.sent = len(request)
        response = bytearray()
        while data := await reader.read(READ_SIZE):
            response += data
        outcome.received = len(response)
        status_line = bytes(response.split(b"\r\n", 1)[0])
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            outcome.error = f"bad HTTP response: {status_line[:60]!r}"
        elif not 200 <= int(parts[1]) < 400:
            outcome.error = f"HTTP status {int(parts[1])}"

    try:
        await asyncio.wait_for(run(), timeout)
        outcome.ok = outcome.error is None
    except (TimeoutError, OSError) as e:
        outcome.error = describe(e)
    finally:
        if writer is not None:
            await close_writer(writer)
        outcome.seconds = time.perf_counter() - started
    return outcome


async def transfer(args: argparse.Namespace) -> int:
    host, port = args.to
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(max(1, args.parallel))

    def plan() -> tuple[int, int, tuple[str, int] | None]:
        """One connection's sizes and reset point, drawn from the seeded generator."""
        send, receive = args.send, args.receive
        if args.random_sizes:
            send, receive = rng.randint(0, send), rng.randint(0, receive)
        reset_at = None
        if rng.random() < args.reset_fraction:
            phase = "receive" if receive > 1 and (send <= 1 or rng.random() < 0.5) else "send"
            if phase == "send":
                send = max(send, 2)
            reset_at = (phase, rng.randint(1, (send if phase == "send" else receive) - 1))
        return send, receive, reset_at

    plans = [plan() for _ in range(args.connections)]

    async def one(send: int, receive: int, reset_at: tuple[str, int] | None) -> Outcome:
        async with limit:
            return await transfer_once(host, port, send, receive, args.timeout, rng, reset_at,
                                       args.start_when)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(*p) for p in plans))
    elapsed = time.perf_counter() - started
    failed = [o for o in outcomes if not o.ok]
    sent = sum(o.sent for o in outcomes)
    received = sum(o.received for o in outcomes)
    result = {
        "ok": not failed,
        "connections": args.connections,
        "failed": len(failed),
        "errors": [o.error for o in failed[:MAX_ERRORS]],
        "sent": sent,
        "received": received,
        "sha_mismatch": sum(1 for o in outcomes if o.mismatch),
        "resets": {phase: sum(1 for o in outcomes if o.reset == phase)
                   for phase in ("send", "receive")},
        "elapsed_s": round(elapsed, 6),
        "mbytes_per_s": round((sent + received) / elapsed / 1e6, 3) if elapsed > 0 else 0.0,
    }
    emit(result)
    return 0 if result["ok"] else 1


def pingpong(args: argparse.Namespace) -> int:
    """Round trips on one blocking connection (least client overhead)."""
    host, port = args.to
    deadline = time.monotonic() + args.timeout
    payload = bytes(random.Random(1).randbytes(args.size))
    samples: list[float] = []
    error = None
    try:
        with socket.create_connection((host, port), timeout=min(args.timeout, 10.0)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(PINGPONG)
            for i in range(args.warmup + args.count):
                if time.monotonic() > deadline:
                    error = "TimeoutError: ran out of time"
                    break
                t0 = time.perf_counter_ns()
                sock.sendall(payload)
                got = 0
                while got < args.size:
                    data = sock.recv(args.size - got)
                    if not data:
                        raise ConnectionError("server closed the connection")
                    if data != payload[got:got + len(data)]:
                        raise ValueError("echo differs from what was sent")
                    got += len(data)
                if i >= args.warmup:
                    samples.append((time.perf_counter_ns() - t0) / 1000)
            sock.shutdown(socket.SHUT_WR)
    except (OSError, ValueError) as e:
        error = describe(e)
    p = percentiles(samples)
    result = {
        "ok": error is None and len(samples) == args.count,
        "count": len(samples),
        "size": args.size,
        "p50_us": round(p[50], 1),
        "p90_us": round(p[90], 1),
        "p99_us": round(p[99], 1),
        "min_us": round(min(samples), 1) if samples else 0.0,
        "max_us": round(max(samples), 1) if samples else 0.0,
        "mean_us": round(sum(samples) / len(samples), 1) if samples else 0.0,
        "error": error,
    }
    emit(result)
    return 0 if result["ok"] else 1


async def whoami(args: argparse.Namespace) -> int:
    host, port = args.to
    try:
        reader, writer = await open_connection(host, port, args.timeout)
        try:
            writer.write(WHOAMI)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), args.timeout)
        finally:
            await close_writer(writer)
        emit(json.loads(line))
        return 0
    except (TimeoutError, OSError, ValueError) as e:
        emit({"ok": False, "error": describe(e)})
        return 1


@dataclass
class LoadStats:
    succeeded: int = 0
    failed: int = 0
    sent: int = 0
    received: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    per_target: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, target: str, outcome: Outcome) -> None:
        counts = self.per_target.setdefault(target, Counter())
        self.sent += outcome.sent
        self.received += outcome.received
        if outcome.ok:
            self.succeeded += 1
            counts["succeeded"] += 1
            self.latencies_ms.append(outcome.seconds * 1000)
        else:
            self.failed += 1
            counts["failed"] += 1
            self.errors[outcome.error or "unknown"] += 1

    def summary(self, elapsed: float) -> dict[str, Any]:
        p = percentiles(self.latencies_ms)
        return {
            "ok": self.failed == 0 and self.succeeded > 0,
            "requests": self.succeeded + self.failed,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "sent": self.sent,
            "received": self.received,
            "errors": dict(self.errors.most_common(MAX_ERRORS)),
            "targets": {t: dict(c) for t, c in self.per_target.items()},
            "latency_ms": {"p50": round(p[50], 3), "p90": round(p[90], 3),
                           "p99": round(p[99], 3),
                           "max": round(max(self.latencies_ms), 3) if self.latencies_ms else 0.0},
            "elapsed_s": round(elapsed, 3),
        }


async def load(args: argparse.Namespace) -> int:
    """Short requests at a fixed rate (or closed loop), bounded by duration AND count."""
    targets = args.to
    rng = random.Random(args.seed)
    max_requests = args.max_requests
    if max_requests is None:
        max_requests = int(args.rate * args.duration) + 1 if args.rate > 0 else 100_000
    stats = LoadStats()
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def one(host: str, port: int) -> None:
        if args.mode == "http":
            outcome = await http_once(host, port, args.path, args.timeout)
        else:
            outcome = await transfer_once(host, port, args.send, args.receive, args.timeout, rng)
        stats.add(format_address(host, port), outcome)

    started = time.monotonic()
    end = started + args.duration
    next_progress = started + args.progress if args.progress else float("inf")
    issued = 0
    while issued < max_requests and not stop.is_set():
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_progress:
            emit({"progress": True, **stats.summary(now - started)})
            next_progress += args.progress
        if args.rate > 0:
            due = started + issued / args.rate
            if due > now:
                await asyncio.sleep(min(due - now, end - now, 0.1))
                continue
        if len(tasks) >= args.concurrency:
            await asyncio.wait(set(tasks), timeout=min(0.1, end - now),
                               return_when=asyncio.FIRST_COMPLETED)
            continue
        host, port = targets[issued % len(targets)]
        task = asyncio.create_task(one(host, port))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        issued += 1
    if tasks:
        # Each request is bounded by its own timeout; this is a second bound.
        await asyncio.wait(set(tasks), timeout=args.timeout + 2)
        for task in tasks:
            task.cancel()
    summary = stats.summary(time.monotonic() - started)
    summary["unfinished"] = issued - summary["requests"]
    emit(summary)
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.testbed.peer",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve transfer, ping-pong and whoami")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="::", help="address to bind ('::' = dual stack)")
    p.add_argument("--name", default=os.environ.get("PEER_NAME") or socket.gethostname(),
                   help="name reported by whoami")
    p.add_argument("--duration", type=float, default=0.0,
                   help="exit after this many seconds (0: until SIGTERM)")
    p.add_argument("--log-connections", action="store_true",
                   help="print a JSON line per finished transfer connection")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--to", type=parse_target, required=True,
                       action="append" if name == "load" else "store",
                       help="HOST:PORT or [IPv6]:PORT")
        c.add_argument("--timeout", type=float, default=30.0, help="seconds per connection")
        return c

    p = client("transfer", "verified bulk transfers in both directions")
    p.add_argument("--send", type=parse_size, default=0)
    p.add_argument("--receive", type=parse_size, default=0)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--random-sizes", action="store_true",
                   help="each connection sends and receives a random size up to the above")
    p.add_argument("--reset-fraction", type=float, default=0.0,
                   help="share of connections that abort with a reset at a random point")
    p.add_argument("--start-when", metavar="PATH", default=None,
                   help="each connection, once connected, sends nothing until PATH exists "
                        "(within --timeout)")

    p = client("pingpong", "request/response round-trip latency on one connection")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)

    client("whoami", "ask the server who we look like")

    p = client("load", "short requests at a bounded rate for a bounded time")
    p.add_argument("--mode", choices=("transfer", "http"), default="transfer")
    p.add_argument("--send", type=parse_size, default=1024)
    p.add_argument("--receive", type=parse_size, default=1024)
    p.add_argument("--path", default="/", help="http mode: request path")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=20.0, help="requests/s (0: closed loop)")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--progress", type=float, default=0.0,
                   help="print a progress line every this many seconds")
    p.add_argument("--seed", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "load" and args.duration <= 0:
        raise SystemExit("load: --duration must be positive")
    try:
        import uvloop  # type: ignore[import-not-found]
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.command == "pingpong":
        return pingpong(args)
    handler = {"serve": serve, "transfer": transfer, "whoami": whoami, "load": load}
    return int(runner(handler[args.command](args)))


if __name__ == "__main__":
    sys.exit(main())

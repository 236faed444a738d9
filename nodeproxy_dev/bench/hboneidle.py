"""What one idle cross-node flow holds in Python, at each end: a profile, not a benchmark.

Run as ``python -m nodeproxy_dev.bench.hboneidle [--flows N] [--settle S] [--top K]``
(no root, no cluster, a few seconds).  The path is hbonecalls' (the daemons' own
objects over loopback: a client socket -> a relay -> a tunnel stream over mutual TLS ->
the serving session -> a relay -> a server socket), N flows opened, one byte each way
through each (so every flow is established as a real one is), then left quiet for S
seconds (the relays' quiet wait: with a `RelayNaps` as the daemons have, those that
sleep are asleep by then).  Printed:

- tracemalloc's growth per flow (both ends in one process), by the source line that
  allocated it, the K largest;
- each end's objects of one flow, by `sys.getsizeof` of the object and of its
  ``__dict__`` (the source node: the relay, its two sides, the client socket's transport,
  the tunnel stream and h2's stream state; the destination node the same with the
  server socket), so each figure says which end holds it.

uvloop's libuv handles and the kernel's socket buffers are not Python allocations: a
transport's C memory (about 2 KiB, docs/benchmarks.md, "Idle relayed flows, seventh
round") is in neither figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import tracemalloc
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.tcp.dormancy import Dormancy
from nodeproxy.tcp.half_sleep import HalfNaps
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.relay_sleep import RelaySleepMetrics
from nodeproxy.tunnel.session import H2Session, StreamTransport
from nodeproxy_dev.bench.hbonecalls import CONNECT, _Echo, _tunnel


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (a relay sleeps only on a TCP socket's
    side), the first the proxy's."""
    listener = socket.create_server(("127.0.0.1", 0))
    far = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    return near, far


def _size(obj: Any) -> int:
    """The object and its own __dict__ (not what it refers to)."""
    n = sys.getsizeof(obj)
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        n += sys.getsizeof(d)
    return n


def _end(relay: Relay, stream: StreamTransport) -> list[tuple[str, int]]:
    """One end's objects of one flow, by name and bytes."""
    rows: list[tuple[str, int]] = [("Relay", _size(relay))]
    for side in (relay.downstream, relay.upstream):
        rows.append((f"Side ({side.name}){' [shared]' if side.relay is None else ''}",
                     _size(side)))
        transport = side.transport
        if transport is not None and not isinstance(transport, StreamTransport):
            rows.append((f"socket transport ({type(transport).__name__})",
                         _size(transport)))
    rows.append(("StreamTransport (+ __dict__)", _size(stream)))
    reader = stream.protocol
    rows.append((f"  its reader: {type(reader).__name__}"
                 f"{' (the relay: no side while asleep)' if reader is relay else ''}", 0))
    for name in ("_pending", "_early", "request_headers", "response"):
        value = getattr(stream, name, None)
        if value is not None:
            rows.append((f"  StreamTransport.{name} ({type(value).__name__})",
                         sys.getsizeof(value)))
    h2_stream = stream.session.conn.streams.get(stream.stream_id)
    if h2_stream is not None:
        rows.append(("h2 H2Stream (+ __dict__)", _size(h2_stream)))
        for name, value in vars(h2_stream).items():
            if hasattr(value, "__dict__") or hasattr(value, "__slots__"):
                rows.append((f"  H2Stream.{name} ({type(value).__name__})", _size(value)))
    else:
        rows.append(("h2 H2Stream: none (asleep)", 0))
    session = stream.session
    rows.append(("session.streams entry (dict slot)", 0))
    if session.guard is not None:
        rows.append(("guard's per-stream entries", 0))
    return rows


async def _run(flows: int, settle: float, top: int) -> None:
    loop = asyncio.get_running_loop()
    naps = HalfNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))
    server_ends: list[tuple[Relay, StreamTransport]] = []
    client_ends: list[tuple[Relay, StreamTransport]] = []
    keep: list[Any] = []

    async def serve_stream(session: H2Session, stream: StreamTransport) -> None:
        session.respond(stream, 200)
        down = Side("tunnel")
        stream.set_protocol(down)
        near, far = _tcp_pair()
        _, up = await loop.create_connection(lambda: Side("tcp"), sock=near)
        keep.append(await loop.create_connection(_Echo, sock=far))
        relay = Relay(down, up, lambda _d, _n: None, lambda _r: None)
        relay.start()
        naps.offer(relay)
        server_ends.append((relay, stream))

    client = await _tunnel(lambda s, st: loop.create_task(serve_stream(s, st)))

    async def one() -> None:
        stream = client.open_stream(CONNECT)
        await asyncio.wait_for(stream.response, 5)
        up = Side("tunnel")
        stream.set_protocol(up)
        near, far = _tcp_pair()
        _, down = await loop.create_connection(lambda: Side("tcp"), sock=near)
        relay = Relay(down, up, lambda _d, _n: None, lambda _r: None)
        relay.start()
        naps.offer(relay)
        client_ends.append((relay, stream))
        far.setblocking(False)
        await loop.sock_sendall(far, b"x")
        assert await asyncio.wait_for(loop.sock_recv(far, 1), 5) == b"x"
        keep.append(far)

    await one()  # the first flow's one-off allocations (caches, the pool) go before
    await asyncio.sleep(settle)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    for _ in range(flows):
        await one()
    await asyncio.sleep(settle)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{flows} idle cross-node flows, both ends in one process, after {settle:.1f} s "
          f"quiet ({naps.asleep} relays asleep of {2 * (flows + 1)}): "
          f"{total / flows:.0f} bytes traced per flow")
    for s in stats[:top]:
        frame = s.traceback[0]
        print(f"  {s.size_diff / flows:8.1f} B  {s.count_diff / flows:5.2f} blocks  "
              f"{frame.filename.rsplit('/', 2)[-2:]!s}:{frame.lineno}")
    for name, ends in (("source node (node0)", client_ends),
                       ("destination node (node1)", server_ends)):
        relay, stream = ends[-1]
        rows = _end(relay, stream)
        print(f"{name}: one flow's objects (getsizeof, own __dict__ included)")
        for what, n in rows:
            print(f"  {n:6d} B  {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.hboneidle",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=500)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    uvloop.run(_run(args.flows, args.settle, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

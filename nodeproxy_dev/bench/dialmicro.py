"""The transparent dial's own cost in one process, without a cluster: a micro-benchmark.

Run as ``python -m nodeproxy_dev.bench.dialmicro [--dials N] [--rounds R]`` (root: the
sockets are made through this process's own netns handle, as the daemon makes them in a
pod's).  Per round and variant, N dials to a listener on 127.0.0.1 the way
tcp/dial.py makes them (socket in the netns, SO_REUSEADDR, connect, a uvloop transport),
each closed at once; printed: microseconds of this process's CPU per dial.  Variants:
``enter-each`` (setns in and out per socket, the wait for writability: the dial before
issue 16's eighth round), ``batched`` (Netns.dial_socket), ``on-host`` (no wait when the
handshake completed inside connect()), ``both``.  Bounded: N at most 20,000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import uvloop

from nodeproxy.capture.namespaces import Netns
from nodeproxy.tcp.dial import connect_socket

VARIANTS = {"enter-each": (False, False), "batched": (True, False),
            "on-host": (False, True), "both": (True, True)}


async def _dials(netns: Netns, address: tuple[str, int], count: int, batched: bool,
                 on_host: bool) -> float:
    loop = asyncio.get_running_loop()
    started = time.process_time()
    for _ in range(count):
        if batched:
            sock = netns.dial_socket(socket.AF_INET, 1 << 30)
        else:
            sock = netns.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await connect_socket(sock, address, 5.0, on_host=on_host)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
        transport.abort()
    return (time.process_time() - started) / count * 1e6


async def _accept_all(server: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(server)
        conn.close()


async def main_async(count: int, rounds: int) -> dict[str, list[float]]:
    netns = Netns.open("/proc/self/ns/net")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    server.setblocking(False)
    acceptor = asyncio.get_running_loop().create_task(_accept_all(server))
    result: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(rounds):
            for name, (batched, on_host) in VARIANTS.items():
                result[name].append(round(await _dials(
                    netns, server.getsockname(), count, batched, on_host), 2))
    finally:
        acceptor.cancel()
        server.close()
        netns.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.dialmicro",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dials", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not 1 <= args.dials <= 20000 or not 1 <= args.rounds <= 10:
        parser.error("--dials 1..20000, --rounds 1..10")
    print(json.dumps(uvloop.run(main_async(args.dials, args.rounds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

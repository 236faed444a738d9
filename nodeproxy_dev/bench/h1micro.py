"""The HTTP/1.1 codec alone, in one process: CPU per request of an H1Client sending
keep-alive GETs to an H1Server over loopback on uvloop (both sides of the proxy's
codec, no routing, no telemetry).

``python -m nodeproxy_dev.bench.h1micro [--requests N]`` prints which h1 module ran
(its file: a compiled build of the codec shows as a .so) and the process's CPU and user
CPU microseconds per request.  Alternate runs when comparing two builds, as the
machine's load moves each by ±10 %.  A development aid, not a benchmark target.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from typing import cast

import uvloop

import nodeproxy.codec.h1 as h1
from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.message import Body, RequestHead, ResponseHead

WARM_UP = 500


async def _answer(exchange: H1Exchange) -> None:
    while await exchange.body.read():
        pass
    await exchange.respond(ResponseHead(200, [("content-length", "5"), ("x-a", "b")]))
    await exchange.send(b"hello")
    await exchange.finish()


async def _run(requests: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: cast(asyncio.Protocol, H1Server(_answer, max_header_bytes=8192,
                                                idle_timeout=30)),
        "127.0.0.1", 0)  # (a protocol by its methods: codec/h1.py)
    port = server.sockets[0].getsockname()[1]
    client = H1Client()
    transport, _ = await loop.create_connection(lambda: cast(asyncio.Protocol, client),
                                                "127.0.0.1", port)
    head = RequestHead("GET", "/bench/x", "web", [("user-agent", "wrk"), ("accept", "*/*")])

    async def one() -> None:
        while not client.can_take():
            await asyncio.sleep(0)
        response = await client.send(head, Body.empty())
        while await response.body.read():
            pass

    try:
        for _ in range(WARM_UP):
            await one()
        usage, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        for _ in range(requests):
            await one()
        user = resource.getrusage(resource.RUSAGE_SELF).ru_utime - usage.ru_utime
        return time.process_time() - cpu, user
    finally:
        transport.close()
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000)
    args = parser.parse_args()
    if not 1 <= args.requests <= 1_000_000:
        parser.error("--requests must be in [1, 1000000]")
    cpu, user = uvloop.run(_run(args.requests))
    print(f"{h1.__file__}: {1e6 * cpu / args.requests:.1f} µs CPU, "
          f"{1e6 * user / args.requests:.1f} µs user CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

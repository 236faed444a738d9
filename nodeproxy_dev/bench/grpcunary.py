"""The gRPC unary benchmark's server and client (grpcio), run inside the pods.

``python -m nodeproxy_dev.bench.grpcunary serve --port P``: one method,
``/nodeproxy.bench.Echo/Call``, answering each request's bytes repeated ``REPEAT`` times
(raw bytes, no protobuf: what is measured is the proxy's HTTP/2 and gRPC framing, not a
serializer).

``python -m nodeproxy_dev.bench.grpcunary call HOST:PORT --calls N --concurrency C``:
one channel (one HTTP/2 connection), C calls in flight until N were made, each request
unique (its number, then random bytes), each answer compared with what the server must
send.  Prints one JSON line: calls made, answered right, failed (by gRPC status), wrong
(an answer of other bytes), the wall time and the latency percentiles (µs) of the calls
answered right.  The client's own CPU is not the proxy's: the bench measures the proxy
from /proc, as for wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import sys
import time
from typing import Any

import grpc

SERVICE, METHOD = "nodeproxy.bench.Echo", "Call"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
REPEAT = 8  # the answer is the request this many times: 128 B in, 1 KiB out by default
CALL_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


def answer(request: bytes) -> bytes:
    """What the server sends back for ``request``; the client checks every answer."""
    return request * REPEAT


def percentile(sorted_values: list[float], point: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(point / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


async def _call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return answer(request)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_call)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    await server.wait_for_termination()


async def drive(target: str, calls: int, concurrency: int, size: int) -> dict[str, Any]:
    """Make ``calls`` unary calls, ``concurrency`` at a time, on one channel."""
    failed: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    wrong = 0
    issued = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(FULL_METHOD)
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)

        async def worker() -> None:
            nonlocal issued, wrong
            while issued < calls:
                issued += 1
                request = issued.to_bytes(8, "big") + os.urandom(max(0, size - 8))
                t0 = time.perf_counter()
                try:
                    response = await call(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as e:
                    failed[e.code().name] += 1
                    continue
                elapsed = time.perf_counter() - t0
                if response != answer(request):
                    wrong += 1
                else:
                    latencies.append(elapsed * 1e6)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    latencies.sort()
    return {"calls": issued, "ok": len(latencies), "failed": sum(failed.values()),
            "failed_by_status": dict(failed), "wrong": wrong, "duration_s": duration,
            "p50_us": percentile(latencies, 50), "p99_us": percentile(latencies, 99),
            "max_us": latencies[-1] if latencies else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("call")
    c.add_argument("target", help="HOST:PORT")
    c.add_argument("--calls", type=int, required=True)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--size", type=int, default=128, help="request bytes (answer: 8×)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve(args.port))
        return 0
    if not 1 <= args.calls <= 1_000_000 or not 1 <= args.concurrency <= 1000 \
            or not 8 <= args.size <= 65536:
        parser.error("--calls in [1, 1e6], --concurrency in [1, 1000], --size in [8, 65536]")
    print(json.dumps(asyncio.run(drive(args.target, args.calls, args.concurrency,
                                       args.size))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""In-pod client that opens N connections to the peer server and holds them idle.

Run as ``python -m nodeproxy_dev.bench.idle --to HOST:PORT --count N``.  Each
connection speaks the peer's ping-pong protocol once (one byte echoed), so it
is known to reach the server through whatever proxy is on the way; then it
stays open and silent.  Prints ``{"ready": true, "open": N, ...}`` once all are
open, holds them until stdin closes (or ``--hold`` seconds pass), closes them
and prints ``{"closed": N}``.  Bounded: at most 60000 connections, every
connect and the hold have timeouts.  Raises its own open-file limit to fit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from nodeproxy_dev.testbed.peer import PINGPONG, describe, parse_target

MAX_CONNECTIONS = 60000
PARALLEL = 64  # connects in flight: below the listen backlog of the proxies (100)


def raise_nofile(count: int) -> None:
    need = count + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))


async def hold(args: argparse.Namespace) -> int:
    host, port = args.to
    writers: list[asyncio.StreamWriter] = []
    errors: Counter[str] = Counter()
    limit = asyncio.Semaphore(PARALLEL)

    async def one() -> None:
        async with limit:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        args.timeout)
            except (OSError, TimeoutError) as e:
                errors[describe(e)] += 1
                return
            try:
                writer.write(PINGPONG + b"x")
                await writer.drain()
                echo = await asyncio.wait_for(reader.readexactly(1), args.timeout)
                if echo != b"x":
                    raise ValueError("wrong echo")
                writers.append(writer)
            except (OSError, TimeoutError, ValueError, RuntimeError,
                    asyncio.IncompleteReadError) as e:  # RuntimeError: closed under us
                errors[describe(e)] += 1
                writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.count)))
    print(json.dumps({"ready": True, "open": len(writers), "failed": sum(errors.values()),
                      "errors": dict(errors.most_common(5)),
                      "setup_s": round(time.monotonic() - started, 3)}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), args.hold)
    except TimeoutError:
        pass
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)
    print(json.dumps({"closed": len(writers)}), flush=True)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.idle",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", type=parse_target, required=True, help="HOST:PORT")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per connect")
    parser.add_argument("--hold", type=float, default=120.0,
                        help="seconds to hold the connections at most")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_CONNECTIONS:
        parser.error(f"--count must be between 1 and {MAX_CONNECTIONS}")
    raise_nofile(args.count)
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop  # type: ignore[import-not-found]
        runner = uvloop.run
    except ImportError:
        pass
    return int(runner(hold(args)))


if __name__ == "__main__":
    sys.exit(main())

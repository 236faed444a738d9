"""In-pod client that finds how many concurrent connections a route holds: it opens them
step by step and keeps them open until the route refuses or slows, or the cap is reached.

Run as ``python -m nodeproxy_dev.bench.capacity --to HOST:PORT --max N --step S``.  Each
connection speaks the peer's ping-pong protocol once (one byte echoed), so it is known
to reach the server through whatever proxy is on the way.  After each step a sample of
the connections already held echoes a byte again (they still carry data).  It stops at
the first of:

- ``refused``: a connection of the step failed (reset, refused, or no echo within
  ``--timeout``), or a held connection no longer echoes;
- ``slowed``: the step took more than ``--slow-factor`` times the median time per
  connection of the steps before it;
- ``cap``: ``--max`` connections are held.

Prints one JSON line: ``held`` (connections open and echoing when it stopped), the
reason, each step's seconds per connection and the first errors; then closes every
connection and exits.  Bounded: at most MAX_CONNECTIONS, every connect and echo has a
timeout, the whole run ``--deadline`` seconds.  Raises its own open-file limit as far
as the hard limit allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from nodeproxy_dev.testbed.peer import PINGPONG, parse_target
from nodeproxy_dev.testbed.peer import describe as describe_error

MAX_CONNECTIONS = 60000
PARALLEL = 64  # connects in flight: below the proxies' listen backlog
SAMPLE = 16  # held connections checked after each step


def slowdown(step_seconds: Sequence[float]) -> float:
    """The last step's time per connection against the median of the steps before it
    (1.0 with one step): the median, not the first, since a route's first step also pays
    its warm-up."""
    if len(step_seconds) < 2:
        return 1.0
    before = statistics.median(step_seconds[:-1])
    return step_seconds[-1] / before if before > 0 else 1.0


def stop_reason(step_seconds: Sequence[float], step_failed: int, held: int, cap: int,
                slow_factor: float) -> str | None:
    """Why to stop after a step (None: go on).  step_seconds: seconds per connection of
    every step so far; step_failed: connections of the last step (or of the held sample)
    that failed."""
    if step_failed:
        return "refused"
    if slowdown(step_seconds) > slow_factor:
        return "slowed"
    if held >= cap:
        return "cap"
    return None


def fit_nofile(wanted: int) -> int:
    """Raise the soft open-file limit toward ``wanted`` (not past the hard limit); the
    number of connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return max(0, soft - 64)


def describe(error: BaseException) -> str:
    """The error's name and text, without the addresses a closed transport's repr has."""
    if isinstance(error, RuntimeError):
        return "RuntimeError: the transport was closed"
    return describe_error(error)


class Held:
    """The open connections and what went wrong opening them."""

    def __init__(self) -> None:
        self.writers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.errors: Counter[str] = Counter()

    async def open_one(self, host: str, port: int, timeout: float,
                       limit: asyncio.Semaphore) -> bool:
        async with limit:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        timeout)
            except (OSError, TimeoutError) as e:
                self.errors[describe(e)] += 1
                return False
            try:
                writer.write(PINGPONG + b"x")
                await writer.drain()
                if await asyncio.wait_for(reader.readexactly(1), timeout) != b"x":
                    raise ValueError("wrong echo")
            except (OSError, TimeoutError, ValueError, RuntimeError,
                    asyncio.IncompleteReadError) as e:
                self.errors[describe(e)] += 1
                writer.close()
                return False
            self.writers.append((reader, writer))
            return True

    async def still_echo(self, count: int, timeout: float) -> int:
        """Echo one byte on up to ``count`` held connections; how many failed."""
        failed = 0
        for reader, writer in random.sample(self.writers, min(count, len(self.writers))):
            try:
                writer.write(b"y")
                await writer.drain()
                if await asyncio.wait_for(reader.readexactly(1), timeout) != b"y":
                    raise ValueError("wrong echo")
            except (OSError, TimeoutError, ValueError, RuntimeError,
                    asyncio.IncompleteReadError) as e:
                self.errors[f"held: {describe(e)}"] += 1
                failed += 1
        return failed

    def close(self) -> None:
        for _, writer in self.writers:
            writer.close()


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.to
    held = Held()
    limit = asyncio.Semaphore(PARALLEL)
    steps: list[float] = []
    reason: str | None = None
    end = time.monotonic() + args.deadline
    try:
        while reason is None:
            if time.monotonic() > end:
                reason = "deadline"
                break
            count = min(args.step, args.max - len(held.writers))
            started = time.monotonic()
            results = await asyncio.gather(*(held.open_one(host, port, args.timeout, limit)
                                             for _ in range(count)))
            steps.append((time.monotonic() - started) / max(1, count))
            failed = results.count(False) + await held.still_echo(SAMPLE, args.timeout)
            reason = stop_reason(steps, failed, len(held.writers), args.max,
                                 args.slow_factor)
        return {"held": len(held.writers), "reason": reason, "max": args.max,
                "step": args.step, "step_ms_per_conn": [round(s * 1000, 3) for s in steps],
                "slowdown": round(slowdown(steps), 3),
                "errors": dict(held.errors.most_common(5))}
    finally:
        held.close()
        await asyncio.sleep(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.capacity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", type=parse_target, required=True, help="HOST:PORT")
    parser.add_argument("--max", type=int, required=True, help="connections at most")
    parser.add_argument("--step", type=int, default=1000, help="connections per step")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds per connect and per echo")
    parser.add_argument("--slow-factor", type=float, default=4.0,
                        help="stop when a step's time per connection exceeds this "
                             "multiple of the median of the steps before it")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds in all")
    args = parser.parse_args(argv)
    if not 1 <= args.max <= MAX_CONNECTIONS or args.step < 1:
        parser.error(f"--max must be between 1 and {MAX_CONNECTIONS}, --step at least 1")
    args.max = min(args.max, fit_nofile(args.max + 64))
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    try:
        import uvloop  # type: ignore[import-not-found]
        runner = uvloop.run
    except ImportError:
        pass
    print(json.dumps(runner(probe(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

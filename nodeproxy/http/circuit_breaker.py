"""Circuit breaking per upstream service: the counters behind ``trafficPolicy.connectionPool``.

One ``CircuitBreaker`` per service (per node proxy, over all its client pods and
endpoints) counts

- ``connections``: open upstream connections of the service, in every pool (a connection
  counts from the moment it starts connecting until it closes);
- ``pending``: requests waiting for a connection (an HTTP/1.1 pool whose connections are
  all busy, with the service at ``maxConnections``);
- ``requests``: requests sent or about to be sent (one slot per client request: its
  attempts follow one another);
- ``retries``: retries in progress, from the decision to retry until that attempt's
  result is known.

A request that would exceed ``maxRequests`` or ``maxPendingRequests`` is refused
(``Overflow``; the caller answers 503, flag UO); a retry beyond ``maxRetries`` is not
made (the failure goes back as it is).  ``maxConnections`` makes new requests wait as
pending instead of opening a connection, except that a pool with no connection at all
may always open one (Envoy does the same: otherwise one endpoint's idle connections
could starve another endpoint forever); such an opening is counted as a connection
overflow.  Every refusal is counted per limit (``overflows`` and the metric callback).

Waiting: a pending request waits on its own pool's queue; a connection that goes idle
(HTTP/1.1) or ends a stream (HTTP/2) wakes the oldest waiter of its pool, a connection
that closes wakes the oldest waiter of the service.  A woken waiter that finds nothing
(a new request took the connection first) queues again at the front.  Waiting is
bounded by the request timeout only.

The limits may change on reload without losing the counts (``limits`` is replaced in
place).  No I/O, no timers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable

from nodeproxy.config.model import ConnectionPool

CONNECTIONS = "connections"
PENDING = "pending"
REQUESTS = "requests"
RETRIES = "retries"
LIMITS = (CONNECTIONS, PENDING, REQUESTS, RETRIES)

OVERFLOW_TEXT = "upstream connect error or disconnect/reset before headers. reset reason: overflow"


class Overflow(Exception):
    """A request refused by a circuit breaker; ``limit`` is one of LIMITS."""

    def __init__(self, limit: str):
        super().__init__(f"circuit breaker: {limit} limit reached")
        self.limit = limit


class CircuitBreaker:
    """Limits and live counts of one service (see the module docstring)."""

    def __init__(self, limits: ConnectionPool, *,
                 on_overflow: Callable[[str], None] | None = None):
        self.limits = limits
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.overflows = dict.fromkeys(LIMITS, 0)
        self._on_overflow = on_overflow
        # Waiters per pool (any hashable owner), each (sequence, future): FIFO per pool;
        # the sequence finds the service's oldest waiter.
        self._waiters: dict[object, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._sequence = itertools.count()

    def overflow(self, limit: str) -> None:
        """Count one refusal (or, for connections, one opening past the limit)."""
        self.overflows[limit] += 1
        if self._on_overflow is not None:
            self._on_overflow(limit)

    # -- requests and retries ----------------------------------------------------------------

    def begin_request(self) -> None:
        """Take a request slot, or raise Overflow(REQUESTS)."""
        if self.requests >= self.limits.max_requests:
            self.overflow(REQUESTS)
            raise Overflow(REQUESTS)
        self.requests += 1

    def end_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1

    def retry_slot_free(self) -> bool:
        """Would ``begin_retry()`` give a slot now?  (Takes nothing.)"""
        return self.retries < self.limits.max_retries

    def begin_retry(self) -> bool:
        """Take a retry slot; False (counted) if maxRetries retries are in progress."""
        if not self.retry_slot_free():
            self.overflow(RETRIES)
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        if self.retries > 0:
            self.retries -= 1

    # -- connections -------------------------------------------------------------------------

    def may_open(self, pool_size: int) -> bool:
        """May a pool that has pool_size open connections open another now?  A pool with
        none always may (counted as an overflow when past the limit)."""
        if self.connections < self.limits.max_connections:
            return True
        if pool_size == 0:
            self.overflow(CONNECTIONS)
            return True
        return False

    def opened(self) -> None:
        """A connection starts connecting (call closed() exactly once when it ends)."""
        self.connections += 1

    def closed(self) -> None:
        """A connection closed (or failed to connect): room for the oldest waiter."""
        if self.connections > 0:
            self.connections -= 1
        oldest: deque[tuple[int, asyncio.Future[None]]] | None = None
        for queue in self._waiters.values():
            if queue and (oldest is None or queue[0][0] < oldest[0][0]):
                oldest = queue
        if oldest is not None:
            self._wake(oldest)

    def idle(self, pool: object) -> None:
        """A connection of `pool` can take a request again: wake that pool's oldest waiter."""
        queue = self._waiters.get(pool)
        if queue:
            self._wake(queue)

    @staticmethod
    def _wake(queue: deque[tuple[int, asyncio.Future[None]]]) -> bool:
        """Wake the oldest live waiter of queue; waiters already cancelled (their request
        timed out or its client left) are skipped, so the wake is not lost on them."""
        while queue:
            _, future = queue.popleft()
            if not future.done():
                future.set_result(None)
                return True
        return False

    def begin_pending(self) -> None:
        """A request starts waiting for a connection, or Overflow(PENDING)."""
        if self.pending >= self.limits.max_pending_requests:
            self.overflow(PENDING)
            raise Overflow(PENDING)
        self.pending += 1

    def end_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1

    async def wait(self, pool: object, *, front: bool = False) -> None:
        """Wait until a connection of `pool` goes idle or one of the service closes
        (front: queue before the others, for a waiter woken in vain)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(pool, deque())
        entry = (next(self._sequence) if not front or not queue else queue[0][0] - 1, future)
        if front:
            queue.appendleft(entry)
        else:
            queue.append(entry)
        try:
            await future
        except BaseException:
            # Woken, then cancelled before it could use the wake: pass it on.
            if future.done() and not future.cancelled():
                self._wake(queue)
            raise
        finally:
            if not future.done():
                future.cancel()
            try:
                queue.remove(entry)
            except ValueError:
                pass
            if not queue and self._waiters.get(pool) is queue:
                del self._waiters[pool]

    def snapshot(self) -> dict[str, object]:
        """For /clusters: the limits, the live counts and the overflows so far."""
        limits = self.limits
        return {
            "max_connections": limits.max_connections, "connections": self.connections,
            "max_pending_requests": limits.max_pending_requests, "pending": self.pending,
            "max_requests": limits.max_requests, "requests": self.requests,
            "max_retries": limits.max_retries, "retries": self.retries,
            "overflows": dict(self.overflows),
        }

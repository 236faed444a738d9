"""Each source's fair share of the node proxy: what one source may hold at once.

The node proxy is one process shared by every pod on the node, so one pod must not be
able to take it from the others.  Each source (an enrolled pod at its outbound listener;
for inbound traffic a remote node or a plaintext client address) is held to:

- ``maxConnections`` connections open at once, from accept until the connection ends;
- ``connectionsPerSecond`` new connections (a token bucket of ``connectionBurst`` tokens,
  full at first, refilled continuously: over any T seconds at most burst + rate * T);
- ``maxRequests`` HTTP requests in flight (from a complete request head until its
  exchange ends: waiting for a pooled connection counts as in flight).

A source over a cap is refused at once; the caller counts the returned reason.  The
shares are pure bookkeeping (no I/O, an injectable clock) so they are unit-tested alone.
A ``Lease`` is one accepted connection's hold on its source's share: released exactly
once, whichever way the connection ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodeproxy.log_limit import LOG_EVERY_SECONDS, LogLimiter
from nodeproxy.tcp.token_bucket import TokenBucket

Clock = Callable[[], float]

# Refusal reasons (the `reason` label of the refused counters).
CONNECTION_LIMIT = "connection_limit"
CONNECTION_RATE = "connection_rate"
REQUEST_LIMIT = "request_limit"
DESCRIPTORS = "descriptors"

SWEEP_EVERY = 4096


@dataclass(frozen=True)
class ShareLimits:
    """One kind of source's caps; None: that cap is off."""

    max_connections: int | None
    connections_per_second: float | None = None
    connection_burst: int | None = None  # None: two seconds' worth of the rate
    max_requests: int | None = None

    @property
    def burst(self) -> int:
        rate = self.connections_per_second or 0.0
        return self.connection_burst if self.connection_burst is not None \
            else max(1, math.ceil(2 * rate))


class _Share:
    __slots__ = ("bucket", "connections", "requests")

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.bucket: TokenBucket | None = None


class Lease:
    """One connection's place in its source's share; ``release`` is idempotent."""

    __slots__ = ("_shares", "adopted", "key", "released")

    def __init__(self, shares: SourceShares | None, key: str):
        self._shares = shares
        self.key = key
        self.released = shares is None
        self.adopted = False  # a tracked relay or HTTP connection releases it when it ends

    def release(self) -> None:
        if not self.released:
            self.released = True
            assert self._shares is not None
            self._shares.release_connection(self.key)


# A lease that holds nothing (a path without caps).
FREE = Lease(None, "")


class SourceShares:
    """Connections and requests per source key, under one ShareLimits (replaceable live)."""

    def __init__(self, limits: ShareLimits, clock: Clock = time.monotonic):
        self._limits = limits
        self._clock = clock
        self._shares: dict[str, _Share] = {}
        self._operations = 0  # every SWEEP_EVERY admissions, idle entries are dropped

    @property
    def limits(self) -> ShareLimits:
        return self._limits

    def update(self, limits: ShareLimits) -> None:
        """New caps apply from now on; what sources hold stays counted.  Buckets start
        again (full) only if the rate or burst changed."""
        rate_changed = (limits.connections_per_second, limits.burst) != \
            (self._limits.connections_per_second, self._limits.burst)
        self._limits = limits
        if rate_changed:
            for share in self._shares.values():
                share.bucket = None
        self._forget_idle()

    def connections(self, key: str) -> int:
        share = self._shares.get(key)
        return share.connections if share else 0

    def requests(self, key: str) -> int:
        share = self._shares.get(key)
        return share.requests if share else 0

    def __len__(self) -> int:
        return len(self._shares)

    def snapshot(self) -> list[tuple[str, int, int]]:
        """(key, connections, requests) of every source holding something, sorted."""
        return sorted((key, share.connections, share.requests)
                      for key, share in self._shares.items()
                      if share.connections or share.requests)

    # -- connections ------------------------------------------------------------------

    def admit_connection(self, key: str) -> Lease | str:
        """A Lease if `key` may open one more connection, else the refusal reason."""
        limits = self._limits
        self._operations += 1
        if self._operations % SWEEP_EVERY == 0:
            self._forget_idle()
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share()
        if limits.max_connections is not None and share.connections >= limits.max_connections:
            return CONNECTION_LIMIT
        if limits.connections_per_second is not None:
            now = self._clock()
            if share.bucket is None:
                share.bucket = TokenBucket(limits.connections_per_second, limits.burst, now)
            if share.bucket.take(now):
                self._forget(key, share)
                return CONNECTION_RATE
        share.connections += 1
        return Lease(self, key)

    def release_connection(self, key: str) -> None:
        share = self._shares.get(key)
        if share is not None and share.connections > 0:
            share.connections -= 1
            self._forget(key, share)

    # -- requests -----------------------------------------------------------------------

    def begin_request(self, key: str) -> bool:
        """May `key` have one more request in flight?  True: counted; end_request later."""
        limit = self._limits.max_requests
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share()
        if limit is not None and share.requests >= limit:
            return False
        share.requests += 1
        return True

    def end_request(self, key: str) -> None:
        share = self._shares.get(key)
        if share is not None and share.requests > 0:
            share.requests -= 1
            self._forget(key, share)

    # -- memory -----------------------------------------------------------------------

    def _forget(self, key: str, share: _Share) -> None:
        """A source holding nothing whose bucket would be full again needs no entry (keys
        such as client addresses must not pile up)."""
        if share.connections or share.requests:
            return
        bucket = share.bucket
        if bucket is None or bucket.full(self._clock()):
            del self._shares[key]

    def _forget_idle(self) -> None:
        for key, share in list(self._shares.items()):
            self._forget(key, share)


class RefusalLog:
    """Refusals can come thousands a second from one source: one warning per (source,
    reason) at most every `interval` seconds, saying how many it stands for."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY_SECONDS,
                 clock: Clock = time.monotonic):
        self._limiter = LogLimiter(logger, interval, clock)

    def refused(self, source: str, reason: str, what: str) -> bool:
        """Log this refusal (True) or count it into the next warning (False)."""
        return self._limiter.warn((source, reason), "%s refused (%s) from %s", what, reason,
                                  source)

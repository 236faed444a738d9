"""Local rate limits: token buckets for route rules and destination workloads.

A bucket holds ``burst`` tokens (default: one second's worth), starts full and refills
continuously at ``requestsPerSecond``; each request takes one token or is refused.  So
over any window of T seconds at most ``burst + requestsPerSecond * T`` requests pass, and
a client that keeps sending gets that many exactly.  The buckets are this node proxy's
own (as Envoy's local rate limit is per instance): N proxies admit up to N times the
limit in all.

With ``perSourceIdentity`` each source principal gets its own bucket.  The buckets live
in a map bounded at ``MAX_KEYS`` entries, least recently used evicted first; a bucket
idle for ``burst / rate`` seconds is full again, so evicting it loses nothing.

Buckets survive a configuration change when their rule or workload keeps the same limit
(``Limiters`` carries them over by key): pod churn does not refill them.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from nodeproxy.config.model import NodeConfig, RateLimit
from nodeproxy.tcp.token_bucket import TokenBucket

# Per-identity buckets kept per limit; past it the least recently used goes.
MAX_KEYS = 10_000

Clock = Callable[[], float]


class Limiter:
    """One configured limit: a single bucket, or one per source identity."""

    def __init__(self, config: RateLimit, clock: Clock = time.monotonic,
                 max_keys: int = MAX_KEYS):
        self.config = config
        self._clock = clock
        self._rate = config.requests_per_second
        self._capacity = config.burst if config.burst is not None \
            else max(1, math.ceil(config.requests_per_second))
        self._max_keys = max_keys
        self._shared: TokenBucket | None = None
        self._keyed: OrderedDict[str, TokenBucket] | None = None
        if config.per_source_identity:
            self._keyed = OrderedDict()
        else:
            self._shared = TokenBucket(self._rate, self._capacity, clock())

    @property
    def capacity(self) -> int:
        return self._capacity

    def take(self, principal: str | None) -> float:
        """0.0: admitted; otherwise refused, and the seconds until a token is there."""
        now = self._clock()
        if self._shared is not None:
            return self._shared.take(now)
        assert self._keyed is not None
        key = principal or ""
        bucket = self._keyed.get(key)
        if bucket is None:
            if len(self._keyed) >= self._max_keys:
                self._keyed.popitem(last=False)
            bucket = self._keyed[key] = TokenBucket(self._rate, self._capacity, now)
        else:
            self._keyed.move_to_end(key)
        return bucket.take(now)


def retry_after(wait: float) -> str:
    """The Retry-After value for a refusal: whole seconds until a token, at least 1."""
    return str(max(1, math.ceil(wait)))


class Limiters:
    """Every limiter of one configuration, keyed so the next one can keep their buckets."""

    def __init__(self, previous: Limiters | None = None, clock: Clock = time.monotonic):
        self._clock = clock
        self._previous = previous._by_key if previous is not None else {}
        self._by_key: dict[str, Limiter] = {}

    def get(self, key: str, config: RateLimit) -> Limiter:
        """The limiter for key: the previous configuration's if its limit is unchanged."""
        limiter = self._by_key.get(key) or self._previous.get(key)
        if limiter is None or limiter.config != config:
            limiter = Limiter(config, self._clock)
        self._by_key[key] = limiter
        return limiter

    def workloads(self, config: NodeConfig) -> dict[tuple[str, str], Limiter]:
        """(namespace, name) -> limiter, for the workloads with a rateLimit."""
        return {(w.namespace, w.name): self.get(f"workload/{w.key}", w.rate_limit)
                for w in config.workloads if w.rate_limit is not None}

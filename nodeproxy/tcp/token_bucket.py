"""A token bucket: ``rate`` tokens a second, at most ``capacity`` saved up, full at the start.

The one bucket of the request rate limits (http/rate_limit.py) and of each source's
connection rate (tcp/fairshare.py).  No I/O; the caller passes the time.
"""

from __future__ import annotations

# A whole token, less the rounding error of summing many small refills.
_ONE = 1.0 - 1e-9


class TokenBucket:
    """One bucket: ``take`` spends a token or says how long until one is there."""

    __slots__ = ("_capacity", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, capacity: int, now: float):
        self._rate = rate
        self._capacity = float(capacity)
        self._tokens = float(capacity)
        self._stamp = now

    def take(self, now: float) -> float:
        """0.0: a token was taken; otherwise the seconds until the next token."""
        tokens = self._tokens + (now - self._stamp) * self._rate
        if tokens > self._capacity:
            tokens = self._capacity
        self._stamp = now
        if tokens >= _ONE:
            self._tokens = max(tokens - 1.0, 0.0)
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate

    def full(self, now: float) -> bool:
        """Would the bucket be full at `now` (so a fresh one would be the same)?"""
        return self._tokens + (now - self._stamp) * self._rate >= self._capacity

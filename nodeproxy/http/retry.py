"""Retry decisions: whether a failed attempt may be tried again, how long to wait first,
and the budget that caps retries relative to original requests.

This module owns the meaning of ``RetryPolicy.retry_on`` (Envoy's ``retry_on`` names), the
idempotency rule, the backoff delay (exponential with full jitter) and ``RetryBudget``
(Linkerd's budget).  Counting attempts against ``RetryPolicy.attempts``, timeouts and
picking another endpoint are the router's (attempts.py decides, router.py acts).  No
I/O; time comes from an injectable clock.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Final

from nodeproxy.config import model

# RFC 9110 9.2.2: methods whose intended effect is the same however often they are sent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Envoy's gRPC retry_on names and the grpc-status codes they stand for.
GRPC_RETRY_ON: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

# Envoy response flags of an attempt that got no response.
CONNECT_FAILURE = "UF"  # no connection to the endpoint
CONNECTION_TERMINATED = "UC"  # the connection or stream was reset or closed before a response
PER_TRY_TIMEOUT = "UT"  # the attempt's own timeout ran out
FLAGS = frozenset({CONNECT_FAILURE, CONNECTION_TERMINATED, PER_TRY_TIMEOUT})

_GATEWAY_ERRORS = frozenset({502, 503, 504})


def should_retry(policy: model.RetryPolicy, method: str, *, flag: str | None,
                 refused_stream: bool, status: int | None, grpc_status: int | None) -> bool:
    """Whether the failed attempt's outcome matches one of ``policy.retry_on``.

    The outcome is either no response -- ``flag`` is ``"UF"``, ``"UC"`` or ``"UT"``
    (any other flag is a ValueError), and ``refused_stream`` is set if the upstream
    reset the HTTP/2 stream with REFUSED_STREAM (which also counts as no response, flag
    or not) -- or a response with ``status`` and, for gRPC, the ``grpc_status`` of its
    headers (a trailers-only response; Envoy ignores grpc-status in trailers too).

    The names mean what Envoy's router documentation says (x-envoy-retry-on,
    x-envoy-retry-grpc-on):

    ======================  =================================================
    connect-failure         flag UF
    refused-stream          refused_stream
    reset                   no response at all: UF, UC, UT or refused_stream
                            ("disconnect/reset/read timeout")
    5xx                     no response at all, or any status 500-599
                            ("includes connect-failure and refused-stream")
    gateway-error           no response at all, or status 502, 503, 504 (Envoy:
                            "like 5xx, only requests that result in 502, 503 or
                            504"; a proxy answers a missing response with 503,
                            or 504 after a per-try timeout, so these count)
    retriable-status-codes  status in ``policy.status_codes``
    cancelled ... unavailable  grpc_status equals the code (GRPC_RETRY_ON)
    ======================  =================================================

    A method outside IDEMPOTENT_METHODS (POST, PATCH, CONNECT, ...) is retried only if
    ``policy.non_idempotent`` is set, or when the upstream cannot have seen the request:
    a connect failure (UF) or a refused stream, under connect-failure / refused-stream.
    Nothing is retried if ``policy.attempts`` is 0; counting attempts beyond that is the caller's.
    """
    if flag is not None and flag not in FLAGS:
        raise ValueError(f"unknown response flag {flag!r}")
    if policy.attempts == 0:
        return False
    if method not in IDEMPOTENT_METHODS and not policy.non_idempotent:
        unseen = ("connect-failure" in policy.retry_on and flag == CONNECT_FAILURE) or (
            "refused-stream" in policy.retry_on and refused_stream)
        return unseen
    no_response = flag is not None or refused_stream
    for name in policy.retry_on:
        if name == "connect-failure":
            hit = flag == CONNECT_FAILURE
        elif name == "refused-stream":
            hit = refused_stream
        elif name == "reset":
            hit = no_response
        elif name == "5xx":
            hit = no_response or (status is not None and 500 <= status <= 599)
        elif name == "gateway-error":
            hit = no_response or status in _GATEWAY_ERRORS
        elif name == "retriable-status-codes":
            hit = status is not None and status in policy.status_codes
        else:
            hit = grpc_status is not None and grpc_status == GRPC_RETRY_ON[name]
        if hit:
            return True
    return False


def backoff_delay(retry_number: int, backoff: model.RetryBackoff, rng: random.Random) -> float:
    """Seconds to wait before retry ``retry_number`` (1 for the first retry): exponential
    backoff with full jitter, uniform in [0, min(max_seconds, base_seconds * 2**(n-1)))."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    # Past 2**64 the cap has long been reached; this also keeps the float in range.
    exponent = min(retry_number - 1, 64)
    bound = min(backoff.max_seconds, backoff.base_seconds * math.ldexp(1.0, exponent))
    return rng.uniform(0.0, bound)


class RetryBudget:
    """Caps retries at a share of recent original requests plus a floor per second.

    Every original request calls ``record_request()``; every retry asks
    ``try_retry()`` first and is sent only if it returns True.  A retry is admitted if,
    counting it, the retries in the window stay at or below

        ratio * (original requests in the window) + min_retries_per_second * window_seconds

    (Linkerd's retry budget: retryRatio, minRetriesPerSecond, ttl).  Retries are not
    original requests: they never earn budget themselves, so a failing service sees at
    most (1 + ratio) times its offered load plus the floor.  A refused retry counts in
    ``exhausted``.

    The window is ``BUCKETS`` buckets of ``window_seconds / BUCKETS`` each, on the clock's
    time axis; an event is forgotten when its bucket falls out of the window, i.e. after
    between 0.9 and 1.0 times ``window_seconds`` (10 buckets).  Recording and asking are
    O(1): totals are kept as buckets enter and leave.
    """

    BUCKETS: Final = 10

    def __init__(self, cfg: model.RetryBudgetSettings, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = cfg
        self.ratio = cfg.ratio
        self.window_seconds = cfg.window_seconds
        self.reserve = cfg.min_retries_per_second * cfg.window_seconds
        self._width = cfg.window_seconds / self.BUCKETS
        self._clock = clock
        self._requests = [0] * self.BUCKETS
        self._retries = [0] * self.BUCKETS
        self._epoch = self._epoch_of(clock())  # index of the newest bucket
        self._request_total = 0
        self._retry_total = 0
        self.exhausted = 0  # retries refused, ever

    def _epoch_of(self, now: float) -> int:
        return math.floor(now / self._width)

    def _advance(self) -> int:
        """Drops buckets that left the window; returns the slot of the current bucket."""
        epoch = math.floor(self._clock() / self._width)  # _epoch_of, inline (per request)
        if epoch > self._epoch:
            if epoch - self._epoch >= self.BUCKETS:
                self._requests = [0] * self.BUCKETS
                self._retries = [0] * self.BUCKETS
                self._request_total = self._retry_total = 0
            else:
                for e in range(self._epoch + 1, epoch + 1):
                    slot = e % self.BUCKETS
                    self._request_total -= self._requests[slot]
                    self._retry_total -= self._retries[slot]
                    self._requests[slot] = self._retries[slot] = 0
            self._epoch = epoch
        # A clock that steps back keeps counting into the newest bucket.
        return self._epoch % self.BUCKETS

    def record_request(self) -> None:
        """One original request (not a retry) was sent."""
        slot = self._advance()
        self._requests[slot] += 1
        self._request_total += 1

    @property
    def requests_in_window(self) -> int:
        """Original requests recorded in the window as of now."""
        self._advance()
        return self._request_total

    @property
    def retries_in_window(self) -> int:
        """Retries admitted in the window as of now."""
        self._advance()
        return self._retry_total

    def allowance(self) -> float:
        """Retries the window allows in all (spent ones included)."""
        self._advance()
        return self.ratio * self._request_total + self.reserve

    def has_room(self) -> bool:
        """Would ``try_retry()`` admit a retry now?  (Withdraws nothing.)"""
        self._advance()
        allowed = self.ratio * self._request_total + self.reserve
        # The epsilon keeps float rounding (0.7 * 100 < 70) from refusing the last retry.
        return self._retry_total + 1 <= allowed + 1e-9

    def try_retry(self) -> bool:
        """Withdraws one retry from the budget; False (and ``exhausted`` += 1) if empty."""
        if not self.has_room():
            self.exhausted += 1
            return False
        slot = self._epoch % self.BUCKETS
        self._retries[slot] += 1
        self._retry_total += 1
        return True

    def snapshot(self) -> dict[str, float | int]:
        """For /clusters: the window's requests and retries, and refusals so far."""
        return {"requests_in_window": self.requests_in_window,
                "retries_in_window": self.retries_in_window,
                "allowance": round(self.allowance(), 1), "exhausted": self.exhausted}

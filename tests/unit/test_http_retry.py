"""Retry conditions (Envoy's retry_on names), full-jitter backoff and the retry budget."""

from __future__ import annotations

import random
import statistics

import pytest

from nodeproxy.config import model
from nodeproxy.http.retry import (
    GRPC_RETRY_ON,
    IDEMPOTENT_METHODS,
    RetryBudget,
    backoff_delay,
    should_retry,
)


class FakeClock:
    def __init__(self, now: float = 500.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(*on: str, codes: tuple[int, ...] = (503,), non_idempotent: bool = False,
           attempts: int = 2) -> model.RetryPolicy:
    return model.RetryPolicy(retry_on=list(on), status_codes=list(codes),
                             non_idempotent=non_idempotent, attempts=attempts)


# One failed attempt per row: (flag, refused_stream, status, grpc_status).
OUTCOMES = {
    "connect failure": ("UF", False, None, None),
    "reset": ("UC", False, None, None),
    "refused stream": ("UC", True, None, None),
    "refused stream, no flag": (None, True, None, None),
    "per-try timeout": ("UT", False, None, None),
    "500": (None, False, 500, None),
    "501": (None, False, 501, None),
    "502": (None, False, 502, None),
    "503": (None, False, 503, None),
    "504": (None, False, 504, None),
    "599": (None, False, 599, None),
    "409": (None, False, 409, None),
    "429": (None, False, 429, None),
    "200": (None, False, 200, None),
    "grpc cancelled": (None, False, 200, 1),
    "grpc deadline-exceeded": (None, False, 200, 4),
    "grpc resource-exhausted": (None, False, 200, 8),
    "grpc internal": (None, False, 200, 13),
    "grpc unavailable": (None, False, 200, 14),
    "grpc unknown": (None, False, 200, 2),
    "grpc ok": (None, False, 200, 0),
}

NO_RESPONSE = {"connect failure", "reset", "refused stream", "refused stream, no flag",
               "per-try timeout"}

# For each retry_on name, exactly the outcomes it retries.
EXPECTED = {
    "connect-failure": {"connect failure"},
    "refused-stream": {"refused stream", "refused stream, no flag"},
    "reset": NO_RESPONSE,
    "5xx": NO_RESPONSE | {"500", "501", "502", "503", "504", "599"},
    "gateway-error": NO_RESPONSE | {"502", "503", "504"},
    "retriable-status-codes": {"503"},  # status_codes defaults to [503]
    "cancelled": {"grpc cancelled"},
    "deadline-exceeded": {"grpc deadline-exceeded"},
    "resource-exhausted": {"grpc resource-exhausted"},
    "internal": {"grpc internal"},
    "unavailable": {"grpc unavailable"},
}


def retries(p: model.RetryPolicy, outcome: str, method: str = "GET") -> bool:
    flag, refused, status, grpc = OUTCOMES[outcome]
    return should_retry(p, method, flag=flag, refused_stream=refused, status=status,
                        grpc_status=grpc)


def test_every_retry_on_name_has_a_row():
    assert set(EXPECTED) == set(model.RetryOn.__args__)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_retry_on_name_retries_exactly_its_outcomes(name):
    p = policy(name)
    got = {outcome for outcome in OUTCOMES if retries(p, outcome)}
    assert got == EXPECTED[name]


def test_retriable_status_codes_uses_the_policys_list():
    p = policy("retriable-status-codes", codes=(409, 429))
    assert retries(p, "409") and retries(p, "429")
    assert not retries(p, "503") and not retries(p, "reset")


def test_names_combine_as_a_union():
    p = policy("connect-failure", "retriable-status-codes", "unavailable", codes=(502,))
    got = {outcome for outcome in OUTCOMES if retries(p, outcome)}
    assert got == {"connect failure", "502", "grpc unavailable"}


def test_istio_default_policy():
    p = model.RetryPolicy()  # connect-failure, refused-stream, unavailable, cancelled, 503
    got = {outcome for outcome in OUTCOMES if retries(p, outcome)}
    assert got == {"connect failure", "refused stream", "refused stream, no flag", "503",
                   "grpc cancelled", "grpc unavailable"}


def test_no_retry_on_names_retries_nothing():
    p = policy()
    assert not any(retries(p, outcome) for outcome in OUTCOMES)


def test_zero_attempts_retries_nothing():
    p = policy(*EXPECTED, attempts=0)
    assert not any(retries(p, outcome) for outcome in OUTCOMES)


def test_idempotent_methods_are_rfc_9110s():
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}
    assert GRPC_RETRY_ON == {"cancelled": 1, "deadline-exceeded": 4,
                             "resource-exhausted": 8, "internal": 13, "unavailable": 14}


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods_are_retried(method):
    assert retries(policy("5xx"), "503", method)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "get"])
def test_non_idempotent_methods_are_retried_only_if_configured(method):
    refused = policy(*EXPECTED)
    # Only outcomes where the upstream cannot have seen the request are retried.
    unseen = {"connect failure", "refused stream", "refused stream, no flag"}
    assert {o for o in OUTCOMES if retries(refused, o, method)} == unseen
    allowed = policy("5xx", non_idempotent=True)
    assert retries(allowed, "503", method)
    assert retries(allowed, "connect failure", method)
    assert not retries(allowed, "409", method)


def test_an_unknown_flag_is_an_error():
    with pytest.raises(ValueError):
        should_retry(policy("5xx"), "GET", flag="UO", refused_stream=False, status=None,
                     grpc_status=None)


# Backoff


def test_backoff_never_exceeds_the_exponential_bound_or_the_cap():
    backoff = model.RetryBackoff(base_seconds=0.025, max_seconds=0.25)
    rng = random.Random(1)
    for n, bound in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (6, 0.25),
                     (40, 0.25), (5000, 0.25)]:
        delays = [backoff_delay(n, backoff, rng) for _ in range(2000)]
        assert all(0.0 <= d <= bound for d in delays)
        # Full jitter: the whole range is used, mean about half the bound.
        assert max(delays) > 0.95 * bound and min(delays) < 0.05 * bound
        assert statistics.fmean(delays) == pytest.approx(bound / 2, rel=0.06)


def test_backoff_is_reproducible_with_a_seeded_rng():
    backoff = model.RetryBackoff()
    a = [backoff_delay(n, backoff, random.Random(9)) for n in range(1, 6)]
    b = [backoff_delay(n, backoff, random.Random(9)) for n in range(1, 6)]
    assert a == b


def test_backoff_counts_retries_from_one():
    with pytest.raises(ValueError):
        backoff_delay(0, model.RetryBackoff(), random.Random())


# Budget


def budget(clock: FakeClock, ratio: float = 0.2, per_second: float = 0.0,
           window: float = 10.0) -> RetryBudget:
    cfg = model.RetryBudgetSettings(ratio=ratio, min_retries_per_second=per_second,
                            window_seconds=window)
    return RetryBudget(cfg, clock=clock)


def drain(b: RetryBudget, limit: int = 100000) -> int:
    """Retries admitted until the first refusal."""
    for admitted in range(limit):
        if not b.try_retry():
            return admitted
    raise AssertionError("budget never ran out")


def test_budget_admits_the_ratio_of_requests_plus_the_minimum_then_refuses():
    clock = FakeClock()
    b = budget(clock, ratio=0.2, per_second=10.0, window=10.0)
    for _ in range(1000):
        b.record_request()
    assert drain(b) == 200 + 100  # 20% of 1000, plus 10/s for 10 s
    assert b.exhausted == 1
    assert not b.try_retry()
    assert b.exhausted == 2
    # Each further original request earns a fifth of a retry.
    for _ in range(5):
        b.record_request()
    assert b.try_retry()
    assert not b.try_retry()


def test_budget_ratio_alone():
    clock = FakeClock()
    b = budget(clock, ratio=0.2)
    assert not b.try_retry()  # no requests, no minimum: nothing
    for _ in range(100):
        b.record_request()
    assert drain(b) == 20


def test_budget_minimum_alone_without_traffic():
    clock = FakeClock()
    b = budget(clock, ratio=0.2, per_second=10.0, window=10.0)
    assert drain(b) == 100


def test_budget_float_ratios_do_not_lose_the_last_retry():
    clock = FakeClock()
    b = budget(clock, ratio=0.07)  # 0.07 * 100 is 7.000000000000001
    for _ in range(100):
        b.record_request()
    assert drain(b) == 7
    b = budget(clock, ratio=0.29)  # 0.29 * 100 is 28.999999999999996
    for _ in range(100):
        b.record_request()
    assert drain(b) == 29


def test_budget_refills_as_the_window_slides():
    clock = FakeClock(0.0)
    b = budget(clock, ratio=0.2, window=10.0)
    for _ in range(100):
        b.record_request()
    assert drain(b) == 20
    # 5 s later: the same requests and retries are still in the window.
    clock.now = 5.0
    assert not b.try_retry()
    for _ in range(50):
        b.record_request()
    assert drain(b) == 10  # only the new requests' share
    # 10 s after the first burst it left the window, its retries with it.
    clock.now = 10.0
    assert b.requests_in_window == 50 and b.retries_in_window == 10
    assert not b.try_retry()  # 10 retries against 50 requests: spent
    for _ in range(50):
        b.record_request()
    assert drain(b) == 10
    # Long idle: everything is forgotten.
    clock.now = 1000.0
    assert b.requests_in_window == 0 and b.retries_in_window == 0
    for _ in range(10):
        b.record_request()
    assert drain(b) == 2


def test_budget_window_is_bucketed_at_a_tenth():
    clock = FakeClock(0.0)
    b = budget(clock, ratio=1.0, window=10.0)
    b.record_request()  # in bucket [0, 1)
    clock.now = 9.99
    assert b.requests_in_window == 1
    clock.now = 10.0  # the bucket [0, 1) left the window
    b.record_request()
    assert b.requests_in_window == 1


def test_budget_sustained_load_admits_the_ratio():
    clock = FakeClock(0.0)
    b = budget(clock, ratio=0.2, per_second=1.0, window=10.0)
    admitted = 0
    # 100 requests/s for 60 s, each failing and wanting a retry.
    for tick in range(6000):
        clock.now = tick / 100
        b.record_request()
        admitted += b.try_retry()
    # 20% of requests plus about 1/s (the window slides, so close to it).
    assert 0.2 * 6000 + 40 <= admitted <= 0.2 * 6000 + 70
    assert b.exhausted == 6000 - admitted


def test_budget_tolerates_a_clock_stepping_back():
    clock = FakeClock(100.0)
    b = budget(clock, ratio=1.0)
    b.record_request()
    clock.now = 50.0
    b.record_request()
    assert b.requests_in_window == 2
    assert b.allowance() == 2.0

"""Local rate limits and fault injection: the token bucket's arithmetic on a fake clock,
per-identity buckets, buckets kept across configurations, and the fault draws."""

from __future__ import annotations

import random
import textwrap

import pytest

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import FaultInjection, RateLimit
from nodeproxy.http.fault import Fault
from nodeproxy.http.rate_limit import Limiter, Limiters, retry_after
from nodeproxy.http.routes import Routes
from nodeproxy.tcp.token_bucket import TokenBucket
from tests.unit.test_config import VALID


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limit(rps: float, burst: int | None = None, per_identity: bool = False) -> RateLimit:
    return RateLimit(requests_per_second=rps, burst=burst, per_source_identity=per_identity)


def test_a_full_bucket_admits_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=5.0, capacity=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.2)  # one token in 1/5 s
    assert bucket.take(0.1) == pytest.approx(0.1)
    assert bucket.take(0.2) == 0.0
    assert bucket.take(0.2) == pytest.approx(0.2)
    # A long quiet spell refills to the capacity, not beyond.
    assert sum(bucket.take(1000.0) == 0.0 for _ in range(20)) == 5


@pytest.mark.parametrize("rps,burst,seconds", [(5, 5, 3.0), (10, 1, 2.0), (0.5, 2, 10.0),
                                                (100, 20, 1.5)])
def test_admits_rate_times_window_plus_burst(rps: float, burst: int, seconds: float) -> None:
    """Hammered every millisecond for a window of T s, exactly floor(burst + rps*T)
    requests pass (the first at t=0 finds the bucket full)."""
    clock = FakeClock()
    limiter = Limiter(limit(rps, burst), clock)
    start = clock.now
    admitted = 0
    for step in range(int(seconds * 1000) + 1):
        clock.now = start + step / 1000
        admitted += limiter.take("a") == 0.0
    assert admitted == int(burst + rps * seconds + 1e-9)


def test_default_burst_is_one_seconds_worth() -> None:
    assert Limiter(limit(7.5)).capacity == 8
    assert Limiter(limit(0.2)).capacity == 1


def test_per_source_identity_buckets_are_separate_and_bounded() -> None:
    clock = FakeClock()
    limiter = Limiter(limit(1, 2, per_identity=True), clock, max_keys=2)
    assert [limiter.take("a") == 0 for _ in range(3)] == [True, True, False]
    assert [limiter.take("b") == 0 for _ in range(3)] == [True, True, False]
    assert limiter.take("a") > 0  # a's bucket is still spent
    limiter.take("c")  # evicts b, the least recently used
    assert limiter.take("b") == 0.0  # a new, full bucket


def test_shared_bucket_ignores_the_identity() -> None:
    limiter = Limiter(limit(1, 2), FakeClock())
    assert [limiter.take(p) == 0 for p in ("a", "b", "c")] == [True, True, False]


@pytest.mark.parametrize("wait,header", [(0.01, "1"), (1.0, "1"), (1.2, "2"), (9.99, "10")])
def test_retry_after_rounds_up_to_whole_seconds(wait: float, header: str) -> None:
    assert retry_after(wait) == header


ROUTED = VALID + textwrap.dedent("""\
    httpRoutes:
      - name: web
        namespace: shop
        service: web
        rules:
          - rateLimit: {requestsPerSecond: 1, burst: 1}
    """)


def test_buckets_survive_a_new_configuration_with_the_same_limit() -> None:
    config = parse_config(ROUTED, "node.yaml").config
    first = Limiters()
    rule = Routes(config, first).table("shop/web", 80).match(
        RequestHead("GET", "/", "web", []))
    assert rule is not None and rule.rate_limit is not None
    assert rule.rate_limit.take(None) == 0.0
    again = Routes(config, Limiters(first)).table("shop/web", 80).match(
        RequestHead("GET", "/", "web", []))
    assert again is not None and again.rate_limit is rule.rate_limit
    assert again.rate_limit.take(None) > 0  # still spent
    changed = parse_config(ROUTED.replace("burst: 1", "burst: 2"), "node.yaml").config
    fresh = Routes(changed, Limiters(first)).table("shop/web", 80).match(
        RequestHead("GET", "/", "web", []))
    assert fresh is not None and fresh.rate_limit is not rule.rate_limit


def test_an_unlimited_rule_has_no_limiter_or_fault() -> None:
    config = parse_config(VALID, "node.yaml").config
    rule = Routes(config).table("shop/web", 80).match(RequestHead("GET", "/", "web", []))
    assert rule is not None and rule.rate_limit is None and rule.fault is None


def test_workload_limits_by_namespace_and_name() -> None:
    text = VALID.replace("    labels: {app: web}\n",
                         "    labels: {app: web}\n    rateLimit: {requestsPerSecond: 3}\n")
    limits = Limiters().workloads(parse_config(text, "node.yaml").config)
    assert list(limits) == [("shop", "web")] and limits[("shop", "web")].capacity == 3


# --- faults -----------------------------------------------------------------------------


def head(*headers: tuple[str, str], grpc: bool = False) -> RequestHead:
    extra = [("content-type", "application/grpc")] if grpc else []
    return RequestHead("POST" if grpc else "GET", "/", "web", [*headers, *extra])


def fault(spec: dict[str, object]) -> Fault:
    return Fault(FaultInjection.model_validate(spec))


def test_abort_share_is_within_four_standard_deviations() -> None:
    f = fault({"abort": {"httpStatus": 503, "percentage": 30}})
    rng = random.Random(7)
    n = 10_000
    hits = sum(f.abort(head(), rng) is not None for _ in range(n))
    assert abs(hits - 0.3 * n) < 4 * (n * 0.3 * 0.7) ** 0.5
    abort = f.abort(head(), random.Random(1)) or f.abort(head(), random.Random(2))
    assert abort is not None and (abort.http_status, abort.grpc_code) == (503, None)


def test_delay_share_and_length() -> None:
    f = fault({"delay": {"fixedDelaySeconds": 0.25, "percentage": 10}})
    rng = random.Random(3)
    delays = [f.delay(rng) for _ in range(10_000)]
    assert set(delays) == {0.0, 0.25}
    assert abs(delays.count(0.25) - 1000) < 4 * (10_000 * 0.1 * 0.9) ** 0.5
    assert f.abort(head(), rng) is None


def test_zero_and_hundred_percent_are_exact() -> None:
    rng = random.Random(5)
    never = fault({"abort": {"httpStatus": 500, "percentage": 0}})
    always = fault({"delay": {"fixedDelaySeconds": 1}, "abort": {"httpStatus": 500}})
    assert all(never.abort(head(), rng) is None for _ in range(1000))
    assert all(always.abort(head(), rng) is not None for _ in range(1000))
    assert all(always.delay(rng) == 1.0 for _ in range(1000))


def test_header_gated_fault_needs_every_header() -> None:
    f = fault({"abort": {"httpStatus": 500},
               "headers": [{"name": "x-fault", "value": "yes"},
                           {"name": "x-user", "type": "RegularExpression", "value": "t.*"}]})
    assert not f.eligible(head())
    assert not f.eligible(head(("x-fault", "yes")))
    assert not f.eligible(head(("x-fault", "no"), ("x-user", "tom")))
    assert f.eligible(head(("x-fault", "yes"), ("x-user", "tom")))


def test_grpc_status_aborts_only_grpc_requests() -> None:
    f = fault({"abort": {"grpcStatus": "UNAVAILABLE"}})
    rng = random.Random(0)
    assert f.abort(head(), rng) is None
    abort = f.abort(head(grpc=True), rng)
    assert abort is not None and abort.grpc_code == 14

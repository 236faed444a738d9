"""Endpoint choice: peak-EWMA statistics and the five balancers (no I/O, fake clocks)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from nodeproxy.config.model import LoadBalancer
from nodeproxy.http.balancer import (
    DEFAULT_EWMA_SECONDS,
    EndpointStats,
    LeastRequest,
    PeakEwma,
    Random,
    RingHash,
    RoundRobin,
    make_balancer,
)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Ep:
    key: str
    stats: EndpointStats = field(default_factory=EndpointStats, compare=False)


def endpoints(n: int, clock: FakeClock | None = None) -> list[Ep]:
    clock = clock or FakeClock()
    return [Ep(f"10.0.0.{i}:80", EndpointStats(clock=clock)) for i in range(1, n + 1)]


def sample(stats: EndpointStats, clock: FakeClock, seconds: float, ok: bool = True) -> None:
    started = stats.begin()
    clock.now += seconds
    stats.end(started, ok)


# EndpointStats


def test_new_endpoint_starts_at_the_default_estimate():
    clock = FakeClock()
    stats = EndpointStats(clock=clock)
    assert stats.ewma_seconds == DEFAULT_EWMA_SECONDS == 0.030
    assert stats.cost() == pytest.approx(0.030)
    assert stats.snapshot() == {"active": 0, "ewma_ms": 30.0, "requests": 0, "failures": 0}


def test_begin_and_end_count_active_requests_and_failures():
    clock = FakeClock()
    stats = EndpointStats(clock=clock)
    a = stats.begin()
    b = stats.begin()
    assert a == b == clock.now
    assert stats.active == 2 and stats.requests == 2
    assert stats.cost() == pytest.approx(0.030 * 3)
    stats.end(a, ok=True)
    stats.end(b, ok=False)
    assert stats.active == 0 and stats.requests == 2 and stats.failures == 1
    stats.end(a, ok=True)  # an extra end never drives active below zero
    assert stats.active == 0


def test_a_sample_above_the_average_replaces_it_at_once():
    clock = FakeClock()
    stats = EndpointStats(clock=clock)
    clock.now += 5.0
    sample(stats, clock, 0.800)
    assert stats.ewma_seconds == pytest.approx(0.800)
    assert stats.snapshot()["ewma_ms"] == 800.0


def test_a_sample_below_the_average_is_blended_with_the_time_weight():
    clock = FakeClock()
    stats = EndpointStats(clock=clock, ewma_seconds=0.100, tau=10.0)
    clock.now += 2.0
    sample(stats, clock, 0.010)  # 2.01 s after the previous sample (here: creation)
    w = math.exp(-2.01 / 10.0)
    assert stats.ewma_seconds == pytest.approx(0.100 * w + 0.010 * (1 - w))


def test_latency_average_follows_faster_samples_with_time_constant_tau():
    clock = FakeClock()
    stats = EndpointStats(clock=clock, tau=10.0)
    sample(stats, clock, 1.0)  # spike: 1 s at once
    assert stats.ewma_seconds == pytest.approx(1.0)
    # 10 ms responses, one every 100 ms, for one tau: the spike's weight is ~1/e.
    for _ in range(100):
        clock.now += 0.090
        sample(stats, clock, 0.010)
    expected = 0.010 + (1.0 - 0.010) * math.exp(-10.0 / 10.0)
    assert stats.ewma_seconds == pytest.approx(expected, rel=0.01)
    # Five tau more (six in all) and the spike's weight is e**-6: back near 10 ms.
    for _ in range(500):
        clock.now += 0.090
        sample(stats, clock, 0.010)
    expected = 0.010 + (1.0 - 0.010) * math.exp(-6.0)
    assert stats.ewma_seconds == pytest.approx(expected, rel=0.01)
    assert stats.ewma_seconds < 0.013


def test_decay_rate_does_not_depend_on_the_sample_rate():
    slow_clock, fast_clock = FakeClock(), FakeClock()
    slow = EndpointStats(clock=slow_clock, ewma_seconds=0.5)
    fast = EndpointStats(clock=fast_clock, ewma_seconds=0.5)
    for _ in range(10):  # one 1 ms sample a second
        slow_clock.now += 0.999
        sample(slow, slow_clock, 0.001)
    for _ in range(1000):  # a hundred a second
        fast_clock.now += 0.009
        sample(fast, fast_clock, 0.001)
    # Both spent 10 s (one tau): the spike kept 1/e of its weight in either case.
    expected = 0.001 + (0.5 - 0.001) * math.exp(-1.0)
    assert slow.ewma_seconds == pytest.approx(expected)
    assert fast.ewma_seconds == pytest.approx(expected)


def test_a_fast_failure_does_not_lower_the_average_but_a_slow_one_raises_it():
    clock = FakeClock()
    stats = EndpointStats(clock=clock, ewma_seconds=0.100)
    clock.now += 30.0
    sample(stats, clock, 0.001, ok=False)  # connection refused in 1 ms
    assert stats.ewma_seconds == pytest.approx(0.100)
    sample(stats, clock, 2.0, ok=False)  # timed out after 2 s
    assert stats.ewma_seconds == pytest.approx(2.0)
    assert stats.failures == 2


def test_cost_decays_towards_zero_while_idle():
    clock = FakeClock()
    stats = EndpointStats(clock=clock, tau=10.0)
    sample(stats, clock, 1.0)
    assert stats.cost() == pytest.approx(1.0)
    clock.now += 10.0
    assert stats.cost() == pytest.approx(math.exp(-1.0))
    assert stats.ewma_seconds == pytest.approx(1.0)  # reading does not change the state


# Balancers


@pytest.mark.parametrize("balancer", [
    RoundRobin(random.Random(1)), Random(random.Random(1)), LeastRequest(random.Random(1)),
    PeakEwma(random.Random(1)), RingHash(random.Random(1)),
])
def test_a_single_candidate_is_always_picked(balancer):
    only = endpoints(1)
    for i in range(50):
        assert balancer.pick(only, hash_key=f"user-{i}") is only[0]
        assert balancer.pick(only) is only[0]


@pytest.mark.parametrize("balancer", [
    RoundRobin(), Random(), LeastRequest(), PeakEwma(), RingHash(),
])
def test_no_candidates_is_an_error(balancer):
    with pytest.raises(ValueError):
        balancer.pick([], hash_key="k")


def test_round_robin_is_even_and_cycles_in_order():
    eps = endpoints(4)
    rr = RoundRobin(random.Random(7))
    picks = [rr.pick(eps) for _ in range(400)]
    assert Counter(p.key for p in picks) == {e.key: 100 for e in eps}
    first = eps.index(picks[0])
    assert picks[:8] == [eps[(first + i) % 4] for i in range(8)]


def test_round_robin_instances_start_at_different_places():
    eps = endpoints(5)
    starts = {RoundRobin(random.Random(seed)).pick(eps).key for seed in range(40)}
    assert len(starts) > 1


def test_random_spreads_picks():
    eps = endpoints(4)
    rnd = Random(random.Random(3))
    counts = Counter(rnd.pick(eps).key for _ in range(8000))
    assert set(counts) == {e.key for e in eps}
    assert all(1600 < c < 2400 for c in counts.values())


def test_least_request_sends_most_picks_to_the_endpoint_with_fewer_active():
    eps = endpoints(3)
    eps[0].stats.active = 0
    eps[1].stats.active = 5
    eps[2].stats.active = 9
    lr = LeastRequest(random.Random(11))
    counts = Counter(lr.pick(eps).key for _ in range(3000))
    # P2C: the idle endpoint wins every pair it is drawn in (2 of 3 pairs).
    assert counts[eps[0].key] == pytest.approx(2000, rel=0.1)
    # and the busiest never wins a pair.
    assert counts[eps[2].key] == 0


def test_least_request_follows_load_as_requests_begin_and_end():
    eps = endpoints(2)
    lr = LeastRequest(random.Random(5))
    # Requests that never end: P2C over two keeps them balanced within one.
    for _ in range(101):
        lr.pick(eps).stats.begin()
    assert abs(eps[0].stats.active - eps[1].stats.active) <= 1


def test_peak_ewma_prefers_the_low_latency_endpoint():
    clock = FakeClock()
    eps = endpoints(3, clock)
    for _ in range(5):
        for ep, latency in zip(eps, (0.005, 0.050, 0.200), strict=True):
            sample(ep.stats, clock, latency)
    pe = PeakEwma(random.Random(2))
    counts = Counter(pe.pick(eps).key for _ in range(3000))
    assert counts[eps[0].key] == pytest.approx(2000, rel=0.1)
    assert counts[eps[2].key] == 0


def test_peak_ewma_weighs_latency_by_outstanding_requests():
    clock = FakeClock()
    fast = Ep("fast:80", EndpointStats(clock=clock, ewma_seconds=0.010))
    slow = Ep("slow:80", EndpointStats(clock=clock, ewma_seconds=0.040))
    pe = PeakEwma(random.Random(0))
    assert pe.pick([fast, slow]) is fast
    for _ in range(3):  # 10 ms * 4 = 40 ms: a tie
        fast.stats.begin()
    assert pe.pick([fast, slow]) in (fast, slow)
    fast.stats.begin()  # 10 ms * 5 > 40 ms * 1
    assert all(pe.pick([fast, slow]) is slow for _ in range(20))
    slow.stats.begin()  # 40 ms * 2 > 50 ms
    assert all(pe.pick([fast, slow]) is fast for _ in range(20))


def test_peak_ewma_reacts_to_a_spike_at_once_and_decays_back():
    clock = FakeClock()
    a, b = endpoints(2, clock)
    for _ in range(30):
        clock.now += 1.0
        sample(a.stats, clock, 0.010)
        sample(b.stats, clock, 0.020)
    pe = PeakEwma(random.Random(0))
    assert all(pe.pick([a, b]) is a for _ in range(20))
    sample(a.stats, clock, 0.500)  # one slow response from a
    assert a.stats.ewma_seconds == pytest.approx(0.500)
    assert all(pe.pick([a, b]) is b for _ in range(20))  # avoided from that response on
    # a is fast again: its average comes back below b's within a few tau (46 s here).
    for _ in range(200):
        clock.now += 0.2
        sample(a.stats, clock, 0.010)
        sample(b.stats, clock, 0.020)
    assert a.stats.ewma_seconds < 0.016
    assert all(pe.pick([a, b]) is a for _ in range(20))


def test_peak_ewma_tries_a_shunned_endpoint_again_after_a_while():
    clock = FakeClock()
    a = Ep("a:80", EndpointStats(clock=clock, ewma_seconds=0.020))
    b = Ep("b:80", EndpointStats(clock=clock, ewma_seconds=0.020))
    sample(b.stats, clock, 2.0)  # b spiked; it gets no samples while it is shunned
    pe = PeakEwma(random.Random(0))
    first_b = None
    for second in range(1, 121):
        clock.now += 1.0
        chosen = pe.pick([a, b])
        if chosen is b:
            first_b = second
            break
        sample(a.stats, clock, 0.020)  # a keeps answering in 20 ms
    # 2 s decays below 20 ms after ln(100) tau, about 46 s.
    assert first_b is not None and 40 <= first_b <= 50, first_b


KEYS = [f"user-{i}" for i in range(5000)]


def test_ring_hash_maps_the_same_key_to_the_same_endpoint():
    eps = endpoints(5)
    ring = RingHash(random.Random(0))
    first = {k: ring.pick(eps, k).key for k in KEYS[:500]}
    # Again, in another order and with another instance: the ring depends on keys only.
    other = RingHash(random.Random(99))
    shuffled = list(reversed(eps))
    assert all(other.pick(shuffled, k).key == first[k] for k in KEYS[:500])
    assert all(ring.pick(eps, k).key == first[k] for k in KEYS[:500])


def test_ring_hash_spreads_keys_roughly_evenly():
    eps = endpoints(5)
    ring = RingHash()
    counts = Counter(ring.pick(eps, k).key for k in KEYS)
    assert set(counts) == {e.key for e in eps}
    expected = len(KEYS) / len(eps)
    # 100 points per endpoint: shares within +-40% of even.
    assert all(0.6 * expected < c < 1.4 * expected for c in counts.values()), counts


def test_ring_hash_removing_an_endpoint_moves_only_its_keys():
    eps = endpoints(5)
    ring = RingHash()
    before = {k: ring.pick(eps, k).key for k in KEYS}
    gone = eps[2]
    after = {k: ring.pick(eps[:2] + eps[3:], k).key for k in KEYS}
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == gone.key}
    assert moved  # it did own some
    assert gone.key not in after.values()
    # Its keys spread over the others rather than all landing on one.
    assert len({after[k] for k in moved}) > 1


def test_ring_hash_adding_an_endpoint_takes_keys_only_onto_itself():
    eps = endpoints(5)
    ring = RingHash()
    before = {k: ring.pick(eps[:4], k).key for k in KEYS}
    after = {k: ring.pick(eps, k).key for k in KEYS}
    assert all(after[k] in (before[k], eps[4].key) for k in KEYS)


def test_ring_hash_without_a_key_picks_at_random():
    eps = endpoints(4)
    ring = RingHash(random.Random(4))
    counts = Counter(ring.pick(eps, None).key for _ in range(4000))
    assert set(counts) == {e.key for e in eps}
    assert all(700 < c < 1300 for c in counts.values())


def test_ring_hash_caches_rings_per_endpoint_set():
    eps = endpoints(4)
    ring = RingHash(virtual_nodes=10)
    ring.pick(eps, "a")
    ring.pick(list(reversed(eps)), "b")
    assert len(ring._rings) == 1
    ring.pick(eps[:3], "a")
    assert len(ring._rings) == 2
    for n in range(RingHash.CACHED_RINGS + 5):
        ring.pick(endpoints(n + 2), "a")
    assert len(ring._rings) == RingHash.CACHED_RINGS


@pytest.mark.parametrize(("cfg", "kind"), [
    (LoadBalancer(policy="ROUND_ROBIN"), RoundRobin),
    (LoadBalancer(policy="RANDOM"), Random),
    (LoadBalancer(policy="LEAST_REQUEST"), LeastRequest),
    (LoadBalancer(), PeakEwma),
    (LoadBalancer(policy="RING_HASH", hash_header="x-user"), RingHash),
    (LoadBalancer(policy="RING_HASH", hash_source_identity=True), RingHash),
])
def test_make_balancer_follows_the_policy(cfg, kind):
    balancer = make_balancer(cfg, random.Random(0))
    assert type(balancer) is kind
    eps = endpoints(3)
    assert balancer.pick(eps, "key") in eps


def test_untried_leaves_out_what_earlier_attempts_used_until_nothing_is_left():
    from nodeproxy.http.balancer import untried

    class C:
        def __init__(self, key: str):
            self.key = key
            self.stats = EndpointStats()

    a, b, c = C("a:1"), C("b:1"), C("c:1")
    assert untried([a, b, c], set()) == [a, b, c]
    assert untried([a, b, c], {"a:1"}) == [b, c]
    assert untried([a, b, c], {"a:1", "c:1", "gone:1"}) == [b]
    assert untried([a, b, c], {"a:1", "b:1", "c:1"}) == [a, b, c]

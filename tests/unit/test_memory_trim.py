"""The daemon's decision to give freed heap back to the kernel (nodeproxy.daemon.memory_trim):
after a burst of connections, once it is over; never in the middle of one; never without
glibc."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from nodeproxy.daemon import memory_trim
from nodeproxy.daemon.memory_trim import (
    MIN_CHURN,
    QUIET_CHURN,
    MemoryTrimmer,
    MemoryTrimMetrics,
    glibc_trim,
    trim_due,
)


def test_trim_due_only_after_start_up_and_after_a_burst_that_is_over() -> None:
    assert trim_due(0, 0, first=True)                  # what start-up left
    assert trim_due(0, 1000, first=True)
    assert not trim_due(0, 0)                          # nothing happened
    assert not trim_due(MIN_CHURN - 1, 0)              # too little came and went
    assert trim_due(MIN_CHURN, 0)                      # a burst, then quiet
    assert trim_due(MIN_CHURN, QUIET_CHURN)            # quiet enough
    assert not trim_due(10 * MIN_CHURN, QUIET_CHURN + 1)  # still in the burst


class FakeHeap:
    """A trim that gives back what it is told to (a pure stand-in for malloc_trim)."""

    def __init__(self) -> None:
        self.rss = 100 << 20
        self.trims = 0

    def trim(self) -> int:
        self.trims += 1
        self.rss -= 4 << 20
        return 1


def trimmer(heap: FakeHeap | None) -> tuple[MemoryTrimmer, MemoryTrimMetrics]:
    metrics = MemoryTrimMetrics(CollectorRegistry())
    if heap is None:
        return MemoryTrimmer(metrics, None), metrics
    return MemoryTrimmer(metrics, heap.trim, rss=lambda: heap.rss), metrics


def test_trims_once_per_burst_after_it_ends() -> None:
    heap = FakeHeap()
    t, metrics = trimmer(heap)
    churn = 0
    assert t.check(churn)              # the first check: after start-up
    heap.trims = 0
    metrics.trims._value.set(0)
    metrics.trimmed._value.set(0)
    for step in (300, 300, 300):       # a burst over three checks: never mid-burst
        churn += step
        assert not t.check(churn)
    assert t.check(churn)              # the first quiet check after it
    assert heap.trims == 1
    assert metrics.trims._value.get() == 1
    assert metrics.trimmed._value.get() == 4 << 20
    for _ in range(5):                 # quiet on: nothing new to give back
        churn += 1
        assert not t.check(churn)
    assert heap.trims == 1
    churn += MIN_CHURN                 # the next burst (say its connections closing)
    assert not t.check(churn)
    assert t.check(churn)
    assert heap.trims == 2


def test_a_slow_trickle_adds_up_to_a_trim() -> None:
    heap = FakeHeap()
    t, _ = trimmer(heap)
    assert t.check(0)
    churn, trimmed_at = 0, []
    for check in range(100):
        churn += QUIET_CHURN           # always quiet, but it adds up
        if t.check(churn):
            trimmed_at.append(check)
    assert trimmed_at and all(b - a >= MIN_CHURN // QUIET_CHURN - 1
                              for a, b in zip(trimmed_at, trimmed_at[1:], strict=False))


def test_no_malloc_trim_no_trims() -> None:
    t, metrics = trimmer(None)
    assert t.unavailable
    assert not t.check(10 * MIN_CHURN)
    assert not t.check(10 * MIN_CHURN)
    assert metrics.trims._value.get() == 0


def test_run_returns_at_once_when_off_or_unavailable() -> None:
    heap = FakeHeap()
    t, _ = trimmer(heap)

    async def main() -> None:
        await asyncio.wait_for(memory_trim.run(t, lambda: 10 * MIN_CHURN, 0.0), 1.0)
        await asyncio.wait_for(memory_trim.run(trimmer(None)[0], lambda: 0, 0.01), 1.0)

    asyncio.run(main())
    assert heap.trims == 0


def test_glibc_trim_here_returns_memory_and_does_not_fail() -> None:
    """This machine's libc is glibc: the real call works (and, called twice, is harmless)."""
    trim = glibc_trim()
    assert trim is not None
    blocks = [bytearray(4096) for _ in range(20000)]
    del blocks
    assert trim() in (0, 1)
    assert trim() in (0, 1)


def test_the_sleeps_after_a_burst_of_connections_get_a_trim_of_their_own() -> None:
    """The relayed flows of a burst fall asleep a second or two after it (each sleep frees
    two transports): the connections' trim comes as soon as they are quiet, whatever the
    sleeps do, and a second one once the sleeps are over."""
    heap = FakeHeap()
    t, _ = trimmer(heap)
    assert t.check(0, 0)
    heap.trims = 0
    churn = sleeps = 0
    for step in (3000, 3000, 3000):    # the connections open
        churn += step
        assert not t.check(churn, sleeps)
    sleeps += 4000                     # the first flows fall asleep
    assert t.check(churn, sleeps)      # the connections are over: trimmed at once
    sleeps += 9000                     # the rest fall asleep
    assert not t.check(churn, sleeps)
    sleeps += 4000
    assert not t.check(churn, sleeps)
    assert t.check(churn, sleeps)      # the sleeps are over: their trim
    assert heap.trims == 2
    for _ in range(5):                 # quiet on: nothing new to give back
        assert not t.check(churn, sleeps)
    assert heap.trims == 2

"""The daemon's decision to give freed heap back to the kernel (nodeproxy.daemon.memory_trim):
after a burst of connections, once it is over; never in the middle of one; never without
glibc."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from nodeproxy.daemon import memory_trim
from nodeproxy.daemon.memory_trim import (
    MIN_BUSY_CPU_SECONDS,
    MIN_CHURN,
    QUIET_CHURN,
    QUIET_CPU_SHARE,
    MemoryTrimmer,
    MemoryTrimMetrics,
    busy_period_over,
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


def test_a_burst_of_sleeps_the_wheel_calls_settled_is_trimmed_at_once_and_once() -> None:
    """The dormancy's word that the sleeps are over (Dormancy.settled) trims at once,
    without waiting for a quiet interval between checks; the next checks do not trim
    again for the same sleeps; too few sleeps since the last trim, or no malloc_trim,
    no trim."""
    heap = FakeHeap()
    t, metrics = trimmer(heap)
    assert t.check(0, 0)
    heap.trims = 0
    churn, sleeps = 9000, 0
    assert not t.check(churn, sleeps)  # the connections open
    sleeps += 6000
    assert t.check(churn, sleeps)      # the connections are over (sleeps still coming)
    sleeps += 3000
    assert t.settled(sleeps)           # the last of them asleep: trimmed now
    assert heap.trims == 2 and heap.rss == (100 - 12) << 20  # three trims of 4 MiB
    assert metrics.trimmed._value.get() == 12 << 20
    for _ in range(3):
        assert not t.check(churn, sleeps)  # the same sleeps: nothing more
    assert heap.trims == 2
    assert not t.settled(sleeps + MIN_CHURN - 1)  # too few since
    assert t.settled(sleeps + MIN_CHURN)
    none, _ = trimmer(None)
    assert not none.settled(10 * MIN_CHURN)


def test_busy_period_over_needs_work_then_an_idle_interval() -> None:
    assert not busy_period_over(0.0, 0.0, 1.0)                         # nothing happened
    assert not busy_period_over(MIN_BUSY_CPU_SECONDS - 0.01, 0.0, 1.0)  # too little work
    assert busy_period_over(MIN_BUSY_CPU_SECONDS, 0.0, 1.0)            # work, then idle
    assert busy_period_over(10.0, QUIET_CPU_SHARE * 1.0, 1.0)          # idle enough
    assert not busy_period_over(10.0, QUIET_CPU_SHARE * 1.0 + 0.01, 1.0)  # still working
    assert busy_period_over(10.0, 0.4, 10.0)                           # a long, quiet interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bulk_transfer_on_kept_connections_gets_a_trim_once_it_stops() -> None:
    """Bytes on a kept connection open none: the churn stays flat, the CPU time is what
    shows the busy period, and the trim comes in the first quiet interval after it, once;
    a steady light load (a daemon at 20 % of a core) never trims mid-way."""
    heap, clock = FakeHeap(), FakeClock()
    metrics = MemoryTrimMetrics(CollectorRegistry())
    t = MemoryTrimmer(metrics, heap.trim, rss=lambda: heap.rss, clock=clock)
    cpu = 0.5                                  # start-up's own CPU
    assert t.check(0, 0, cpu)                  # the first check
    heap.trims = 0
    for _ in range(30):                        # a steady 20 %: busy, but never quiet
        clock.now += 1.0
        cpu += 0.2
        assert not t.check(0, 0, cpu)
    for _ in range(5):                         # saturated for 5 s
        clock.now += 1.0
        cpu += 0.95
        assert not t.check(0, 0, cpu)
    clock.now += 1.0
    cpu += 0.01                                # the load stops
    assert t.check(0, 0, cpu)
    assert heap.trims == 1
    for _ in range(10):                        # idle on: nothing more to give back
        clock.now += 1.0
        cpu += 0.01
        assert not t.check(0, 0, cpu)
    assert heap.trims == 1


def test_without_a_cpu_count_only_connections_and_sleeps_decide() -> None:
    heap = FakeHeap()
    t, _ = trimmer(heap)
    assert t.check(0, 0)
    for _ in range(5):
        assert not t.check(0, 0)
    assert heap.trims == 1

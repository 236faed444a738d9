"""Giving the heap's freed memory back to the kernel once a burst of connections is over.

Thousands of connections opened or closed at once leave glibc's heap with free chunks in
the middle of it (the burst's transient buffers, tasks and transports) that it keeps for
later instead of returning them: 4-10 MiB of the daemon's RSS after 9,000 idle
connections opened or closed (docs/benchmarks.md, "Idle memory, sixth round").
`malloc_trim(0)` gives the free pages back (madvise), in about 1-2 ms for such a heap.
A low-rate housekeeping check (proxy.memoryTrimSeconds) trims once the connections
opened and closed since the last trim reach MIN_CHURN and the last interval was quiet
(at most QUIET_CHURN of them): after a burst, not in the middle of one, where the pages
would only be faulted back in; and once at its first check, after start-up.  Sockets
falling asleep or waking (tcp/dormancy.py: a sleep frees the flow's two transports,
about 2 KiB of this heap) are a second kind of burst, judged the same way on their own
count, and also as soon as the dormancy's wheel says that burst is over (`settled`: the
quiet flows it held were looked at and few wait), a second or so before a check can see
a quiet interval.  A burst's relayed flows fall asleep a second or two after its
connections opened, once the trim for the connections has run (2.8 MiB left free in the
heap with 8,988 asleep, docs/benchmarks.md, "Idle memory, ninth round"); counted with the
connections, they would hold that first trim back until they too were over.  A third
kind is work that opens no connection at all: a bulk transfer over a kept connection
leaves its buffers' chunks free in the heap (10 MiB after eight iperf3 streams cross
node, docs/benchmarks.md, "The heap after a busy period"), so the daemon's own CPU time
is a third count, in seconds: a busy period of at least MIN_BUSY_CPU_SECONDS, then an
interval nearly idle.  HAProxy likewise trims its pools when it releases memory.

glibc only: on another C library (musl has no `malloc_trim`) the check does nothing.
pymalloc's arenas (Python objects up to 512 bytes) are returned by Python itself when
empty and are not touched here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.capture.libc import has, libc

log = logging.getLogger(__name__)

# Connections opened plus closed since the last trim before another is worth it.
MIN_CHURN = 256
# At most this many in the last interval: the burst is over.
QUIET_CHURN = 16

# The daemon's CPU seconds since the last trim before a busy period is worth a trim, and
# at most this share of the last interval spent working: the busy period is over.
MIN_BUSY_CPU_SECONDS = 2.0
QUIET_CPU_SHARE = 0.05

_PAGE = os.sysconf("SC_PAGE_SIZE")


def trim_due(churn_since_trim: int, churn_last_interval: int, first: bool = False) -> bool:
    """Whether to trim now: at the first check after start-up (what parsing the config,
    compiling policies and enrolling the pods left free), else when enough connections
    came and went since the last trim to have left freed memory behind and the last
    interval was quiet (the burst is over)."""
    if first:
        return True
    return churn_since_trim >= MIN_CHURN and churn_last_interval <= QUIET_CHURN


def busy_period_over(cpu_since_trim: float, cpu_last_interval: float,
                     interval_seconds: float) -> bool:
    """Whether the daemon worked hard since the last trim (bulk bytes, HTTP requests on
    kept-alive connections: work the connection count does not see) and has been nearly
    idle over the last interval."""
    return (cpu_since_trim >= MIN_BUSY_CPU_SECONDS
            and cpu_last_interval <= QUIET_CPU_SHARE * interval_seconds)


def glibc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, ...)."""
    if not has("malloc_trim"):
        return None
    trim = libc().malloc_trim
    return lambda: int(trim(0))


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class MemoryTrimMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.trims = Counter(
            "nodeproxy_memory_trims",
            "Times the daemon gave its heap's free memory back to the kernel "
            "(malloc_trim) after a burst of connections (proxy.memoryTrimSeconds)",
            registry=registry)
        self.trimmed = Counter(
            "nodeproxy_memory_trimmed_bytes",
            "Resident memory the daemon's trims gave back (RSS before less after)",
            registry=registry)


class MemoryTrimmer:
    """Decides at each check, from the tracker's count of connections opened and closed
    (`churn`), the sockets' sleeps and wakes and the daemon's CPU time, whether to trim;
    trims with `trim` (None: never)."""

    def __init__(self, metrics: MemoryTrimMetrics, trim: Callable[[], int] | None,
                 rss: Callable[[], int] = rss_bytes,
                 clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self._trim = trim
        self._rss = rss
        self._clock = clock
        self._checked_at = clock()
        self._cpu_at_trim = 0.0    # the daemon's CPU seconds at the last trim
        self._cpu_at_check = 0.0
        self._at_trim = 0      # churn at the last trim
        self._at_check = 0     # churn at the last check
        self._sleeps_at_trim = 0   # the same for sockets falling asleep or waking
        self._sleeps_at_check = 0
        self._checked = False  # the first check trims what start-up left

    @property
    def unavailable(self) -> bool:
        return self._trim is None

    def check(self, churn: int, sleeps: int = 0, cpu_seconds: float | None = None) -> bool:
        """One housekeeping look at the connections' churn, the sockets' sleeps and wakes
        (each a running count) and the daemon's CPU seconds (None: not counted); True
        when it trimmed: at the first look, or once a burst of any is over."""
        since_trim, last_interval = churn - self._at_trim, churn - self._at_check
        sleeps_since, sleeps_last = sleeps - self._sleeps_at_trim, sleeps - self._sleeps_at_check
        self._at_check, self._sleeps_at_check = churn, sleeps
        cpu = self._cpu_at_check if cpu_seconds is None else cpu_seconds
        cpu_since, cpu_last = cpu - self._cpu_at_trim, cpu - self._cpu_at_check
        now = self._clock()
        interval, self._checked_at, self._cpu_at_check = now - self._checked_at, now, cpu
        first, self._checked = not self._checked, True
        if self._trim is None or not (trim_due(since_trim, last_interval, first)
                                      or trim_due(sleeps_since, sleeps_last)
                                      or busy_period_over(cpu_since, cpu_last, interval)):
            return False
        self._at_trim, self._sleeps_at_trim, self._cpu_at_trim = churn, sleeps, cpu
        given = self._trim_now()
        log.debug("malloc_trim after %d connections opened or closed, %d sleeps or wakes, "
                  "%.1f CPU s: %d KiB back", since_trim, sleeps_since, cpu_since, given // 1024)
        return True

    def settled(self, sleeps: int) -> bool:
        """The dormancy's word that a burst of sleeps is over (tcp/dormancy.py,
        `Dormancy.settled`, with its running count of sleeps and wakes): trim now if at
        least MIN_CHURN came since the last trim, rather than at the next check after a
        quiet interval.  True when it trimmed."""
        sleeps_since = sleeps - self._sleeps_at_trim
        if self._trim is None or sleeps_since < MIN_CHURN:
            return False
        self._sleeps_at_trim = sleeps
        given = self._trim_now()
        log.debug("malloc_trim after a burst of %d sleeps or wakes settled: %d KiB back",
                  sleeps_since, given // 1024)
        return True

    def _trim_now(self) -> int:
        """Trim, count it; the resident bytes it gave back."""
        assert self._trim is not None
        before = self._rss()
        self._trim()
        given = max(0, before - self._rss())
        self.metrics.trims.inc()
        self.metrics.trimmed.inc(given)
        return given


async def run(trimmer: MemoryTrimmer, churn: Callable[[], int], seconds: float,
              sleeps: Callable[[], int] = lambda: 0,
              cpu_seconds: Callable[[], float] = time.process_time) -> None:
    """Check every `seconds` (proxy.memoryTrimSeconds; 0: never)."""
    if not seconds or trimmer.unavailable:
        return
    while True:
        await asyncio.sleep(seconds)
        trimmer.check(churn(), sleeps(), cpu_seconds())

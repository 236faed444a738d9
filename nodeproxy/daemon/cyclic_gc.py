"""The cyclic garbage collector in the daemon: what start-up made is frozen out of its
passes, and its pauses are counted.

CPython's collector walks every tracked container object of the generation it collects.
The daemon's imports, config models, compiled policies and first snapshot are about
63,000 such objects that live as long as the process; a full (oldest-generation) pass
walked them all each time, 23 ms with nothing else and up to 110 ms with 9,000 idle
connections, a stall of every connection on the node (docs/benchmarks.md, "The cyclic
collector's pauses, seventh round").  `gc.freeze()` once start-up is done moves them to
the permanent generation, which no pass walks: later passes see only what was made since.
Frozen objects are still freed by reference counting; only a reference cycle among them
that becomes garbage later is never collected, a bounded, one-time cost (the start-up
set does not grow), and the collection just before the freeze clears what start-up
already left.  Servers that fork workers use the same call for the same objects.

The pauses are exported per generation (`nodeproxy_gc_pause_seconds_total`,
`nodeproxy_gc_longest_pause_seconds`), next to prometheus_client's own count of
collections (`python_gc_collections_total`), from two cheap callbacks per collection.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

GENERATIONS = 3


def freeze_start_up() -> int:
    """Collect what start-up left, then freeze every object alive now out of the
    collector's passes; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze %d start-up objects out of the cyclic collector's passes", frozen)
    return frozen


class PauseMeter(Collector):
    """Time spent in each generation's collections: the total and the longest, exported
    at scrape, kept in plain lists by the collector's start and stop callbacks."""

    def __init__(self, clock: Any = time.perf_counter):
        self._clock = clock
        self._started = 0.0
        self.total = [0.0] * GENERATIONS
        self.longest = [0.0] * GENERATIONS

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        paused = self._clock() - self._started
        generation = info["generation"]
        self.total[generation] += paused
        if paused > self.longest[generation]:
            self.longest[generation] = paused

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        total = CounterMetricFamily(
            "nodeproxy_gc_pause_seconds",
            "Time the daemon's event loop stood still in the cyclic garbage collector, "
            "by generation (2: full passes)", labels=("generation",))
        longest = GaugeMetricFamily(
            "nodeproxy_gc_longest_pause_seconds",
            "The longest single collection since start, by generation",
            labels=("generation",))
        frozen = GaugeMetricFamily(
            "nodeproxy_gc_frozen_objects",
            "Objects frozen out of the collector's passes at start-up (gc.freeze)")
        for generation in range(GENERATIONS):
            total.add_metric((str(generation),), self.total[generation])
            longest.add_metric((str(generation),), self.longest[generation])
        frozen.add_metric((), gc.get_freeze_count())
        yield total
        yield longest
        yield frozen


def register_gc_metrics(registry: CollectorRegistry) -> PauseMeter:
    """prometheus_client's collection counts and this module's pause times in
    `registry`, the meter's callback installed for the process's life."""
    GCCollector(registry=registry)
    meter = PauseMeter()
    registry.register(meter)
    gc.callbacks.append(meter.callback)
    return meter


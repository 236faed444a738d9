"""The daemon's use of the cyclic collector: start-up objects frozen out of its passes
(later garbage still collected), and the pause meter's arithmetic."""

from __future__ import annotations

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from nodeproxy.daemon import cyclic_gc


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_start_up_objects_are_left_out_and_later_cycles_still_collected():
    before_freeze = cycle()  # start-up's garbage: the collection before the freeze clears it
    try:
        kept = Node()
        frozen = cyclic_gc.freeze_start_up()
        assert before_freeze() is None
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is kept for g in range(3) for o in gc.get_objects(g))  # no pass's
        later = cycle()
        gc.collect()
        assert later() is None
    finally:
        gc.unfreeze()


def test_pause_meter_sums_and_keeps_the_longest_per_generation():
    now = [0.0]
    meter = cyclic_gc.PauseMeter(clock=lambda: now[0])
    for generation, paused in ((0, 0.001), (0, 0.003), (2, 0.05), (0, 0.002)):
        meter.callback("start", {"generation": generation})
        now[0] += paused
        meter.callback("stop", {"generation": generation, "collected": 0,
                                "uncollectable": 0})
    assert meter.total == pytest.approx([0.006, 0.0, 0.05])
    assert meter.longest == [0.003, 0.0, 0.05]


def test_registered_metrics_are_exposed_and_count_real_collections():
    registry = CollectorRegistry()
    meter = cyclic_gc.register_gc_metrics(registry)
    try:
        gc.collect(0)
        text = generate_latest(registry).decode()
        assert meter.total[0] > 0
        for line in ('nodeproxy_gc_pause_seconds_total{generation="0"}',
                     'nodeproxy_gc_longest_pause_seconds{generation="2"}',
                     "nodeproxy_gc_frozen_objects ",
                     'python_gc_collections_total{generation="0"}'):
            assert line in text
    finally:
        gc.callbacks.remove(meter.callback)

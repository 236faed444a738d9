"""What a test reads back from a running daemon: metric samples, and waiting for them."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples of one series whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
             interval: float = 0.05) -> bool:
    """Poll until the predicate holds or the timeout passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

"""What a test reads back from a running daemon: metric samples, access-log lines, and
waiting for them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeproxy_dev.testbed.cluster import scaled


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
    """Poll until the predicate holds or the timeout passes; its last answer.  The timeout
    stretches with $NODEPROXY_TESTBED_SLOWDOWN (the emulated VM of `make vm-test`)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def fqdn(service: str, namespace: str = "default") -> str:
    """A service's name as Istio's destination_service label has it."""
    return f"{service}.{namespace}.svc.cluster.local"


def access_log_entries(cluster_dir: str) -> list[dict[str, Any]]:
    """Every JSON line of the testbed's access log (Cluster.dir/access.log), [] if none."""
    path = os.path.join(cluster_dir, "access.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

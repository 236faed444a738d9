"""Enrollment at scale: N new pods on node0 enrolled one by one through the control socket."""

from __future__ import annotations

import json
import statistics
import time

from nodeproxy_dev.bench import procstat
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError
from nodeproxy_dev.testbed import netns

NODE = "node0"
SETTLE_S = 0.5


def enroll_many(bench: BenchCluster, count: int) -> dict[str, float]:
    """Make ``count`` pods (testbed: netns + CNI + cgroup), then time enrolling each.

    Only the enrollment is timed (``POST /v1/pods`` on node0's control socket until
    the daemon answers: listeners open in the pod, kernel maps written); making
    the pods is what the container runtime and CNI do and is reported apart.
    """
    c = bench.cluster
    node = c.nodes[NODE]
    pid = bench.daemon_pid(NODE)
    rss_before = procstat.rss_kib(pid)
    t0 = time.monotonic()
    pods = [c.add_pod(NODE, f"scale-{i:03d}", labels={"app": "scale"}, service_account="scale",
                      enroll=False) for i in range(count)]
    create_s = time.monotonic() - t0
    latencies: list[float] = []
    t0 = time.monotonic()
    for pod in pods:
        body = json.dumps(pod.workload(NODE)).encode()
        started = time.perf_counter()
        status, text = netns.unix_http(node.control_socket, "POST", "/v1/pods", body,
                                       {"Content-Type": "application/json"}, timeout=30)
        latencies.append(time.perf_counter() - started)
        if status != 200 or "enrolled" not in text:
            raise MeasurementError(f"enroll {pod.key}: HTTP {status}: {text[:300]}")
        pod.enrolled = True
    total_s = time.monotonic() - t0
    time.sleep(SETTLE_S)
    rss_after = procstat.rss_kib(pid)
    enrolled = {p["name"] for p in bench.cluster.admin_json(NODE, "/pods")}
    missing = [p.name for p in pods if p.name not in enrolled]
    if missing:
        raise MeasurementError(f"{len(missing)} pods missing from /pods after enrolling: "
                               f"{missing[:5]}")
    return {
        "total_s": total_s,
        "ms_per_pod": statistics.median(latencies) * 1000,
        "max_ms": max(latencies) * 1000,
        "rss_before_mib": rss_before / 1024,
        "rss_mib": rss_after / 1024,
        "kib_per_pod": (rss_after - rss_before) / count,
        "pods": float(count),
        "create_s": create_s,
    }

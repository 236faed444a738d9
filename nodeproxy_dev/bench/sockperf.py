"""L4 latency: sockperf ping-pong over TCP, small messages, round-trip percentiles."""

from __future__ import annotations

import re

from nodeproxy_dev.bench.runner import run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

# sockperf spends ~2.2 s of its own around the measured time (connect, warm-up, 2 s sleep).
OVERHEAD_S = 3.0
_PERCENTILE = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")
_OBSERVATIONS = re.compile(r"Total\s+(\d+)\s+observations")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")
WANTED = {"50.000": "p50", "99.000": "p99", "99.900": "p99.9"}


def parse(output: str) -> dict[str, float]:
    """p50/p99/p99.9 round trip (µs) and the number of observations from sockperf's report."""
    text = _ESCAPES.sub("", output)
    figures: dict[str, float] = {}
    for point, value in _PERCENTILE.findall(text):
        if point in WANTED:
            figures[WANTED[point]] = float(value)
    observations = _OBSERVATIONS.search(text)
    if "No messages were received" in text or not observations or len(figures) < len(WANTED):
        raise MeasurementError(f"sockperf measured nothing: {tail(text)}")
    figures["observations"] = float(observations.group(1))
    return figures


def pingpong(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, float]:
    seconds = max(1, round(settings.sockperf_seconds))
    argv = ["sockperf", "ping-pong", "--tcp", "-i", route.host, "-p", str(route.port),
            "-m", str(settings.sockperf_message), "-t", str(seconds), "--full-rtt"]
    result = run_tool(bench, route.client_pod, argv,
                      timeout=seconds + OVERHEAD_S + settings.tool_margin)
    if result.returncode != 0:
        raise MeasurementError(f"sockperf exited {result.returncode}: "
                               f"{tail(result.stderr + result.stdout)}")
    return parse(result.stdout + result.stderr)

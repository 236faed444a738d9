"""L4 throughput: iperf3 (-J) from the client to the server, 1 or more parallel streams."""

from __future__ import annotations

import json
import time
from typing import Any

from nodeproxy_dev.bench.runner import run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

BUSY_RETRIES = 3


def parse(output: str) -> dict[str, float]:
    """Received Gbit/s and sender retransmits from iperf3's JSON report."""
    try:
        data: dict[str, Any] = json.loads(output)
    except ValueError as e:
        raise MeasurementError(f"iperf3 printed no JSON: {tail(output)}") from e
    if data.get("error"):
        raise MeasurementError(f"iperf3: {data['error']}")
    try:
        received = data["end"]["sum_received"]
        sent = data["end"]["sum_sent"]
    except KeyError as e:
        raise MeasurementError(f"iperf3 report lacks {e}") from e
    bps = float(received["bits_per_second"])
    if bps <= 0:
        raise MeasurementError("iperf3 moved no data")
    return {"gbps": bps / 1e9, "retransmits": float(sent.get("retransmits", 0)),
            "bytes": float(received.get("bytes", 0))}


def throughput(bench: BenchCluster, route: Route, settings: Settings,
               streams: int) -> dict[str, float]:
    seconds = max(1, round(settings.iperf_seconds))
    argv = ["iperf3", "-c", route.host, "-p", str(route.port), "-t", str(seconds),
            "-P", str(streams), "-J", "--connect-timeout", "5000"]
    error: MeasurementError | None = None
    for _ in range(BUSY_RETRIES):
        result = run_tool(bench, route.client_pod, argv,
                          timeout=seconds + 5 + settings.tool_margin)
        try:
            return parse(result.stdout)
        except MeasurementError as e:
            error = e
            if "busy" not in str(e):
                raise
            time.sleep(1.0)  # the server is still finishing the previous test
    assert error is not None
    raise error

"""L7 over gRPC: the unary benchmark (``grpcunary``'s client in the client pod, its server
in the server pods), a bounded number of calls at a fixed concurrency.

Every call must succeed and return the bytes the server must send: one that fails (any
gRPC status but OK) or returns other bytes fails the run.
"""

from __future__ import annotations

from typing import Any

from nodeproxy_dev.bench.runner import last_json_line, run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

MODULE = "nodeproxy_dev.bench.grpcunary"


def problem(report: dict[str, Any], calls: int) -> str | None:
    """Why the client's report does not count (a call not made, failed or answered with
    other bytes), or None."""
    made, ok = int(report["calls"]), int(report["ok"])
    failed, wrong = int(report["failed"]), int(report["wrong"])
    if made != calls or ok != calls or failed or wrong:
        statuses = ", ".join(f"{k} {v}" for k, v in report.get("failed_by_status", {}).items())
        return (f"gRPC: {ok} of {calls} calls answered right ({made} made, {failed} failed"
                f"{f': {statuses}' if statuses else ''}, {wrong} answered with other bytes)")
    if float(report["duration_s"]) <= 0:
        return "gRPC: the client measured no time"
    return None


def figures(report: dict[str, Any]) -> dict[str, float]:
    """calls/s (as ``rps``), p50/p99/max (ms) of a report that counts."""
    calls, seconds = int(report["calls"]), float(report["duration_s"])
    return {"rps": calls / seconds, "duration_s": seconds,
            "p50_ms": float(report["p50_us"]) / 1000, "p99_ms": float(report["p99_us"]) / 1000,
            "max_ms": float(report["max_us"]) / 1000, "requests": float(calls)}


def unary(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, float]:
    """One client run against the route: calls/s and latency, every answer checked."""
    calls = settings.grpc_calls
    argv = [bench.cluster.python, "-m", MODULE, "call", route.address, "--calls", str(calls),
            "--concurrency", str(settings.grpc_concurrency)]
    result = run_tool(bench, route.client_pod, argv, timeout=90 + settings.tool_margin)
    if result.returncode != 0:
        raise MeasurementError(f"the gRPC client exited {result.returncode}: "
                               f"{tail(result.stderr + result.stdout)}")
    report = last_json_line(result, "the gRPC client")
    why = problem(report, calls)
    if why:
        raise MeasurementError(why)
    return figures(report)

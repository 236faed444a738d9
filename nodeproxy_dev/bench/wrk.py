"""L7: wrk against nginx (keep-alive connections, one small file), at saturation and at a
fixed rate (each connection waits between requests: wrk's delay() hook)."""

from __future__ import annotations

import os
from pathlib import Path

from nodeproxy_dev.bench.runner import last_json_line, run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import HTTP_FILE, BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

# wrk calls done() once at the end; it prints one JSON line we parse.
REPORT_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean,
    latency.max))
end
"""
ERROR_FIELDS = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
MAX_ERROR_SHARE = 0.01
TIMEOUT_S = 5.0  # wrk --timeout


# The fixed-rate run: this many requests per second over this many connections.
FIXED_RATE = 1000
FIXED_RATE_CONNECTIONS = 10


def script_path(bench: BenchCluster, pace_ms: float | None = None) -> str:
    """The Lua script: the JSON report, and with pace_ms a pause before each request."""
    name = "wrk-report.lua" if pace_ms is None else f"wrk-report-paced-{pace_ms:g}ms.lua"
    path = os.path.join(bench.cluster.dir, "bench", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pace = "" if pace_ms is None else f"delay = function() return {pace_ms:g} end\n"
        Path(path).write_text(pace + REPORT_LUA)
    return path


def saturate(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, float]:
    """requests/s, p50/p99 latency (ms) and error counts of one wrk run."""
    return _run(bench, route, settings, settings.wrk_connections, None)


def fixed_rate(bench: BenchCluster, route: Route, settings: Settings,
               seconds: float | None = None, max_error_share: float = MAX_ERROR_SHARE,
               timeout_s: float = TIMEOUT_S) -> dict[str, float]:
    """The same at about FIXED_RATE requests/s (the achieved rate is reported: each
    connection pauses between a response and its next request); ``seconds`` instead of
    the profile's, ``max_error_share`` 1.0 to report errors instead of failing, and
    wrk's ``--timeout``."""
    pace_ms = FIXED_RATE_CONNECTIONS * 1000 / FIXED_RATE
    return _run(bench, route, settings, FIXED_RATE_CONNECTIONS, pace_ms, seconds,
                max_error_share, timeout_s)


def _run(bench: BenchCluster, route: Route, settings: Settings, connections: int,
         pace_ms: float | None, seconds_wanted: float | None = None,
         max_error_share: float = MAX_ERROR_SHARE,
         timeout_s: float = TIMEOUT_S) -> dict[str, float]:
    seconds = max(1, round(seconds_wanted or settings.wrk_seconds))
    url = f"http://{route.address}/{HTTP_FILE}"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", f"{timeout_s:g}s",
            "-s", script_path(bench, pace_ms), url]
    result = run_tool(bench, route.client_pod, argv, timeout=seconds + settings.tool_margin)
    if result.returncode != 0:
        raise MeasurementError(f"wrk exited {result.returncode}: "
                               f"{tail(result.stderr + result.stdout)}")
    data = last_json_line(result, "wrk")
    requests = int(data["requests"])
    errors = sum(int(data[f]) for f in ERROR_FIELDS)
    if requests == 0:
        raise MeasurementError(f"wrk completed no request: {tail(result.stdout)}")
    if errors > max_error_share * requests:
        counts = ", ".join(f"{f}={data[f]}" for f in ERROR_FIELDS if data[f])
        raise MeasurementError(f"wrk: {errors} errors in {requests} requests ({counts})")
    duration_s = int(data["duration_us"]) / 1e6
    return {
        "rps": requests / duration_s,
        "duration_s": duration_s,
        "p50_ms": float(data["p50_us"]) / 1000,
        "p99_ms": float(data["p99_us"]) / 1000,
        "max_ms": float(data["max_us"]) / 1000,
        "requests": float(requests),
        "errors": float(errors),
        **{field: float(data[field]) for field in ERROR_FIELDS},
    }

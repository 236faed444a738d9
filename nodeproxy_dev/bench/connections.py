"""Connection set-up rate (the testbed peer, closed loop), held for a minute (sustained:
the rate per window, so a cliff shows), and memory per idle connection."""

from __future__ import annotations

import contextlib
import json
import selectors
import statistics
import subprocess
import time
from typing import Any

from nodeproxy_dev.bench import procstat
from nodeproxy_dev.bench.runner import last_json_line, run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

# The proxy's RSS with the idle connections is read this long after the last one opened
# (its figure), and also after the first second (`rss_1s_mib`, in the JSON): a proxy may
# tidy up after a burst (nodeproxy's memory trim looks every second), and connections
# left idle stay for far longer than this.
IDLE_EARLY_S = 1.0
IDLE_SETTLE_S = 3.0
# The capacity scenario stops when a step's time per connection grows to this multiple of
# the earlier steps' median: the route is slowing down, not holding.
CAPACITY_SLOW_FACTOR = 4.0


def setup_rate(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, float]:
    """Connections per second: connect, 25-byte request, 32-byte answer, close; closed loop.

    The client is the testbed peer (Python + uvloop), bounded by duration and count;
    every connection's answer is verified.
    """
    argv = bench.cluster.peer_argv(
        "load", "--to", route.address, "--mode", "transfer", "--send", "0", "--receive", "0",
        "--rate", "0", "--concurrency", str(settings.connect_concurrency),
        "--duration", str(settings.connect_seconds), "--max-requests", str(settings.connect_max),
        "--timeout", "5")
    result = run_tool(bench, route.client_pod, argv,
                      timeout=settings.connect_seconds + 10 + settings.tool_margin)
    data = last_json_line(result, "peer load")
    succeeded, failed = int(data.get("succeeded", 0)), int(data.get("failed", 0))
    elapsed = float(data.get("elapsed_s", 0.0))
    if succeeded == 0 or elapsed <= 0:
        raise MeasurementError(f"no connection succeeded: {data.get('errors')}")
    if failed > 0.01 * (succeeded + failed):
        raise MeasurementError(f"{failed} of {succeeded + failed} connections failed: "
                               f"{data.get('errors')}")
    return {"per_s": succeeded / elapsed, "connections": float(succeeded),
            "failed": float(failed)}


def window_rates(points: list[tuple[float, float]], window: float) -> list[float]:
    """Connections/s in each window between cumulative (elapsed s, succeeded) points, the
    start (0, 0) implied; a last window shorter than half a window is left out (too few
    connections to be a rate)."""
    rates = []
    last_t, last_n = 0.0, 0.0
    for t, n in sorted(points):
        span = t - last_t
        if span <= 0:
            continue
        if span >= window / 2:
            rates.append((n - last_n) / span)
        last_t, last_n = t, n
    return rates


def progress_points(stdout: str) -> list[tuple[float, float]]:
    """(elapsed s, succeeded) of each of the peer's ``load --progress`` lines."""
    points = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("progress"):
                points.append((float(data["elapsed_s"]), float(data["succeeded"])))
    return points


def steadiness(rates: list[float]) -> dict[str, float]:
    """The median window's rate; whether the rate held (the median window of the last third
    of the run against that of the first third: a rate that falls as sockets pile up falls
    below 1, whatever the noise of single windows); the lowest window against the median."""
    if not rates:
        raise MeasurementError("the sustained run produced no full window")
    median = statistics.median(rates)
    third = max(1, len(rates) // 3)
    first, last = statistics.median(rates[:third]), statistics.median(rates[-third:])
    return {"median_per_s": median, "lowest_per_s": min(rates),
            "lowest_ratio": min(rates) / median if median > 0 else 0.0,
            "held_ratio": last / first if first > 0 else 0.0}


def sustained_rate(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, Any]:
    """Back-to-back short connections (as setup_rate) for settings.sustained_seconds, the
    peer reporting its cumulative count every window: the rate per window, its median and
    its lowest.  Failed connections are counted, not fatal: running out of ports or
    descriptors is what the scenario looks for.  The client pods reuse their own TIME_WAIT
    ports (topology.CLIENT_SYSCTLS): a client closes first, and without reuse one that
    opens more than ~470 connections/s to one address runs out of ports within the minute
    whatever is on the way."""
    argv = bench.cluster.peer_argv(
        "load", "--to", route.address, "--mode", "transfer", "--send", "0",
        "--receive", "0", "--rate", "0", "--concurrency", str(settings.connect_concurrency),
        "--duration", str(settings.sustained_seconds),
        "--max-requests", str(int(settings.sustained_seconds * 20000)),
        "--progress", str(settings.sustained_window), "--timeout", "5")
    result = run_tool(bench, route.client_pod, argv,
                      timeout=settings.sustained_seconds + 10 + settings.tool_margin)
    final = last_json_line(result, "peer load")
    points = progress_points(result.stdout)
    points.append((float(final.get("elapsed_s", 0.0)), float(final.get("succeeded", 0))))
    if not final.get("succeeded"):
        raise MeasurementError(f"no connection succeeded: {final.get('errors')}")
    rates = window_rates(points, settings.sustained_window)
    return {**steadiness(rates), "windows_per_s": [round(r, 1) for r in rates],
            "window_s": settings.sustained_window, "succeeded": float(final["succeeded"]),
            "failed": float(final.get("failed", 0)), "errors": final.get("errors", {})}


def capacity(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, Any]:
    """How many concurrent connections the route holds: the capacity client opens them
    settings.capacity_step at a time until one is refused or a step slows to
    CAPACITY_SLOW_FACTOR times the earlier steps' median time per connection, or
    settings.capacity_max are held (nodeproxy_dev.bench.capacity).  The proxies' open-file
    limits are raised as far as the run's hard limit allows first."""
    out: dict[str, Any] = {"nofile": [procstat.raise_nofile(p.pid, 2 * settings.capacity_max
                                                            + 1000)
                                      for p in route.proxies]}
    deadline = settings.capacity_deadline
    argv = [bench.cluster.python, "-m", "nodeproxy_dev.bench.capacity", "--to", route.address,
            "--max", str(settings.capacity_max), "--step", str(settings.capacity_step),
            "--slow-factor", str(CAPACITY_SLOW_FACTOR), "--timeout", "5",
            "--deadline", str(deadline)]
    result = run_tool(bench, route.client_pod, argv, timeout=deadline + 60)
    found = last_json_line(result, "capacity client")
    if not found.get("held"):
        raise MeasurementError(f"no connection held: {found.get('errors')}")
    out.update(found)
    errors = ", ".join(f"{k} ×{v}" for k, v in found.get("errors", {}).items())
    out["note"] = (f"held {found['held']} of at most {found['max']} ({found['reason']}"
                   f"{': ' + errors if errors else ''})")
    return out


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                value: dict[str, Any] = json.loads(line)
                return value
    raise MeasurementError(f"idle client printed nothing within {timeout:.0f}s")


def idle_connections(bench: BenchCluster, route: Route, count: int) -> dict[str, Any]:
    """Open ``count`` connections and hold them idle: how long opening took and, if a proxy
    is on the route, the first proxy's RSS before and with them open."""
    proxy = route.proxies[0] if route.proxies else None
    out: dict[str, Any] = {"connections": float(count)}
    before = 0
    # Every proxy on the way holds the connections (cross node: both node proxies).
    out["nofile"] = [procstat.raise_nofile(p.pid, 2 * count + 1000) for p in route.proxies]
    if proxy is not None:
        before = procstat.rss_kib(proxy.pid)
    argv = [bench.cluster.python, "-m", "nodeproxy_dev.bench.idle", "--to", route.address,
            "--count", str(count), "--timeout", "60", "--hold", "120"]
    proc = bench.cluster.spawn_in_pod(route.client_pod, argv, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _read_json_line(proc, timeout=90)
        if not ready.get("ready") or int(ready.get("open", 0)) < count:
            raise MeasurementError(f"idle client opened {ready.get('open')} of {count}: "
                                   f"{ready.get('errors')}")
        out["setup_s"] = float(ready["setup_s"])
        if proxy is not None:
            time.sleep(IDLE_EARLY_S)
            out["rss_1s_mib"] = procstat.rss_kib(proxy.pid) / 1024
            time.sleep(IDLE_SETTLE_S - IDLE_EARLY_S)
            memory = procstat.memory_kib(proxy.pid)
            out.update({"rss_before_mib": before / 1024, "rss_mib": memory["VmRSS"] / 1024,
                        "kib_per_conn": (memory["VmRSS"] - before) / count,
                        "memory_kib": memory})
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()  # the client closes its connections and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired as e:
            raise MeasurementError("idle client did not exit") from e
        if proc.returncode != 0:
            raise MeasurementError(f"idle client exited {proc.returncode}: "
                                   f"{tail(proc.stderr.read())}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc_list = bench.cluster.pods[route.client_pod].processes
        if proc in proc_list:
            proc_list.remove(proc)
    return out

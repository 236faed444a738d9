"""Unit tests for the live figures of `nodeproxy top`/`stat` (nodeproxy.telemetry.live_stats)
and their table rendering, on a fake clock."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import aiohttp
import pytest

from nodeproxy.admin.http_server import HttpServer
from nodeproxy.admin.server import AdminServers
from nodeproxy.cli import live_view
from nodeproxy.telemetry.labels import RequestLabels, TcpLabels
from nodeproxy.telemetry.live_stats import (
    DEFAULT_ROUTE,
    NO_ROUTE,
    QUANTILE_ERROR,
    LiveStats,
    bucket,
    bucket_value_ms,
    is_failure,
    quantile_ms,
    route_name,
)
from tests.unit.test_http_telemetry import Daemon


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def labels(src: str = "client", dst: str = "web", reporter: str = "source") -> TcpLabels:
    return TcpLabels(reporter, src, "default", "spiffe://x/client", dst, "default",
                     "spiffe://x/web", "web.default.svc.cluster.local", "mutual_tls")


def request_labels(src: str = "client", dst: str = "web") -> RequestLabels:
    return RequestLabels.from_tcp(labels(src, dst), "http")


def row(snapshot: dict, name: str, direction: str) -> dict:
    return next(w for w in snapshot["workloads"]
                if w["name"] == name and w["direction"] == direction)


def test_quantile_error_is_bounded_on_random_latencies() -> None:
    """Each reported quantile is at least the exact nearest-rank one and at most
    QUANTILE_ERROR above it."""
    assert QUANTILE_ERROR == pytest.approx(0.0219, abs=1e-4)
    rng = random.Random(7)
    samples = [rng.lognormvariate(math.log(0.02), 1.5) for _ in range(5000)]  # seconds
    histogram: dict[int, int] = {}
    for s in samples:
        histogram[bucket(s)] = histogram.get(bucket(s), 0) + 1
    ordered = sorted(samples)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        exact_ms = ordered[math.ceil(q * len(ordered)) - 1] * 1000
        assert 1 - 1e-9 <= quantile_ms(histogram, q) / exact_ms <= 1 + QUANTILE_ERROR


def test_bucket_bounds_hold_their_durations() -> None:
    for ms in (0.0005, 0.002, 0.7, 1, 99.9, 100, 250.5, 30_000):
        index = bucket(ms / 1000)
        value = bucket_value_ms(index)
        if ms > 0.001:
            assert 1 - 1e-9 <= value / ms <= 1 + QUANTILE_ERROR
    assert quantile_ms({}, 0.5) is None


def test_success_follows_linkerd_classification() -> None:
    assert not is_failure(200, "")
    assert not is_failure(404, "")
    assert is_failure(503, "")
    assert is_failure(0, "")  # no response at all
    assert is_failure(200, "14")  # gRPC UNAVAILABLE in a 200
    assert not is_failure(200, "0")
    assert route_name(None) == NO_ROUTE
    assert route_name("") == DEFAULT_ROUTE
    assert route_name("default/web-routes") == "default/web-routes"


def test_requests_rates_and_rows() -> None:
    clock = Clock()
    stats = LiveStats(60, clock)
    lab = request_labels()
    for i in range(40):
        clock.now = 1000.0 + i * 0.1
        stats.request("default/web", "default/web-routes", lab, 200, "", 0.100, clock.now)
    for _ in range(10):
        stats.request("default/web", "default/web-routes", lab, 500, "", 0.002, clock.now)
    snap = stats.snapshot(10)
    out, into = row(snap, "client", "outbound"), row(snap, "web", "inbound")
    for r in (out, into):
        assert (r["requests"], r["successes"], r["success_rate"]) == (50, 40, 0.8)
        assert r["rps"] == 5.0
        latency = r["latency_ms"]
        # 10 of 50 at 2 ms, 40 at 100 ms: p50, p95, p99 are 100 ms within the bound.
        for q in ("p50", "p95", "p99"):
            assert 100 <= latency[q] <= 100 * (1 + QUANTILE_ERROR)
    (route,) = snap["routes"]
    assert (route["service"], route["route"], route["requests"], route["success_rate"]) == \
        ("default/web", "default/web-routes", 50, 0.8)
    assert snap["workloads"] == sorted(snap["workloads"],
                                       key=lambda w: (w["namespace"], w["name"]))
    assert stats.snapshot(10, namespace="other") == {**snap, "workloads": [], "routes": []}


def test_window_expiry() -> None:
    clock = Clock(500.2)
    stats = LiveStats(30, clock)
    lab = request_labels()
    stats.request("default/web", DEFAULT_ROUTE, lab, 200, "", 0.01, 500.2)  # second 500
    clock.now = 510.5
    stats.request("default/web", DEFAULT_ROUTE, lab, 200, "", 0.01, 510.5)  # second 510
    assert row(stats.snapshot(30), "client", "outbound")["requests"] == 2
    assert row(stats.snapshot(11), "client", "outbound")["requests"] == 2  # 500..510
    assert row(stats.snapshot(10), "client", "outbound")["requests"] == 1  # 501..510
    clock.now = 529.9  # second 529: window 30 covers 500..529
    assert row(stats.snapshot(30), "client", "outbound")["requests"] == 2
    clock.now = 530.0
    assert row(stats.snapshot(30), "client", "outbound")["requests"] == 1
    clock.now = 545.0
    assert stats.snapshot(30)["workloads"] == []
    # Slots past the kept 30 seconds are dropped once traffic moves the ring on.
    stats.request("default/web", DEFAULT_ROUTE, lab, 200, "", 0.01, 545.0)
    assert [s.second for s in stats._slots] == [545]
    with pytest.raises(ValueError, match="1..30"):
        stats.snapshot(31)
    with pytest.raises(ValueError):
        stats.snapshot(0)


def test_tcp_flows_count_connections_and_bytes_per_direction() -> None:
    clock = Clock()
    stats = LiveStats(60, clock)
    out = stats.flow(labels(reporter="source"))
    into = stats.flow(labels(reporter="destination"))
    for flow in (out, into):
        flow.opened()
        flow.bytes(True, 1000)  # client -> server
        flow.bytes(False, 300)
    clock.now += 1.5
    out.bytes(True, 24)
    out.closed()
    snap = stats.snapshot(60)
    client, web = row(snap, "client", "outbound"), row(snap, "web", "inbound")
    assert client["tcp"] == {"open_connections": 0, "connections": 1,
                             "bytes_in": 300, "bytes_out": 1024}
    assert web["tcp"] == {"open_connections": 1, "connections": 1,
                          "bytes_in": 1000, "bytes_out": 300}
    assert (client["requests"], client["success_rate"], client["latency_ms"]["p50"]) == \
        (0, None, None)
    clock.now += 60
    snap = stats.snapshot(60)
    # Nothing in the window, but the inbound connection is still open.
    assert [(w["name"], w["tcp"]["open_connections"], w["tcp"]["bytes_in"])
            for w in snap["workloads"]] == [("web", 1, 0)]


def test_tables_show_the_rows() -> None:
    clock = Clock()
    stats = LiveStats(60, clock)
    lab = request_labels()
    for status in (200, 200, 200, 503):
        stats.request("default/web", "default/web-routes", lab, status, "", 0.1, clock.now)
    flow = stats.flow(labels(reporter="source"))
    flow.opened()
    flow.bytes(True, 2048)
    document = {"node": "node0", **stats.snapshot(60)}
    text = live_view.render(document, "all")
    lines = text.splitlines()
    assert lines[0] == "WORKLOADS (node node0, last 60s)"
    assert lines[1].split() == list(live_view.WORKLOAD_HEADER)
    client = next(line.split() for line in lines if line.split()[:3] ==
                  ["default", "client", "outbound"])
    assert client[3:] == ["75.00%", "0.1rps", "101ms", "101ms", "101ms", "1", "0B", "2.0KiB"]
    route = next(line.split() for line in lines if "default/web-routes" in line)
    assert route == ["default", "web", "default/web-routes", "4", "75.00%", "0.1rps",
                     "101ms", "101ms", "101ms"]
    assert "ROUTES" not in live_view.render(document, "workload")
    assert live_view.select(document, "route").keys() == document.keys() - {"workloads"}


async def get_live(servers: AdminServers, query: str) -> tuple[int, Any]:
    server = HttpServer(servers.admin_app())
    await server.start_tcp("127.0.0.1", 0)
    host, port = "127.0.0.1", server.port
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://{host}:{port}/stats/live{query}") as response:
            return response.status, await response.json()
    finally:
        await server.stop()


def test_admin_live_page() -> None:
    clock = Clock()
    stats = LiveStats(30, clock)
    stats.request("shop/web", DEFAULT_ROUTE, request_labels(), 200, "", 0.01, clock.now)
    servers = AdminServers(Daemon(), live=lambda w, ns: {"node": "n", **stats.snapshot(w, ns)})
    status, body = asyncio.run(get_live(servers, "?window=30"))
    assert status == 200 and body["window_seconds"] == 30
    assert [r["requests"] for r in body["routes"]] == [1]
    status, body = asyncio.run(get_live(servers, "?window=30&namespace=shop"))
    assert (status, body["workloads"], len(body["routes"])) == (200, [], 1)
    status, body = asyncio.run(get_live(servers, ""))  # all it keeps: 30 s
    assert (status, body["window_seconds"]) == (200, 30)
    assert asyncio.run(get_live(servers, "?window=31")) == \
        (400, {"error": "window must be 1..30 seconds, not 31"})
    assert asyncio.run(get_live(servers, "?window=abc")) == \
        (400, {"error": "window must be a whole number of seconds, not 'abc'"})
    status, body = asyncio.run(get_live(AdminServers(Daemon()), ""))
    assert status == 404 and "admin.liveStatsSeconds: 0" in body["error"]

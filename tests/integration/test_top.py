"""`nodeproxy stat` and `nodeproxy top` against the daemons of the simulated cluster:
known HTTP requests (40 answered 200 after 100 ms, 10 answered 500) and TCP flows of
known sizes go through the mesh, then the CLI, run in the node's network namespace
against its admin API, must report exactly those counts, bytes and rates, and latencies
within the collector's stated quantile bound.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy.telemetry.live_stats import QUANTILE_ERROR
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import wait_for

pytestmark = pytest.mark.privileged

APP = 8080
SINK = 9000
WINDOW = 60
DELAY_MS = 100
OK, FAILED = 40, 10
FLOWS, SEND, RECEIVE = 3, 100_000, 50_000
# peer transfer framing: the client sends 'T' + 8-byte length + 16-byte seed before its
# payload; the server sends a 32-byte SHA-256 before its answer.
SENT_PER_FLOW, RECEIVED_PER_FLOW = 25 + SEND, 32 + RECEIVE


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "other", labels={"app": "other"}, service_account="other")
        c.add_pod("node1", "web", labels={"app": "web"}, service_account="web")
        c.add_pod("node1", "plain", labels={"app": "plain"}, service_account="plain")
        c.add_pod("node1", "sink", labels={"app": "sink"}, service_account="sink")
        c.serve_http("web", APP)
        c.serve_http("plain", APP)
        c.serve_peer("sink", SINK)
        c.add_service("web", port=80, target_port=APP, app_protocol="http")
        c.add_service("plain", port=80, target_port=APP, app_protocol="http")
        c.add_service("sink", port=SINK, target_port=SINK, app_protocol="tcp")
        c.write_configs(overrides={"httpRoutes": [
            {"name": "web-routes", "service": "web", "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}},
                             {"path": {"type": "PathPrefix", "value": "/status"}}],
                 "retry": {"attempts": 0}}]}]})
        c.start_daemons()
        yield c


def cli(c: Cluster, node: str, *args: str) -> Any:
    return c.run_in_node(node, [sys.executable, "-m", "nodeproxy", *args], timeout=30)


def requests(c: Cluster, pod: str, service: str, path: str, n: int) -> dict[str, Any]:
    url = f"http://{c.services[f'default/{service}'].vip4}{path}"
    out = c.run_in_pod(pod, [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests",
                             "--url", url, "-n", str(n)], timeout=60, check=True)
    return json.loads(out.stdout)


def workload(document: dict[str, Any], name: str, direction: str) -> dict[str, Any]:
    rows = [w for w in document["workloads"]
            if (w["name"], w["direction"]) == (name, direction)]
    assert len(rows) == 1, (name, direction, document["workloads"])
    return rows[0]


def route(document: dict[str, Any], service: str, name: str) -> dict[str, Any]:
    rows = [r for r in document["routes"] if (r["service"], r["route"]) == (service, name)]
    assert len(rows) == 1, (service, name, document["routes"])
    return rows[0]


@pytest.fixture(scope="module")
def traffic(mesh: Cluster) -> dict[str, Any]:
    """The traffic every test here reads back, made once (the tests read it back within
    the 60 s window: they take about 10 s)."""
    started = time.monotonic()
    ok = requests(mesh, "client", "web", f"/delay/{DELAY_MS}", OK)
    failed = requests(mesh, "client", "web", "/status/500", FAILED)
    assert (ok["statuses"], failed["statuses"]) == ({"200": OK}, {"500": FAILED})
    plain = requests(mesh, "other", "plain", "/", 5)
    unrouted = requests(mesh, "other", "web", "/elsewhere", 1)
    assert (plain["statuses"], unrouted["statuses"]) == ({"200": 5}, {"404": 1})
    flows = mesh.peer("client", "transfer", "--to", f"{mesh.services['default/sink'].vip4}:"
                      f"{SINK}", "--connections", str(FLOWS), "--parallel", "1",
                      "--send", str(SEND), "--receive", str(RECEIVE))
    assert flows["exit_code"] == 0, flows
    return {"started_at": started, "made_at": time.monotonic(),
            "max_seconds": max(r["seconds"] for r in ok["results"] + failed["results"])}


def stat_json(c: Cluster, node: str, *args: str) -> dict[str, Any]:
    result = cli(c, node, "stat", "--json", "--window", str(WINDOW), *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def settled(c: Cluster, node: str, name: str, direction: str) -> dict[str, Any]:
    """The document once the flows' closes have been counted (the relay finishes a moment
    after the client has its last byte)."""
    def closed() -> bool:
        doc = stat_json(c, node)
        rows = [w for w in doc["workloads"] if (w["name"], w["direction"]) == (name, direction)]
        return bool(rows) and rows[0]["tcp"]["open_connections"] == 0 and \
            rows[0]["tcp"]["connections"] == FLOWS
    assert wait_for(closed, timeout=10, interval=0.2), stat_json(c, node)
    return stat_json(c, node)


def test_stat_json_counts_the_requests_made(mesh: Cluster, traffic: dict[str, Any]) -> None:
    """node0 proxies the client's requests (L7 runs on the client's node): its outbound
    row, the destination's inbound row and the route's row each count the 50 requests,
    40 of them successes, at 50/60 requests per second."""
    doc = settled(mesh, "node0", "client", "outbound")
    assert time.monotonic() - traffic["started_at"] < WINDOW - 1, "read too late to count"
    assert (doc["node"], doc["window_seconds"]) == ("node0", WINDOW)
    for row in (workload(doc, "client", "outbound"), workload(doc, "web", "inbound"),
                route(doc, "default/web", "default/web-routes")):
        assert (row["requests"], row["successes"], row["success_rate"]) == (50, 40, 0.8), row
        # rps is requests / window exactly (rounded to 6 places).
        assert row["rps"] == pytest.approx((OK + FAILED) / WINDOW, abs=1e-6)
        latency = row["latency_ms"]
        # 40 of 50 requests waited 100 ms at the backend, so the nearest-rank p50, p95
        # and p99 are samples of at least 100 ms; the collector never understates a
        # quantile and overstates it by at most QUANTILE_ERROR; no request took longer
        # than the slowest one the client timed.
        ceiling = traffic["max_seconds"] * 1000 * (1 + QUANTILE_ERROR)
        assert DELAY_MS <= latency["p50"] <= latency["p95"] <= latency["p99"] <= ceiling, \
            (latency, ceiling)
    assert route(doc, "default/plain", "[default]")["requests"] == 5
    assert route(doc, "default/plain", "[default]")["success_rate"] == 1.0
    unrouted = route(doc, "default/web", "[no route]")
    assert (unrouted["requests"], unrouted["success_rate"]) == (1, 1.0)  # a 404 succeeds
    assert workload(doc, "other", "outbound")["requests"] == 6
    # The client's TCP flows to the tcp service: counted byte for byte on the way out.
    tcp = workload(doc, "client", "outbound")["tcp"]
    assert tcp == {"open_connections": 0, "connections": FLOWS,
                   "bytes_out": FLOWS * SENT_PER_FLOW, "bytes_in": FLOWS * RECEIVED_PER_FLOW}


def test_destination_node_counts_the_flows_inbound(mesh: Cluster,
                                                   traffic: dict[str, Any]) -> None:
    """node1 delivers the flows into the sink pod: its inbound row has them, bytes in
    and out from the sink's side; it saw no HTTP request (those are handled on node0)."""
    doc = settled(mesh, "node1", "sink", "inbound")
    sink = workload(doc, "sink", "inbound")
    assert sink["tcp"] == {"open_connections": 0, "connections": FLOWS,
                           "bytes_in": FLOWS * SENT_PER_FLOW,
                           "bytes_out": FLOWS * RECEIVED_PER_FLOW}
    assert sink["requests"] == 0 and doc["routes"] == []
    # The HTTP requests arrived at web over pooled connections, which node1 meters.
    web = workload(doc, "web", "inbound")
    assert web["tcp"]["connections"] >= 1 and web["tcp"]["bytes_in"] > 0


def test_top_json_and_namespace_filter(mesh: Cluster, traffic: dict[str, Any]) -> None:
    settled(mesh, "node0", "client", "outbound")
    result = cli(mesh, "node0", "top", "--json", "--count", "2", "--interval", "0.2",
                 "--window", str(WINDOW))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        doc = json.loads(line)
        client = workload(doc, "client", "outbound")
        assert (client["requests"], client["success_rate"], client["tcp"]["connections"]) \
            == (50, 0.8, FLOWS)
    assert stat_json(mesh, "node0", "-n", "elsewhere")["workloads"] == []
    by_route = stat_json(mesh, "node0", "--by", "route")
    assert "workloads" not in by_route and len(by_route["routes"]) == 3


def test_stat_table(mesh: Cluster, traffic: dict[str, Any]) -> None:
    settled(mesh, "node0", "client", "outbound")
    result = cli(mesh, "node0", "stat", "--window", str(WINDOW))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"WORKLOADS (node node0, last {WINDOW}s)"
    assert lines[1].split()[:5] == ["NAMESPACE", "NAME", "DIRECTION", "SUCCESS", "RPS"]
    client = next(line.split() for line in lines
                  if line.split()[:3] == ["default", "client", "outbound"])
    # SUCCESS, RPS, three latencies, TCP_CONN (open now), bytes in and out.
    assert client[3:5] == ["80.00%", "0.8rps"]
    assert all(v.endswith("ms") and float(v[:-2]) >= DELAY_MS for v in client[5:8]), client
    assert client[8:] == ["0", "146.6KiB", "293.0KiB"]
    web_route = next(line.split() for line in lines if "default/web-routes" in line)
    assert web_route[:6] == ["default", "web", "default/web-routes", "50", "80.00%", "0.8rps"]


def test_window_expires(mesh: Cluster, traffic: dict[str, Any]) -> None:
    """A one-second window a few seconds after the traffic holds none of it."""
    time.sleep(max(0.0, traffic["made_at"] + 2.5 - time.monotonic()))
    doc = stat_json(mesh, "node0", "--window", "1")
    assert doc["window_seconds"] == 1
    assert [w for w in doc["workloads"] if w["name"] == "client"] == []


def test_bad_window_and_dead_daemon(mesh: Cluster) -> None:
    result = cli(mesh, "node0", "stat", "--window", "61")
    assert result.returncode == 1
    assert "window must be 1..60 seconds, not 61" in result.stderr
    dead = "http://127.0.0.1:1"
    for command in ("stat", "top"):
        result = cli(mesh, "node0", command, "--admin", dead, "--count", "1") \
            if command == "top" else cli(mesh, "node0", command, "--admin", dead)
        assert result.returncode == 1
        assert f"cannot read the admin API at {dead}" in result.stderr, result.stderr
        assert result.stdout == ""


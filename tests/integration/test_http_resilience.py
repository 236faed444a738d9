"""Circuit breaking and outlier detection through the daemons on the simulated cluster:
real HTTP backends in pods (nodeproxy_dev.testbed.http_backend, some slow, some failing every
request), real clients in the client pod, each test on a service of its own.  The
assertions are what a user sees: how many requests got 200 and how many 503 UO, how
fast, which backend answered, when an ejected endpoint comes back, and the metrics and
/clusters entries that count it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import access_log_entries, fqdn, metric_sum, wait_for

pytestmark = pytest.mark.privileged

APP = 8080
GRPC = 50051
DELAY_MS = 600
NO_RETRY = [{"retry": {"attempts": 0}}]

# N requests at once, each on its own connection, started together; prints their
# statuses, bodies, answering backends and durations as JSON.
PARALLEL = """
import http.client, json, sys, threading, time
host, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
barrier = threading.Barrier(n)
out = [None] * n
def one(i):
    c = http.client.HTTPConnection(host, 80, timeout=20)
    c.connect()
    barrier.wait()
    t = time.monotonic()
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    out[i] = {"status": r.status, "body": body[:300].decode("utf-8", "replace"),
              "backend": r.getheader("x-backend"), "seconds": time.monotonic() - t}
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in threads]
[t.join(30) for t in threads]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client",
                  settings={"accessLog": True})
        c.add_pod("node1", "slow", labels={"app": "slow"}, service_account="slow")
        c.add_pod("node0", "good-1", labels={"flaky": "1", "capped": "1"},
                  service_account="web")
        c.add_pod("node1", "good-2", labels={"capped": "1"}, service_account="web")
        c.add_pod("node1", "bad-1", labels={"flaky": "1", "capped": "1", "lonely": "1"},
                  service_account="web")
        c.add_pod("node0", "bad-2", labels={"capped": "1", "lonely": "1"},
                  service_account="web")
        c.add_pod("node1", "grpc-1", labels={"app": "grpc"}, service_account="grpc")
        c.serve_http("slow", APP, "slow", "--delay-ms", str(DELAY_MS))
        c.serve_grpc("grpc-1", GRPC)
        c.add_service("grpc", port=GRPC, target_port=GRPC, app_protocol="grpc",
                      traffic_policy={"connectionPool": {"maxRequests": 1}})
        for pod in ("good-1", "good-2"):
            c.serve_http(pod, APP)
        for pod in ("bad-1", "bad-2"):
            c.serve_http(pod, APP, pod, "--status", "503")
        c.add_service("limited", port=80, target_port=APP, selector={"app": "slow"},
                      app_protocol="http",
                      traffic_policy={"connectionPool": {"maxRequests": 4}})
        c.add_service("queued", port=80, target_port=APP, selector={"app": "slow"},
                      app_protocol="http",
                      traffic_policy={"connectionPool": {"maxConnections": 1,
                                                         "maxPendingRequests": 2}})
        c.add_service("retried", port=80, target_port=APP, selector={"app": "slow"},
                      app_protocol="http",
                      traffic_policy={"connectionPool": {"maxRetries": 1}})
        rr = {"policy": "ROUND_ROBIN"}
        c.add_service("flaky", port=80, target_port=APP, selector={"flaky": "1"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": rr, "outlierDetection": {
                          "consecutive5xxErrors": 3, "intervalSeconds": 0.2,
                          "baseEjectionTimeSeconds": 2, "maxEjectionPercent": 50}})
        c.add_service("capped", port=80, target_port=APP, selector={"capped": "1"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": rr, "outlierDetection": {
                          "consecutive5xxErrors": 2, "intervalSeconds": 0.2,
                          "baseEjectionTimeSeconds": 60}})
        c.add_service("lonely", port=80, target_port=APP, selector={"lonely": "1"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": rr, "outlierDetection": {
                          "consecutive5xxErrors": 2, "intervalSeconds": 0.2,
                          "baseEjectionTimeSeconds": 60, "maxEjectionPercent": 100}})
        c.add_service("abandoned", port=80, target_port=APP, selector={"lonely": "1"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": rr, "outlierDetection": {
                          "consecutive5xxErrors": 2, "intervalSeconds": 0.2,
                          "baseEjectionTimeSeconds": 60, "maxEjectionPercent": 100,
                          "allowLastHealthyEjection": True}})
        c.write_configs(overrides={
            "http": {"accessLog": {"path": os.path.join(c.dir, "access.log")}},
            # No retries: every client request is exactly one attempt, so counts are exact.
            "httpRoutes": [{"name": f"{s}-routes", "service": s, "rules": NO_RETRY}
                           for s in ("limited", "queued", "flaky", "capped", "lonely",
                                     "abandoned")] + [
                {"name": "retried-routes", "service": "retried", "rules": [{"retry": {
                    "attempts": 1, "retryOn": ["5xx"],
                    "backoff": {"baseSeconds": 0.001, "maxSeconds": 0.001}}}]}],
        })
        c.start_daemons()
        yield c



def vip(c: Cluster, service: str) -> str:
    return c.services[f"default/{service}"].vip4


def metric(c: Cluster, name: str, **labels: str) -> float:
    return metric_sum(c.metrics("node0"), name, **labels)


def parallel(c: Cluster, service: str, n: int, path: str = "/") -> list[dict[str, Any]]:
    out = c.run_in_pod("client", [sys.executable, "-c", PARALLEL, vip(c, service), path,
                                  str(n)], timeout=60, check=True)
    results: list[dict[str, Any]] = json.loads(out.stdout)
    assert all(r is not None for r in results), (results, out.stderr)
    return results


def sequential(c: Cluster, service: str, n: int, path: str = "/") -> list[dict[str, Any]]:
    out = c.run_in_pod("client", [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests",
                                  "--url", f"http://{vip(c, service)}:80{path}", "-n", str(n)],
                       timeout=60, check=True)
    results: list[dict[str, Any]] = json.loads(out.stdout)["results"]
    return results


def cluster_view(c: Cluster, service: str) -> dict[str, Any]:
    (view,) = [cl for cl in c.admin_json("node0", "/clusters")
               if cl["service"] == f"default/{service}" and cl["family"] == "ipv4"]
    return view


def endpoint_view(c: Cluster, service: str, pod: str) -> dict[str, Any]:
    address = f"{c.pods[pod].ip4}:{APP}"
    (endpoint,) = [e for e in cluster_view(c, service)["endpoints"]
                   if e["address"] == address]
    return endpoint


def uo_requests(c: Cluster, service: str) -> float:
    return metric(c, "istio_requests_total", destination_service=fqdn(service),
                  response_code="503", response_flags="UO")


def access_log_flags(c: Cluster, service: str) -> Counter[str]:
    return Counter(line["response_flags"] for line in access_log_entries(c.dir)
                   if line["destination_service"] == fqdn(service))


# --- circuit breaking -------------------------------------------------------------------------


def test_max_requests_overflow_fails_fast_with_503_uo_and_recovers(mesh: Cluster):
    """maxRequests 4, a backend that takes 0.6 s, 12 requests at once: 4 are served, 8
    are refused at once with 503 UO (Envoy's body), each counted once; then 4 at once,
    under the limit, all pass."""
    overflow_before = metric(mesh, "nodeproxy_http_overflow_total",
                             destination_service=fqdn("limited"), limit="requests")
    uo_before = uo_requests(mesh, "limited")
    results = parallel(mesh, "limited", 12)
    statuses = Counter(r["status"] for r in results)
    assert statuses == {200: 4, 503: 8}, results
    refused = [r for r in results if r["status"] == 503]
    assert all(r["body"] == "upstream connect error or disconnect/reset before headers. "
               "reset reason: overflow" and r["backend"] is None for r in refused), refused
    # Fails fast: refused long before the backend's 0.6 s answer.
    assert max(r["seconds"] for r in refused) < DELAY_MS / 1000 / 2, refused
    assert min(r["seconds"] for r in results if r["status"] == 200) >= DELAY_MS / 1000
    assert wait_for(lambda: metric(mesh, "nodeproxy_http_overflow_total",
                                   destination_service=fqdn("limited"),
                                   limit="requests") - overflow_before == 8)
    assert wait_for(lambda: uo_requests(mesh, "limited") - uo_before == 8)
    assert access_log_flags(mesh, "limited")["UO"] == 8
    breaker = cluster_view(mesh, "limited")["circuit_breaker"]
    assert breaker["max_requests"] == 4 and breaker["requests"] == 0, breaker
    assert breaker["overflows"]["requests"] == 8
    # Load drops under the limit: everything passes again.
    again = parallel(mesh, "limited", 4)
    assert Counter(r["status"] for r in again) == {200: 4}, again
    assert uo_requests(mesh, "limited") - uo_before == 8


def test_a_grpc_client_past_the_limit_gets_unavailable(mesh: Cluster):
    """maxRequests 1 on a gRPC service: while one call sleeps, another gets UNAVAILABLE
    (a trailers-only response with the overflow message), counted as flag UO."""
    target = f"{mesh.services['default/grpc'].vip4}:{GRPC}"
    uo_before = metric(mesh, "istio_requests_total", destination_service=fqdn("grpc"),
                       response_flags="UO", grpc_response_status="14")
    sleeper = mesh.spawn_in_pod("client", mesh.tool_argv(
        "grpc_client", "--target", target, "--method", "Sleep", "--payload", "1500",
        "--json"), stdout=subprocess.PIPE, text=True)
    try:
        def in_flight() -> int:  # the cluster appears with its first request
            views = [cl for cl in mesh.admin_json("node0", "/clusters")
                     if cl["service"] == "default/grpc"]
            return sum(v["circuit_breaker"]["requests"] for v in views)

        assert wait_for(lambda: in_flight() == 1, timeout=5), \
            "the sleeping call never reached the proxy"
        refused = mesh.grpc_client("client", "--target", target, "--method", "Unary",
                                   "--payload", "hello")
        assert refused["codes"] == {"UNAVAILABLE": 1}, refused
        assert "reset reason: overflow" in refused["calls"][0]["details"]
        out, _ = sleeper.communicate(timeout=30)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert json.loads(out)["codes"] == {"OK": 1}
    assert wait_for(lambda: metric(mesh, "istio_requests_total",
                                   destination_service=fqdn("grpc"), response_flags="UO",
                                   grpc_response_status="14") - uo_before == 1)


def test_max_connections_queues_pending_requests_up_to_the_limit(mesh: Cluster):
    """maxConnections 1 and maxPendingRequests 2 over HTTP/1.1: of 6 requests at once, one
    is sent, two wait for that connection and are served after it in turn, three
    overflow (503 UO); the backend sees no second connection."""
    assert sequential(mesh, "queued", 1, "/stats")[0]["status"] == 200  # the pooled connection
    first = json.loads(sequential(mesh, "queued", 1, "/stats")[0]["body"])
    overflow_before = metric(mesh, "nodeproxy_http_overflow_total",
                             destination_service=fqdn("queued"), limit="pending")
    results = parallel(mesh, "queued", 6)
    statuses = Counter(r["status"] for r in results)
    assert statuses == {200: 3, 503: 3}, results
    served = sorted(r["seconds"] for r in results if r["status"] == 200)
    delay = DELAY_MS / 1000
    # One at a time over the one connection: the third is done after three delays.
    assert served[2] >= 3 * delay * 0.95, served
    assert max(r["seconds"] for r in results if r["status"] == 503) < delay / 2
    assert wait_for(lambda: metric(mesh, "nodeproxy_http_overflow_total",
                                   destination_service=fqdn("queued"),
                                   limit="pending") - overflow_before == 3)
    last = json.loads(sequential(mesh, "queued", 1, "/stats")[0]["body"])
    assert last["connections_total"] == first["connections_total"], (first, last)
    breaker = cluster_view(mesh, "queued")["circuit_breaker"]
    assert (breaker["connections"], breaker["pending"], breaker["requests"]) == (1, 0, 0)


def test_max_retries_caps_retries_in_progress(mesh: Cluster):
    """maxRetries 1: four requests at once, each failing (503 after 0.6 s) and allowed one
    retry: one retry is made, the three others are not (their 503 goes back as it is,
    at once) and count as retry overflows."""
    service = fqdn("retried")
    overflow = metric(mesh, "nodeproxy_http_overflow_total", destination_service=service,
                      limit="retries")
    retries = metric(mesh, "nodeproxy_http_retries_total", destination_service=service)
    results = parallel(mesh, "retried", 4, "/status/503")
    assert [r["status"] for r in results] == [503] * 4 and \
        all(r["backend"] == "slow" for r in results), results
    durations = sorted(r["seconds"] for r in results)
    delay = DELAY_MS / 1000
    assert durations[2] < 1.5 * delay <= 2 * delay * 0.95 <= durations[3], durations
    assert wait_for(lambda: metric(mesh, "nodeproxy_http_overflow_total",
                                   destination_service=service,
                                   limit="retries") - overflow == 3)
    assert metric(mesh, "nodeproxy_http_retries_total", destination_service=service) \
        - retries == 1
    assert cluster_view(mesh, "retried")["circuit_breaker"]["retries"] == 0


# --- outlier detection --------------------------------------------------------------------


def test_failing_endpoint_is_ejected_after_the_configured_count_and_returns(mesh: Cluster):
    """Round robin over a healthy and an always-503 endpoint, consecutive5xxErrors 3, base
    ejection 2 s: of 20 requests exactly 3 fail; the next ones all reach the healthy
    endpoint; the failing one returns after 2 s (checked every 0.2 s), gets traffic again
    and is ejected again after 3 more failures, now for 4 s."""
    service = fqdn("flaky")
    bad = f"{mesh.pods['bad-1'].ip4}:{APP}"
    ejections = metric(mesh, "nodeproxy_http_outlier_ejections_total",
                       destination_service=service, endpoint=bad)
    returns = metric(mesh, "nodeproxy_http_outlier_returns_total",
                     destination_service=service, endpoint=bad)
    started = time.monotonic()
    results = sequential(mesh, "flaky", 20)
    ejected_by = time.monotonic()
    assert ejected_by - started < 2.0, "too slow to check before the ejection ends"
    failed = [r for r in results if r["status"] == 503]
    assert len(failed) == 3 and {r["backend"] for r in failed} == {"bad-1"}, results
    assert [r["status"] for r in results[6:]] == [200] * 14  # ejected after its third
    view = endpoint_view(mesh, "flaky", "bad-1")
    assert view["ejected"] is True and view["times_ejected"] == 1, view
    assert 0 < view["ejection_remaining_seconds"] <= 2.0
    assert metric(mesh, "nodeproxy_http_outlier_ejections_total", destination_service=service,
                  endpoint=bad) - ejections == 1
    assert metric(mesh, "nodeproxy_http_outlier_ejected", destination_service=service) == 1
    assert {r["backend"] for r in sequential(mesh, "flaky", 6)} == {"good-1"}
    assert wait_for(lambda: metric(mesh, "nodeproxy_http_outlier_returns_total",
                                   destination_service=service, endpoint=bad) - returns == 1,
                    timeout=5, interval=0.02)
    returned_at = time.monotonic()
    # Ejected at most at ejected_by, back no sooner than 2 s after the first request.
    assert returned_at - started >= 2.0
    assert returned_at - ejected_by <= 2.0 + 0.2 + 0.5
    assert endpoint_view(mesh, "flaky", "bad-1")["ejected"] is False
    again = sequential(mesh, "flaky", 10)
    assert Counter(r["backend"] for r in again if r["status"] == 503) == {"bad-1": 3}, again
    view = endpoint_view(mesh, "flaky", "bad-1")
    assert view["times_ejected"] == 2 and view["ejection_multiplier"] == 2, view
    assert 2.0 < view["ejection_remaining_seconds"] <= 4.0, view


def test_max_ejection_percent_caps_ejections(mesh: Cluster):
    """Four endpoints, two always failing, maxEjectionPercent 10: one is ejected (at least
    one always may be), the other stays in and keeps answering; the refusal is counted."""
    service = fqdn("capped")
    skipped = metric(mesh, "nodeproxy_http_outlier_ejections_skipped_total",
                     destination_service=service, reason="max_ejection_percent")
    results = sequential(mesh, "capped", 40)
    failures = Counter(r["backend"] for r in results if r["status"] == 503)
    views = {pod: endpoint_view(mesh, "capped", pod) for pod in ("bad-1", "bad-2")}
    ejected = [pod for pod, v in views.items() if v["ejected"]]
    assert len(ejected) == 1, views
    (kept,) = {"bad-1", "bad-2"} - set(ejected)
    assert failures[ejected[0]] == 2 and failures[kept] > 2, failures
    assert not any(endpoint_view(mesh, "capped", p)["ejected"] for p in ("good-1", "good-2"))
    assert metric(mesh, "nodeproxy_http_outlier_ejections_skipped_total",
                  destination_service=service,
                  reason="max_ejection_percent") - skipped == failures[kept] - 1


def test_the_last_healthy_endpoint_is_not_ejected(mesh: Cluster):
    """Two endpoints, both failing, maxEjectionPercent 100: one is ejected, the last one
    stays and keeps answering (its 503s reach the client, never 'no healthy upstream')."""
    results = sequential(mesh, "lonely", 12)
    assert all(r["status"] == 503 and r["backend"] in ("bad-1", "bad-2") for r in results)
    views = [endpoint_view(mesh, "lonely", pod) for pod in ("bad-1", "bad-2")]
    assert sorted(v["ejected"] for v in views) == [False, True], views
    assert metric(mesh, "nodeproxy_http_outlier_ejections_skipped_total",
                  destination_service=fqdn("lonely"), reason="last_healthy") >= 1


def test_allowing_the_last_ejection_answers_503_no_healthy_upstream(mesh: Cluster):
    """With allowLastHealthyEjection both failing endpoints go, and requests then get
    the proxy's own 503 UH instead of reaching either."""
    results = sequential(mesh, "abandoned", 8)
    assert [r["backend"] for r in results[:4]] == ["bad-1", "bad-2"] * 2 or \
        [r["backend"] for r in results[:4]] == ["bad-2", "bad-1"] * 2, results
    assert all(r["status"] == 503 and r["backend"] is None
               and r["body"] == "no healthy upstream" for r in results[4:]), results
    assert access_log_flags(mesh, "abandoned")["UH"] == 4

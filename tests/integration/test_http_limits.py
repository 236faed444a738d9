"""Local rate limits and fault injection through the daemons on the simulated cluster:
real HTTP and gRPC servers on the other node, real clients (the stdlib client, a grpcio
client) in pods of node0, whose proxy applies the limits and faults.

Each test asserts what a user would notice: which requests got 429 and Retry-After,
how many passed over the measured window, the share of injected aborts (within four
standard deviations of the binomial mean), the delay each request took, that refused
and aborted requests never reached the server, and the metric and access-log deltas.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import access_log_entries, fqdn, metric_sum, wait_for

pytestmark = pytest.mark.privileged

APP = 8080
GRPC = 50051
LIMITED = "nodeproxy_http_rate_limited_total"
FAULTS = "nodeproxy_http_faults_total"



def on(path: str, **rule: Any) -> dict[str, Any]:
    return {"matches": [{"path": {"type": "PathPrefix", "value": path}}], **rule}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client",
                  settings={"accessLog": True})
        c.add_pod("node0", "client2", labels={"app": "client2"}, service_account="client2",
                  settings={"accessLog": True})
        c.add_pod("node1", "lim-b", labels={"app": "lim"}, service_account="lim")
        c.add_pod("node1", "wl-b", labels={"app": "wl"}, service_account="wl",
                  settings={"rateLimit": {"requestsPerSecond": 2, "burst": 2}})
        c.add_pod("node1", "grpc-b", labels={"app": "grpc"}, service_account="grpc")
        c.serve_http("lim-b", APP)
        c.serve_http("wl-b", APP)
        c.serve_grpc("grpc-b", GRPC)
        c.add_service("lim", port=80, target_port=APP, app_protocol="http")
        c.add_service("wl", port=80, target_port=APP, app_protocol="http")
        c.add_service("grpc", port=GRPC, target_port=GRPC, app_protocol="grpc")
        no_retry = {"attempts": 0}
        c.write_configs(overrides={
            "http": {"accessLog": {"path": os.path.join(c.dir, "access.log")}},
            "httpRoutes": [
                {"name": "lim-routes", "service": "lim", "rules": [
                    on("/rl", rateLimit={"requestsPerSecond": 5, "burst": 5}),
                    on("/perid", rateLimit={"requestsPerSecond": 2, "burst": 3,
                                            "perSourceIdentity": True}),
                    on("/abort", retry=no_retry,
                       fault={"abort": {"httpStatus": 503, "percentage": 30}}),
                    on("/delay", fault={"delay": {"fixedDelaySeconds": 0.2}}),
                    on("/both", fault={"delay": {"fixedDelaySeconds": 0.1},
                                       "abort": {"httpStatus": 418}}),
                    on("/gated", retry=no_retry, fault={
                        "abort": {"httpStatus": 500, "percentage": 50},
                        "headers": [{"name": "x-fault", "value": "on"}]}),
                    {},  # everything else (/stats): no limit, no fault
                ]},
                {"name": "grpc-routes", "service": "grpc", "rules": [
                    on("/test.Echo/Unary", rateLimit={"requestsPerSecond": 1, "burst": 2}),
                    on("/test.Echo/Info", fault={"abort": {"grpcStatus": "UNAVAILABLE"}}),
                    {},
                ]},
            ],
        })
        c.start_daemons()
        yield c


def requests(c: Cluster, url: str, n: int = 1, *extra: str, pod: str = "client"
             ) -> dict[str, Any]:
    out = c.run_in_pod(pod, [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests",
                             "--url", url, "-n", str(n), "--deadline", "60", *extra],
                       timeout=120, check=True)
    return json.loads(out.stdout)


def url(c: Cluster, service: str, path: str) -> str:
    return f"http://{c.services[f'default/{service}'].address(4)}{path}"


def metric(c: Cluster, name: str, **labels: str) -> float:
    return metric_sum(c.metrics("node0"), name, **labels)


def served(c: Cluster, path: str) -> int:
    """Requests for path the lim-b server has answered (read over the unlimited rule)."""
    stats = json.loads(requests(c, url(c, "lim", "/stats"))["results"][0]["body"])
    return int(stats["by_path"].get(path, 0))


def statuses(result: dict[str, Any]) -> list[int | None]:
    return [r["status"] for r in result["results"]]


def access_log(c: Cluster, path: str, expected: int) -> list[dict[str, Any]]:
    """The access-log lines of path, once there are `expected` of them."""
    found: list[dict[str, Any]] = []

    def read() -> bool:
        found[:] = [line for line in access_log_entries(c.dir) if line["path"] == path]
        return len(found) >= expected

    wait_for(read, timeout=10)
    return found


def within_four_sigma(hits: int, n: int, share: float) -> bool:
    return abs(hits - n * share) <= 4 * math.sqrt(n * share * (1 - share))


# --- rate limits ------------------------------------------------------------------------


def test_route_rate_limit_admits_burst_plus_rate_times_window(mesh: Cluster):
    """5 rps, burst 5: 60 requests 30 ms apart (about 2 s).  The first 5 pass at once,
    and in all 5 + 5 * window pass, the window measured by the client (±1.5: the
    proxy sees each request a little later than the client sent it, and the last
    token may be just short of whole)."""
    before = metric(mesh, LIMITED, destination_service=fqdn("lim"), scope="route")
    flagged = metric(mesh, "istio_requests_total", destination_service=fqdn("lim"),
                     response_code="429", response_flags="RL")
    result = requests(mesh, url(mesh, "lim", "/rl"), 60, "--interval", "0.03")
    got = statuses(result)
    assert set(got) <= {200, 429}, got
    admitted = got.count(200)
    window = result["results"][-1]["at"] - result["results"][0]["at"]
    assert 1.5 < window < 10, window
    assert abs(admitted - (5 + 5 * window)) <= 1.5, (admitted, window, got)
    assert got[:5] == [200] * 5, got
    refused = [r for r in result["results"] if r["status"] == 429]
    assert all(r["headers"].get("retry-after") == "1" for r in refused)  # 1/5 s, rounded up
    assert all(r["body"] == "local_rate_limited" for r in refused)
    assert served(mesh, "/rl") == admitted  # refused requests never reached the server
    assert wait_for(lambda: metric(mesh, LIMITED, destination_service=fqdn("lim"),
                                   scope="route") - before == len(refused))
    assert metric(mesh, "istio_requests_total", destination_service=fqdn("lim"),
                  response_code="429", response_flags="RL") - flagged == len(refused)
    lines = access_log(mesh, "/rl", 60)
    assert Counter(line["response_flags"] for line in lines) == \
        {"-": admitted, "RL": len(refused)}


def test_per_source_identity_buckets(mesh: Cluster):
    """2 rps, burst 3, per identity: each client's service account has a bucket of its
    own, so each gets its 3 first requests through and no more (the run takes < 0.5 s,
    less than one refill)."""
    first = requests(mesh, url(mesh, "lim", "/perid"), 6)
    second = requests(mesh, url(mesh, "lim", "/perid"), 6, pod="client2")
    for result in (first, second):
        got = statuses(result)
        assert result["results"][-1]["at"] < 0.5, result["results"][-1]
        assert got == [200] * 3 + [429] * 3, got
    lines = access_log(mesh, "/perid", 12)
    by_source = Counter((line["source_workload"], line["response_flags"]) for line in lines)
    assert by_source == {("client", "-"): 3, ("client", "RL"): 3,
                         ("client2", "-"): 3, ("client2", "RL"): 3}


def test_workload_rate_limit(mesh: Cluster):
    """wl-b takes 2 rps with burst 2 from this node's proxy: 8 requests at once get 2
    through, then 429s counted with scope workload."""
    before = metric(mesh, LIMITED, destination_service=fqdn("wl"), scope="workload")
    result = requests(mesh, url(mesh, "wl", "/w"), 8)
    got = statuses(result)
    assert result["results"][-1]["at"] < 0.5
    assert got == [200] * 2 + [429] * 6, got
    assert all(r["headers"].get("retry-after") == "1" for r in result["results"][2:])
    assert wait_for(lambda: metric(mesh, LIMITED, destination_service=fqdn("wl"),
                                   scope="workload") - before == 6)


def test_grpc_rate_limit_is_resource_exhausted(mesh: Cluster):
    """1 rps, burst 2: six calls in well under a second get two through (one more per
    whole second the run took, measured by the client)."""
    target = f"{mesh.services['default/grpc'].vip4}:{GRPC}"
    result = mesh.grpc_client("client", "--target", target, "--method", "Unary",
                              "--payload", "hi", "--count", "6")
    codes = [call["code"] for call in result["calls"]]
    took = sum(call["latency_ms"] for call in result["calls"]) / 1000
    passed = 2 + int(took)
    assert codes == ["OK"] * passed + ["RESOURCE_EXHAUSTED"] * (6 - passed), (codes, took)
    refused = result["calls"][-1]
    assert refused["details"] == "local_rate_limited"
    metadata = {**refused["initial_metadata"], **refused["trailing_metadata"]}
    assert metadata.get("retry-after") == "1", refused
    assert wait_for(lambda: metric(mesh, "istio_requests_total",
                                   destination_service=fqdn("grpc"), grpc_response_status="8",
                                   response_flags="RL") == 6 - passed)


# --- faults -------------------------------------------------------------------------------


def test_abort_share_and_status(mesh: Cluster):
    n = 400
    before = metric(mesh, FAULTS, destination_service=fqdn("lim"), kind="abort")
    delays = metric(mesh, FAULTS, destination_service=fqdn("lim"), kind="delay")
    result = requests(mesh, url(mesh, "lim", "/abort"), n)
    got = Counter(statuses(result))
    assert set(got) <= {200, 503}, got
    aborted = got[503]
    assert within_four_sigma(aborted, n, 0.30), aborted
    assert all(r["body"] == "fault filter abort" for r in result["results"]
               if r["status"] == 503)
    assert served(mesh, "/abort") == got[200]  # aborted requests never reached the server
    assert wait_for(lambda: metric(mesh, FAULTS, destination_service=fqdn("lim"),
                                   kind="abort") - before == aborted)
    assert metric(mesh, "istio_requests_total", destination_service=fqdn("lim"),
                  response_code="503", response_flags="FI") == aborted
    assert metric(mesh, FAULTS, destination_service=fqdn("lim"), kind="delay") == delays


def test_delay_holds_every_request(mesh: Cluster):
    before = metric(mesh, FAULTS, destination_service=fqdn("lim"), kind="delay")
    result = requests(mesh, url(mesh, "lim", "/delay"), 5)
    assert statuses(result) == [200] * 5
    seconds = [r["seconds"] for r in result["results"]]
    assert all(0.2 <= s < 0.7 for s in seconds), seconds
    assert wait_for(lambda: metric(mesh, FAULTS, destination_service=fqdn("lim"),
                                   kind="delay") - before == 5)
    lines = access_log(mesh, "/delay", 5)
    assert [line["response_flags"] for line in lines] == ["DI"] * 5
    assert all(line["duration_ms"] >= 200 for line in lines)


def test_delayed_then_aborted(mesh: Cluster):
    result = requests(mesh, url(mesh, "lim", "/both"), 3)
    assert statuses(result) == [418] * 3
    assert all(r["seconds"] >= 0.1 for r in result["results"])
    assert served(mesh, "/both") == 0
    lines = access_log(mesh, "/both", 3)
    assert [line["response_flags"] for line in lines] == ["DI,FI"] * 3


def test_header_gated_fault(mesh: Cluster):
    """50% abort only for requests with x-fault: on: none without it, half with it."""
    n = 200
    plain = requests(mesh, url(mesh, "lim", "/gated"), n)
    assert statuses(plain) == [200] * n
    other = requests(mesh, url(mesh, "lim", "/gated"), 50, "--header", "x-fault: off")
    assert statuses(other) == [200] * 50
    gated = requests(mesh, url(mesh, "lim", "/gated"), n, "--header", "x-fault: on")
    got = Counter(statuses(gated))
    assert set(got) <= {200, 500}, got
    assert within_four_sigma(got[500], n, 0.5), got
    assert wait_for(lambda: metric(mesh, "istio_requests_total",
                                   destination_service=fqdn("lim"), response_code="500",
                                   response_flags="FI") == got[500])


def test_grpc_abort_status(mesh: Cluster):
    target = f"{mesh.services['default/grpc'].vip4}:{GRPC}"
    result = mesh.grpc_client("client", "--target", target, "--method", "Info",
                              "--payload", "x", "--count", "3")
    assert [call["code"] for call in result["calls"]] == ["UNAVAILABLE"] * 3, result
    assert result["calls"][0]["details"] == "fault filter abort"
    assert wait_for(lambda: metric(mesh, "istio_requests_total",
                                   destination_service=fqdn("grpc"),
                                   grpc_response_status="14", response_flags="FI") == 3)

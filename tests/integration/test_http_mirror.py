"""Request mirroring through the daemons on the simulated cluster: a route copies requests
to shadow services on the other node (over HBONE), and the client sees only the primary.

Each test asserts what a user would notice: the shadow's request count and the authority
it saw, the client's statuses, bodies and latency, and the mirror counter's deltas.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import fqdn, metric_sum, wait_for

pytestmark = pytest.mark.privileged

APP = 8080
GRPC = 50051
HOST = "web.default.svc.cluster.local"
MIRRORED = "nodeproxy_http_mirrored_requests_total"



def mirror_rule(prefix: str, shadow: str, percentage: float = 100) -> dict[str, Any]:
    return {"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
            "mirrors": [{"backendRef": {"name": shadow}, "percentage": percentage}]}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-a", labels={"app": "web"}, service_account="web")
        # The shadows are on the other node: copies cross in HBONE.
        c.add_pod("node1", "shadow-b", labels={"app": "shadow"}, service_account="shadow")
        c.add_pod("node1", "slow-b", labels={"app": "slow-shadow"}, service_account="shadow")
        c.add_pod("node1", "failing-b", labels={"app": "failing-shadow"},
                  service_account="shadow")
        c.add_pod("node1", "dead-b", labels={"app": "dead-shadow"}, service_account="shadow")
        c.serve_http("web-a", APP, None, "--log", os.path.join(c.dir, "web-a.jsonl"))
        c.serve_http("shadow-b", APP, None, "--log", os.path.join(c.dir, "shadow-b.jsonl"))
        c.serve_http("slow-b", APP, None, "--delay-ms", "1000",
                     "--log", os.path.join(c.dir, "slow-b.jsonl"))
        c.serve_http("failing-b", APP, None, "--status", "503")
        c.add_pod("node0", "grpc-a", labels={"app": "grpc"}, service_account="grpc")
        c.add_pod("node1", "grpc-shadow-b", labels={"app": "grpc-shadow"},
                  service_account="grpc")
        c.serve_grpc("grpc-a", GRPC)
        c.serve_grpc("grpc-shadow-b", GRPC)
        # dead-b serves nothing: a connection to it is refused.
        for name in ("web", "shadow", "slow-shadow", "failing-shadow", "dead-shadow"):
            c.add_service(name, port=80, target_port=APP, app_protocol="http")
        for name in ("grpc", "grpc-shadow"):
            c.add_service(name, port=GRPC, target_port=GRPC, app_protocol="grpc")
        c.add_service("empty-shadow", port=80, target_port=APP, app_protocol="http",
                      selector={"app": "nobody"})
        c.write_configs(overrides={"httpRoutes": [{"name": "web", "service": "web", "rules": [
            mirror_rule("/m", "shadow"),
            mirror_rule("/half", "shadow", 50),
            mirror_rule("/slow", "slow-shadow"),
            mirror_rule("/failing", "failing-shadow"),
            mirror_rule("/dead", "dead-shadow"),
            mirror_rule("/empty", "empty-shadow"),
            {},  # everything else: not mirrored
        ]}, {"name": "grpc", "service": "grpc", "rules": [
            {"mirrors": [{"backendRef": {"name": "grpc-shadow"}}]}]}]})
        c.start_daemons()
        yield c


def requests(c: Cluster, path: str, n: int = 1, *extra: str, host: str = HOST
             ) -> dict[str, Any]:
    url = f"http://{c.services['default/web'].address(4)}{path}"
    out = c.run_in_pod("client", [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests",
                                  "--url", url, "-n", str(n), "--header", f"host: {host}",
                                  *extra], timeout=120, check=True)
    return json.loads(out.stdout)


def logged(c: Cluster, pod: str, token: str) -> list[dict[str, Any]]:
    """The backend's request-log lines whose path contains token."""
    path = os.path.join(c.dir, f"{pod}.jsonl")
    if not os.path.exists(path):
        return []
    lines = [json.loads(line) for line in open(path).read().splitlines() if line]
    return [line for line in lines if token in line["path"]]


def mirrored(c: Cluster, shadow: str, result: str, reason: str) -> float:
    return metric_sum(c.metrics("node0"), MIRRORED, destination_service=fqdn(shadow),
                      result=result, reason=reason)


def token() -> str:
    return uuid.uuid4().hex[:12]


def backend_stats(c: Cluster, pod: str) -> dict[str, Any]:
    """/stats of a backend, asked from its own node (not through a route: not mirrored)."""
    ip = c.pods[pod].ip4
    out = c.run_in_node(c.pods[pod].node,
                        ["curl", "-sS", "--max-time", "5", f"http://{ip}:{APP}/stats"])
    return json.loads(out.stdout)


def test_every_request_reaches_the_shadow_with_a_shadow_authority(mesh: Cluster):
    t = token()
    requests_before = metric_sum(mesh.metrics("node0"), "istio_requests_total",
                                 destination_service=fqdn("shadow"))
    sent_before = mirrored(mesh, "shadow", "sent", "200")
    n = 50
    result = requests(mesh, f"/m/{t}/info", n)
    # The client saw only the primary: its statuses and bodies.
    assert result["statuses"] == {"200": n}
    assert result["backends"] == {"web-a": n}
    bodies = [json.loads(r["body"]) for r in result["results"]]
    assert {b["name"] for b in bodies} == {"web-a"}
    assert {b["headers"]["host"] for b in bodies} == {HOST}
    # The shadow, on the other node, got exactly one copy of each, marked -shadow, with
    # the primary's request id, from the client pod's address (its identity, over HBONE).
    assert wait_for(lambda: len(logged(mesh, "shadow-b", t)) == n, timeout=10), \
        len(logged(mesh, "shadow-b", t))
    copies = logged(mesh, "shadow-b", t)
    assert {line["headers"]["host"] for line in copies} == {f"{HOST}-shadow"}
    assert {line["method"] for line in copies} == {"GET"}
    assert sorted(line["headers"]["x-request-id"] for line in copies) == \
        sorted(b["headers"]["x-request-id"] for b in bodies)
    client_ip = mesh.pods["client"].ip4
    assert {line["peer"].rsplit(":", 1)[0].removeprefix("::ffff:") for line in copies} == \
        {client_ip}
    assert len(logged(mesh, "web-a", t)) == n  # the primary got each once too
    assert wait_for(lambda: mirrored(mesh, "shadow", "sent", "200") - sent_before == n)
    # Copies are not requests the client made: istio_requests_total does not count them.
    assert metric_sum(mesh.metrics("node0"), "istio_requests_total",
                      destination_service=fqdn("shadow")) == requests_before


def test_a_host_with_a_port_gets_the_suffix_before_the_port(mesh: Cluster):
    t = token()
    assert requests(mesh, f"/m/{t}", 3, host=f"{HOST}:80")["statuses"] == {"200": 3}
    assert wait_for(lambda: len(logged(mesh, "shadow-b", t)) == 3, timeout=10)
    assert {line["headers"]["host"] for line in logged(mesh, "shadow-b", t)} == \
        {f"{HOST}-shadow:80"}


def test_requests_off_the_mirrored_rules_are_not_copied(mesh: Cluster):
    t = token()
    assert requests(mesh, f"/plain/{t}", 10)["statuses"] == {"200": 10}
    time.sleep(0.5)
    assert logged(mesh, "shadow-b", t) == []
    assert len(logged(mesh, "web-a", t)) == 10


def test_a_slow_shadow_does_not_slow_the_client(mesh: Cluster):
    """The shadow answers after 1 s; the client's latency stays the unmirrored one."""
    t = token()
    n = 20
    requests(mesh, f"/plain/{t}/warm", 5)
    plain = requests(mesh, f"/plain/{t}", n)
    slow = requests(mesh, f"/slow/{t}", n)
    assert plain["statuses"] == slow["statuses"] == {"200": n}
    assert slow["backends"] == {"web-a": n}
    base = statistics.median(r["seconds"] for r in plain["results"])
    mirrored_median = statistics.median(r["seconds"] for r in slow["results"])
    worst = max(r["seconds"] for r in slow["results"])
    print(f"median unmirrored {base * 1000:.1f} ms, mirrored to a 1 s shadow "
          f"{mirrored_median * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
    assert mirrored_median < base + 0.1, (base, mirrored_median)
    assert worst < 0.5, worst  # not one waited for the 1 s shadow
    # ... and the copies did reach it, each a second later.
    assert wait_for(lambda: len(logged(mesh, "slow-b", t)) == n, timeout=10)


@pytest.mark.parametrize("prefix,shadow,result,reason", [
    ("/failing", "failing-shadow", "sent", "503"),
    ("/dead", "dead-shadow", "failed", "connect_failure"),
    ("/empty", "empty-shadow", "skipped", "no_endpoints"),
])
def test_a_failing_shadow_never_changes_the_clients_response(
        mesh: Cluster, prefix: str, shadow: str, result: str, reason: str):
    before = mirrored(mesh, shadow, result, reason)
    n = 20
    got = requests(mesh, f"{prefix}/{token()}/bytes/3000", n)
    assert got["statuses"] == {"200": n}
    assert got["backends"] == {"web-a": n}
    assert {r["sha256"] for r in got["results"]} == {got["results"][0]["headers"]["x-sha256"]}
    assert wait_for(lambda: mirrored(mesh, shadow, result, reason) - before == n, timeout=10), \
        mesh.metrics("node0")
    if result != "sent":
        # Logged with its reason, rate limited: not one line per request.
        lines = [line for line in mesh.daemon_output("node0", tail=200000).splitlines()
                 if f"mirror to {fqdn(shadow)} {result}: {reason}" in line]
        assert 1 <= len(lines) <= 2, lines


def test_half_the_requests_are_mirrored_at_50_percent(mesh: Cluster):
    t = token()
    n = 400
    sent_before = mirrored(mesh, "shadow", "sent", "200")
    result = requests(mesh, f"/half/{t}", n)
    assert result["statuses"] == {"200": n}
    time.sleep(0.3)
    # Settled: every copy the shadow logged is counted as sent, and no more.
    assert wait_for(lambda: mirrored(mesh, "shadow", "sent", "200") - sent_before
                    == len(logged(mesh, "shadow-b", t)))
    count = len(logged(mesh, "shadow-b", t))
    sd = math.sqrt(n * 0.25)
    print(f"{count} of {n} mirrored at 50% (mean {n / 2}, SD {sd:.1f})")
    assert abs(count - n / 2) <= 4 * sd, count


def test_a_post_body_is_mirrored_intact_and_a_larger_one_not_at_all(mesh: Cluster):
    """Bodies within http.retryBufferBytes (64 KiB) are copied whole; a larger one goes to
    the primary only, and the copy is counted as skipped."""
    def digest(size: int) -> str:
        return hashlib.sha256(bytes(i % 251 for i in range(size))).hexdigest()

    small, large = 50_000, 200_000
    before = backend_stats(mesh, "shadow-b")["bodies"]
    too_large = mirrored(mesh, "shadow", "skipped", "body_too_large")
    got = requests(mesh, f"/m/{token()}/echo", 5, "--method", "POST",
                   "--body-bytes", str(small))
    assert got["statuses"] == {"200": 5}
    assert {r["sha256"] for r in got["results"]} == {digest(small)}
    assert wait_for(lambda: backend_stats(mesh, "shadow-b")["bodies"].get(digest(small), 0)
                    - before.get(digest(small), 0) == 5, timeout=10)
    got = requests(mesh, f"/m/{token()}/echo", 3, "--method", "POST",
                   "--body-bytes", str(large))
    assert got["statuses"] == {"200": 3}
    assert {r["sha256"] for r in got["results"]} == {digest(large)}
    assert wait_for(lambda: mirrored(mesh, "shadow", "skipped", "body_too_large")
                    - too_large == 3)
    assert digest(large) not in backend_stats(mesh, "shadow-b")["bodies"]


def test_grpc_calls_are_mirrored_over_http2(mesh: Cluster):
    """HTTP/2 upstream, a body without Content-Length, trailers: the shadow serves each
    call once with the same payload, and the client sees only the primary's answers.
    The backends count calls per key (Fail's ``key:0:code`` never fails, and its
    x-attempt trailer is the key's count)."""
    grpc = mesh.services["default/grpc"]
    key = token()
    sent_before = mirrored(mesh, "grpc-shadow", "sent", "200")
    n = 10
    calls = mesh.grpc_client("client", "--target", f"{grpc.vip4}:{GRPC}", "--method",
                             "Fail", "--payload", f"{key}:0:14", "--count", str(n))
    assert calls["codes"] == {"OK": n}, calls
    trailers = [dict(c["trailing_metadata"]) for c in calls["calls"]]
    assert {t.get("x-backend") for t in trailers} == {"grpc-a"}
    assert [t.get("x-attempt") for t in trailers] == [str(i) for i in range(1, n + 1)]
    assert wait_for(lambda: mirrored(mesh, "grpc-shadow", "sent", "200") - sent_before == n)
    # Asked directly (the shadow service has no route, so this call is not mirrored).
    shadow = mesh.services["default/grpc-shadow"]
    direct = mesh.grpc_client("client", "--target", f"{shadow.vip4}:{GRPC}", "--method",
                              "Fail", "--payload", f"{key}:0:14")
    assert direct["codes"] == {"OK": 1}, direct
    assert dict(direct["calls"][0]["trailing_metadata"]).get("x-attempt") == str(n + 1)

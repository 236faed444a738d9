"""L7 HTTP through the daemons on the simulated cluster: real HTTP servers in pods
(nodeproxy_dev.testbed.http_backend, grpcio), real clients (curl, the stdlib client, a
grpcio client), mTLS between nodes.  Each test asserts what a user would see: who
answered, the status, the bytes, the timing, and the metrics and log lines that
count it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import access_log_entries, fqdn, metric_sum, wait_for

pytestmark = pytest.mark.privileged

APP = 8080
GRPC = 50051
CLIENT_SA = "cluster.local/ns/default/sa/client"

FAST_RETRY = {"baseSeconds": 0.005, "maxSeconds": 0.02}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client",
                  settings={"accessLog": True})
        c.add_pod("node0", "other", labels={"app": "other"}, service_account="other")
        c.add_pod("node0", "web-a", labels={"app": "web"}, service_account="web")
        c.add_pod("node1", "web-b", labels={"app": "web"}, service_account="web")
        c.add_pod("node1", "canary", labels={"app": "canary"}, service_account="web")
        c.add_pod("node0", "single", labels={"app": "single"}, service_account="single")
        c.add_pod("node0", "fast", labels={"app": "lb"}, service_account="lb")
        c.add_pod("node1", "slow", labels={"app": "lb"}, service_account="lb")
        c.add_pod("node1", "guarded", labels={"app": "guarded"}, service_account="guarded")
        c.add_pod("node1", "grpc-1", labels={"app": "grpc"}, service_account="grpc")
        c.add_pod("node0", "banner", labels={"app": "banner"}, service_account="banner")
        c.add_pod("node1", "nginx-h2", labels={"app": "h2web"}, service_account="h2web")
        for pod in ("web-a", "web-b", "canary", "single", "fast", "guarded"):
            c.serve_http(pod, APP)
        c.serve_http("slow", APP, "slow", "--delay-ms", "40")
        c.serve_grpc("grpc-1", GRPC)
        c.serve_h2c("nginx-h2", APP)
        # A server-first protocol on an undeclared port: it greets before the client speaks.
        c.spawn_in_pod("banner", ["socat", f"TCP-LISTEN:{APP},fork,reuseaddr",
                                  "SYSTEM:'echo 220 banner-ready; cat'"])
        c.add_service("web", port=80, target_port=APP, app_protocol="http")
        c.add_service("canary", port=80, target_port=APP, app_protocol="http")
        c.add_service("single", port=80, target_port=APP, app_protocol="http",
                      traffic_policy={"retryBudget": {"ratio": 0.2,
                                                      "minRetriesPerSecond": 0.1}})
        c.add_service("detected", port=80, target_port=APP, selector={"app": "single"})
        c.add_service("least", port=80, target_port=APP, selector={"app": "lb"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": {"policy": "LEAST_REQUEST"}})
        c.add_service("ewma", port=80, target_port=APP, selector={"app": "lb"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": {"policy": "PEAK_EWMA"}})
        c.add_service("hashed", port=80, target_port=APP, selector={"app": "web"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": {"policy": "RING_HASH",
                                                       "hashHeader": "x-user"}})
        c.add_service("rr", port=80, target_port=APP, selector={"app": "web"},
                      app_protocol="http",
                      traffic_policy={"loadBalancer": {"policy": "ROUND_ROBIN"}})
        c.add_service("guarded", port=80, target_port=APP, app_protocol="http")
        c.add_service("guarded-auto", port=80, target_port=APP, selector={"app": "guarded"})
        c.add_service("grpc", port=GRPC, target_port=GRPC, app_protocol="grpc")
        c.add_service("h2web", port=80, target_port=APP, app_protocol="http2")
        c.add_service("banner", port=2525, target_port=APP)
        c.add_service("narrow", port=80, target_port=APP, selector={"app": "single"},
                      app_protocol="http")
        c.write_configs(overrides={
            "http": {"accessLog": {"path": os.path.join(c.dir, "access.log")}},
            "httpRoutes": [
                {"name": "web-routes", "service": "web", "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                     "backendRefs": [{"name": "canary"}]},
                    {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                     "backendRefs": [{"name": "canary"}]},
                    {"matches": [{"path": {"type": "Exact", "value": "/echo"},
                                  "method": "PUT"}],
                     "backendRefs": [{"name": "canary"}]},
                    {"matches": [{"path": {"type": "RegularExpression",
                                           "value": "/re/[0-9]+"}}],
                     "backendRefs": [{"name": "canary"}]},
                    {"matches": [{"queryParams": [{"name": "to", "value": "canary"}]}],
                     "backendRefs": [{"name": "canary"}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
                     "backendRefs": [{"name": "web", "weight": 90},
                                     {"name": "canary", "weight": 10}]},
                    {"requestHeaders": {"set": [{"name": "x-route", "value": "default"}],
                                        "remove": ["x-secret"]},
                     "responseHeaders": {"add": [{"name": "x-route-seen",
                                                  "value": "default"}]}},
                ]},
                {"name": "narrow-routes", "service": "narrow", "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/allowed"}}]}]},
                {"name": "single-routes", "service": "single", "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/fail"}}],
                     "retry": {"attempts": 3, "retryOn": ["5xx"], "backoff": FAST_RETRY}},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/reset"}}],
                     "retry": {"attempts": 3, "retryOn": ["reset"], "backoff": FAST_RETRY}},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/status"}}],
                     "retry": {"attempts": 5, "retryOn": ["5xx"], "backoff": FAST_RETRY}},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}}],
                     "retry": {"attempts": 0, "perTryTimeoutSeconds": 0.3},
                     "timeouts": {"requestSeconds": 5}},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/slow-request"}}],
                     "timeouts": {"requestSeconds": 0.5}},
                    {"retry": {"attempts": 0}},
                ]},
            ],
            "authorizationPolicies": [
                {"name": "guarded-l7", "namespace": "default",
                 "selector": {"app": "guarded"}, "action": "ALLOW", "rules": [
                     {"from": [{"source": {"principals": [CLIENT_SA]}}],
                      "to": [{"operation": {"methods": ["GET"], "paths": ["/public*"]}}]},
                 ]},
            ],
        })
        c.start_daemons()
        yield c


def requests(c: Cluster, url: str, n: int = 1, *extra: str, pod: str = "client",
             timeout: float = 120.0) -> dict[str, Any]:
    out = c.run_in_pod(pod, [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests",
                             "--url", url, "-n", str(n), *extra], timeout=timeout, check=True)
    return json.loads(out.stdout)


def url(c: Cluster, service: str, path: str = "/", family: int = 4) -> str:
    return f"http://{c.services[f'default/{service}'].address(family)}{path}"


def metric(c: Cluster, node: str, name: str, **labels: str) -> float:
    return metric_sum(c.metrics(node), name, **labels)



# --- protocol handling ---------------------------------------------------------------------


def test_requests_are_balanced_per_request_over_pooled_connections(mesh: Cluster):
    """One client connection, 40 requests: both endpoints answer (per request, not per
    connection), and the backends see far fewer connections than requests."""
    result = requests(mesh, url(mesh, "rr", "/bytes/1000"), 40)
    assert result["connections"] == 1
    assert result["statuses"] == {"200": 40}
    assert result["backends"] == {"web-a": 20, "web-b": 20}, result["backends"]
    for r in result["results"]:
        assert r["headers"]["x-sha256"] == r["sha256"]
    first = json.loads(requests(mesh, url(mesh, "single", "/stats"))["results"][0]["body"])
    requests(mesh, url(mesh, "single", "/status/200"), 30, "--new-connections")
    last = json.loads(requests(mesh, url(mesh, "single", "/stats"))["results"][0]["body"])
    # 31 client connections, 32 requests: the backend saw the pooled connection reused.
    assert last["connections_total"] - first["connections_total"] <= 2, (first, last)


def test_ipv6_vip(mesh: Cluster):
    """A client of the IPv6 VIP is balanced over the IPv6 endpoints, cross node too."""
    result = requests(mesh, url(mesh, "rr", "/bytes/2000", family=6), 10)
    assert result["statuses"] == {"200": 10}
    assert result["backends"] == {"web-a": 5, "web-b": 5}
    body = requests(mesh, url(mesh, "rr", "/headers", family=6), 2)["results"]
    peers = {json.loads(r["body"])["peer"].rsplit(":", 1)[0] for r in body}
    # The backends listen dual stack: an IPv4 client would show as ::ffff:a.b.c.d.
    assert all(":" in peer and "::ffff:" not in peer for peer in peers), peers


def test_detected_http_on_an_undeclared_port(mesh: Cluster):
    before = metric(mesh, "node0", "istio_requests_total", destination_service=fqdn("detected"))
    result = requests(mesh, url(mesh, "detected", "/echo"), 3, "--method", "POST",
                      "--body-bytes", "100000")
    assert result["statuses"] == {"200": 3}
    # Counted per request: the sniffer found HTTP on the undeclared port.
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("detected")) - before == 3)


@pytest.mark.parametrize("service", ["detected", "web"])
def test_a_request_line_split_across_packets(mesh: Cluster, service: str):
    """The first bytes arrive in pieces: the sniffer waits for enough of them."""
    svc = mesh.services[f"default/{service}"]
    script = (
        f"import socket,time;s=socket.create_connection(('{svc.vip4}',{svc.port}),5);"
        "s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1);s.sendall(b'G');"
        "time.sleep(0.03);s.sendall(b'E');time.sleep(0.03);"
        "s.sendall(b'T /status/203 HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');"
        "s.settimeout(5);print(s.recv(100).split(b'\\r\\n')[0].decode())")
    out = mesh.run_in_pod("client", [sys.executable, "-c", script], check=True).stdout
    assert out.strip() == "HTTP/1.1 203 Status" or out.startswith("HTTP/1.1 203"), out


def test_server_first_protocol_is_not_delayed(mesh: Cluster):
    """The banner of a server that speaks first arrives before the detection timeout."""
    service = mesh.services["default/banner"]
    script = ("import socket,time,sys;s=socket.create_connection(('%s',%d),5);t=time.monotonic();"  # noqa: UP031
              "d=s.recv(100);print(time.monotonic()-t, d.decode().strip());"
              "s.sendall(b'hello\\n');print(s.recv(100).decode().strip())"
              % (service.vip4, service.port))
    out = mesh.run_in_pod("client", [sys.executable, "-c", script], check=True).stdout.split("\n")
    waited, banner = out[0].split(" ", 1)
    assert banner == "220 banner-ready"
    assert float(waited) < 0.09, f"banner took {waited} s (detection timeout is 0.1 s)"
    assert out[1] == "hello"


def test_large_bodies_stream_both_ways_intact(mesh: Cluster):
    out = mesh.run_in_pod("client", [
        "sh", "-c", "head -c 20000000 /dev/urandom > /tmp/np-body && sha256sum /tmp/np-body "
        f"&& curl -sS -T /tmp/np-body -H 'content-type: application/octet-stream' "
        f"-X POST {url(mesh, 'web', '/echo')} | sha256sum && rm -f /tmp/np-body"],
        timeout=120, check=True).stdout.split("\n")
    assert out[0].split()[0] == out[1].split()[0]


def test_chunked_upload_and_expect_continue(mesh: Cluster):
    out = mesh.run_in_pod("client", [
        "sh", "-c", "head -c 300000 /dev/zero | curl -sS -H 'Transfer-Encoding: chunked' "
        f"-H 'Expect: 100-continue' --data-binary @- -w '\\n%{{http_code}}' "
        f"{url(mesh, 'web', '/echo')} | tail -c 4"], check=True).stdout
    assert out.strip() == "200"


def test_pipelined_requests_are_answered_in_order(mesh: Cluster):
    service = mesh.services["default/web"]
    script = (
        "import socket;s=socket.create_connection(('%s',%d),5);"  # noqa: UP031
        "s.sendall(b''.join(b'GET /status/%%d HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n' %% c "
        "for c in (201,202,203)));d=b'';import time;t=time.time()\n"
        "while d.count(b'HTTP/1.1')<3 and time.time()-t<10: d+=s.recv(65536)\n"
        "import re;print([c.decode() for c in re.findall(rb'HTTP/1.1 (\\d+)', d)])"
        % (service.vip4, service.port))
    out = mesh.run_in_pod("client", [sys.executable, "-c", script], check=True).stdout
    assert out.strip() == "['201', '202', '203']"


def test_http2_prior_knowledge_to_an_http1_backend(mesh: Cluster):
    out = mesh.run_in_pod("client", [
        "curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
        "%{http_version} %{http_code}", url(mesh, "web", "/bytes/100000")], check=True).stdout
    assert out == "2 200"


def test_h2load_and_curl_through_http2_to_nginx(mesh: Cluster):
    """h2load's 2000 requests on 4 connections x 10 streams, cross node to nginx speaking
    HTTP/2 (prior knowledge) upstream: every one answered, each counted once."""
    address = mesh.services["default/h2web"].address(4)
    before = metric(mesh, "node0", "istio_requests_total", destination_service=fqdn("h2web"))
    out = mesh.run_in_pod("client", ["h2load", "-n", "2000", "-c", "4", "-m", "10",
                                     f"http://{address}/status/200"], timeout=120,
                          check=True).stdout
    assert "2000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 2000 2xx" in out, out
    curl = mesh.run_in_pod("client", ["curl", "-sS", "-H", "x-test: hello",
                                      f"http://{address}/request"], check=True).stdout
    # An HTTP/1.1 client, an HTTP/2 upstream: nginx saw HTTP/2 and the header.
    assert curl.startswith("nginx-h2 GET /request HTTP/2.0") and "x-test=hello" in curl
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("h2web")) - before == 2001)


def test_grpc_unary_and_streaming_with_trailers(mesh: Cluster):
    target = f"{mesh.services['default/grpc'].vip4}:{GRPC}"
    unary = mesh.grpc_client("client", "--target", target, "--method", "Unary",
                             "--payload", "hello", "--count", "5")
    assert unary["codes"] == {"OK": 5}, unary
    call = unary["calls"][0]
    assert call["responses"][0]["text"] == "hello"
    assert dict(call["trailing_metadata"]).get("x-backend") == "grpc-1"
    stream = mesh.grpc_client("client", "--target", target, "--method", "ServerStream",
                              "--payload", "50:1000")
    assert stream["codes"] == {"OK": 1}
    assert len(stream["calls"][0]["responses"]) == 50
    bidi = mesh.grpc_client("client", "--target", target, "--method", "BidiStream",
                            "--payload", "abc", "--messages", "20")
    assert bidi["codes"] == {"OK": 1} and len(bidi["calls"][0]["responses"]) == 20
    failed = mesh.grpc_client("client", "--target", target, "--method", "Fail",
                              "--payload", "5")
    assert failed["codes"] == {"NOT_FOUND": 1}
    assert dict(failed["calls"][0]["trailing_metadata"]).get("x-backend") == "grpc-1"
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("grpc"), request_protocol="grpc",
                                   grpc_response_status="5") == 1)
    assert metric(mesh, "node0", "istio_requests_total", destination_service=fqdn("grpc"),
                  grpc_response_status="0") == 7


def test_websocket_upgrade(mesh: Cluster):
    service = mesh.services["default/web"]
    script = (
        "import asyncio,aiohttp\n"  # noqa: UP031
        "async def m():\n"
        "  async with aiohttp.ClientSession() as s:\n"
        "    async with s.ws_connect('http://%s:%d/ws') as ws:\n"
        "      await ws.send_str('ping-1'); print((await ws.receive()).data)\n"
        "      await ws.send_str('ping-2'); print((await ws.receive()).data)\n"
        "asyncio.run(m())" % (service.vip4, service.port))
    out = mesh.run_in_pod("client", [sys.executable, "-c", script], check=True).stdout
    assert out.split() == ["ping-1", "ping-2"]


# --- routes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path,extra,backend", [
    ("/v2/x", (), "canary"),
    ("/other", ("--header", "x-canary: yes"), "canary"),
    ("/echo", ("--method", "PUT"), "canary"),
    ("/re/123", (), "canary"),
    ("/re/abc", (), "web"),
    ("/q?to=canary", (), "canary"),
    ("/echo", ("--method", "POST"), "web"),
    ("/v2x", (), "web"),
])
def test_routes_pick_the_backend(mesh: Cluster, path: str, extra: tuple[str, ...],
                                 backend: str):
    result = requests(mesh, url(mesh, "web", path), 4, *extra)
    backends = set(result["backends"])
    if backend == "canary":
        assert backends == {"canary"}, result["backends"]
    else:
        assert backends <= {"web-a", "web-b"}, result["backends"]


def test_header_filters(mesh: Cluster):
    result = requests(mesh, url(mesh, "web", "/headers"), 1, "--header", "x-secret: s3cret")
    seen = json.loads(result["results"][0]["body"])["headers"]
    seen = {k.lower(): v for k, v in seen.items()}
    assert seen.get("x-route") == "default"
    assert "x-secret" not in seen
    assert result["results"][0]["headers"]["x-route-seen"] == "default"


def test_weighted_split_90_10(mesh: Cluster):
    n = 600
    result = requests(mesh, url(mesh, "web", "/split"), n)
    canary = result["backends"].get("canary", 0)
    # Binomial(600, 0.1): mean 60, sd 7.3; 4 sd either side fails 1 run in 15 000.
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(canary - 60) <= 4 * sd, result["backends"]


# --- retries and timeouts ---------------------------------------------------------------------


def test_backend_failing_twice_then_succeeding_gives_200_with_two_retries(mesh: Cluster):
    # "detected" (one endpoint, the default retry budget): "single"'s tight budget would
    # allow only one retry when this test runs alone.
    before = metric(mesh, "node0", "nodeproxy_http_retries_total",
                    destination_service=fqdn("detected"))
    result = requests(mesh, url(mesh, "detected", "/fail/twice-1/2/503"))
    assert result["statuses"] == {"200": 1}
    after = metric(mesh, "node0", "nodeproxy_http_retries_total",
                   destination_service=fqdn("detected"))
    assert after - before == 2
    log = access_log_lines(mesh, "/fail/twice-1/2/503")
    assert [line["attempts"] for line in log] == [3]
    # The answering (third) attempt carries one attempt count, not one per retry.
    out = mesh.run_in_pod("client", ["curl", "-s", url(mesh, "detected", "/fail/twice-2/2/503")],
                          check=True)
    sent = json.loads(out.stdout)["header_list"]
    assert [v for k, v in sent if k.lower() == "x-envoy-attempt-count"] == ["3"]


def test_reset_before_response_is_retried(mesh: Cluster):
    result = requests(mesh, url(mesh, "single", "/reset/r-1/1"))
    assert result["statuses"] == {"200": 1}


def test_retry_budget_stops_a_retry_storm(mesh: Cluster):
    """Always 503 with 5 retries each: without a budget 200 requests would cost 1000
    retries; the budget (20% + 1) lets about 41 through."""
    before = metric(mesh, "node0", "nodeproxy_http_retries_total",
                    destination_service=fqdn("single"))
    result = requests(mesh, url(mesh, "single", "/status/503"), 200)
    assert result["statuses"] == {"503": 200}
    retries = metric(mesh, "node0", "nodeproxy_http_retries_total",
                     destination_service=fqdn("single")) - before
    assert 5 <= retries <= 0.2 * 200 + 10, retries
    assert metric(mesh, "node0", "nodeproxy_http_retry_budget_exhausted_total",
                  destination_service=fqdn("single")) > 0


def test_per_try_timeout_fires_at_its_value(mesh: Cluster):
    result = requests(mesh, url(mesh, "single", "/delay/3000"), 3)
    assert result["statuses"] == {"504": 3}
    for r in result["results"]:
        assert 0.29 <= r["seconds"] <= 0.6, r["seconds"]


def test_request_timeout(mesh: Cluster):
    result = requests(mesh, url(mesh, "single", "/slow-request/delay/3000"), 1)
    assert result["statuses"] == {"504": 1}
    assert 0.49 <= result["results"][0]["seconds"] <= 1.0
    assert result["results"][0]["body"] == "upstream request timeout"


def test_backend_reset_mid_response_is_reported_and_never_hangs(mesh: Cluster):
    start = time.monotonic()
    result = requests(mesh, url(mesh, "single", "/reset-mid/50000"), 1, "--timeout", "20")
    assert time.monotonic() - start < 10
    assert result["results"][0]["status"] is None  # the client saw the break
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("single"),
                                   response_flags="UC") >= 1)


# --- load balancing ---------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["least", "ewma"])
def test_balancers_prefer_the_fast_endpoint(mesh: Cluster, service: str):
    """The slow endpoint takes 40 ms per request; 4 concurrent clients, 50 requests each."""
    procs = [mesh.spawn_in_pod("client", [
        sys.executable, "-m", "nodeproxy_dev.testbed.http_requests", "--url",
        url(mesh, service, "/"), "-n", "50"], stdout=subprocess.PIPE, text=True)
        for _ in range(4)]
    counts: dict[str, int] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        for name, n in json.loads(out)["backends"].items():
            counts[name] = counts.get(name, 0) + n
    assert counts.get("fast", 0) > 2 * counts.get("slow", 0), counts


def test_ring_hash_keeps_a_header_value_on_one_endpoint(mesh: Cluster):
    seen: dict[str, set[str]] = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        result = requests(mesh, url(mesh, "hashed", "/"), 10, "--header", f"x-user: {user}")
        assert result["statuses"] == {"200": 10}, (
            [r for r in result["results"] if r["status"] != 200],
            [line for line in access_log_lines(mesh, "/") if line["duration_ms"] > 900
             or line["status"] != 200][-5:], mesh.daemon_output("node0")[-3000:])
        seen[user] = set(result["backends"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set().union(*seen.values())) == 2, seen  # the users spread over both


# --- authorization -----------------------------------------------------------------------------


def test_l7_authorization_by_path_method_and_identity(mesh: Cluster):
    assert requests(mesh, url(mesh, "guarded", "/public/x"))["statuses"] == {"200": 1}
    denied = requests(mesh, url(mesh, "guarded", "/private"))
    assert denied["statuses"] == {"403": 1}
    assert denied["results"][0]["body"] == "RBAC: access denied"
    assert requests(mesh, url(mesh, "guarded", "/public/x"), 1, "--method", "POST"
                    )["statuses"] == {"403": 1}
    assert requests(mesh, url(mesh, "guarded", "/public/x"), pod="other"
                    )["statuses"] == {"403": 1}
    assert metric(mesh, "node0", "istio_requests_total", destination_service=fqdn("guarded"),
                  response_code="403", response_flags="UAEX") >= 3


def test_l7_authorization_on_a_sniffed_port(mesh: Cluster):
    """Undeclared port: no connection is opened ahead of the first request (it would be
    judged at L4 and refused); the requests are authorized one by one."""
    assert requests(mesh, url(mesh, "guarded-auto", "/public/y"))["statuses"] == {"200": 1}
    assert requests(mesh, url(mesh, "guarded-auto", "/private"))["statuses"] == {"403": 1}


def test_l4_connection_to_an_l7_guarded_workload_is_judged_request_by_request(mesh: Cluster):
    """A connection straight to the pod's IP is not HTTP-routed by the source node; the
    guarded pod is on another node, whose proxy judges each request on the HBONE stream
    itself (the source's say is not believed): the rule's GET /public* passes, anything
    else is refused before it reaches the application."""
    guarded = mesh.pods["guarded"]

    def first_line(request: bytes) -> str:
        script = ("import socket\ntry:\n s=socket.create_connection(('%s',%d),5)\n"  # noqa: UP031
                  " s.sendall(%r)\n"
                  " print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
                  "except OSError as e: print('refused', e)" % (guarded.ip4, APP, request))
        return mesh.run_in_pod("client", [sys.executable, "-c", script]).stdout.strip()

    assert first_line(b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n") == "HTTP/1.1 200 OK"
    for refused in (b"GET /private HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /public HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n",
                    b"GET /%70ublic/../private HTTP/1.1\r\nHost: x\r\n\r\n"):
        line = first_line(refused)
        assert not line.startswith("HTTP/1.1 2"), (refused, line)


# --- observability --------------------------------------------------------------------------


def access_log_lines(c: Cluster, path: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def read() -> bool:
        found[:] = [line for line in access_log_entries(c.dir) if line["path"] == path]
        return bool(found)

    wait_for(read, timeout=5)
    return found


def test_metrics_and_access_log_match_the_requests_one_for_one(mesh: Cluster):
    path = "/status/201?tag=one-for-one"
    before = metric(mesh, "node0", "istio_requests_total", destination_service=fqdn("web"),
                    response_code="201")
    timed = metric(mesh, "node0", "istio_request_duration_milliseconds_count",
                   destination_service=fqdn("web"), response_code="201")
    result = requests(mesh, url(mesh, "web", path), 17)
    assert result["statuses"] == {"201": 17}
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("web"),
                                   response_code="201") - before == 17)
    text = mesh.metrics("node0")
    assert metric_sum(text, "istio_request_duration_milliseconds_count",
                      destination_service=fqdn("web"), response_code="201") - timed == 17
    lines = access_log_lines(mesh, path)
    assert len(lines) == 17
    line = lines[0]
    assert line["method"] == "GET" and line["status"] == 201
    assert line["source_principal"] == "spiffe://" + CLIENT_SA
    assert line["upstream_host"].endswith(f":{APP}")
    assert line["attempts"] == 1 and line["response_flags"] == "-"
    clusters = mesh.admin_json("node0", "/clusters")
    web = [cl for cl in clusters if cl["service"] == "default/web"]
    assert web and {e["address"].rsplit(":", 1)[1] for e in web[0]["endpoints"]} == {str(APP)}


# --- bad input ---------------------------------------------------------------------------------


def raw_exchange(c: Cluster, data: bytes, service: str = "web") -> str:
    """Send `data` on one connection to the service and return all that comes back."""
    svc = c.services[f"default/{service}"]
    payload = os.path.join(c.dir, f"raw-{abs(hash(data))}.bin")
    with open(payload, "wb") as f:
        f.write(data)
    script = (
        f"import socket;s=socket.create_connection(('{svc.vip4}',{svc.port}),5);"
        f"s.settimeout(5);s.sendall(open('{payload}','rb').read());d=b''\n"
        "try:\n while True:\n  b=s.recv(65536)\n  if not b: break\n  d+=b\n"
        "except OSError as e: d+=b' <'+type(e).__name__.encode()+b'>'\n"
        "print(d.hex())")
    out = c.run_in_pod("client", [sys.executable, "-c", script], check=True).stdout
    return bytes.fromhex(out.strip()).decode("latin-1")


@pytest.mark.parametrize("name,data,status", [
    ("bad request line", b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("header block over the limit",
     b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", "431"),
    ("smuggling: Content-Length and Transfer-Encoding",
     b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("smuggling: two different Content-Lengths",
     b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\n"
     b"abcdGET /smuggled HTTP/1.1\r\n\r\n", "400"),
    ("smuggling: Transfer-Encoding not ending in chunked",
     b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
     b"0\r\n\r\n", "400"),
    ("smuggling: obsolete line folding",
     b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
     "400"),
    ("invalid chunk size",
     b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "400"),
])
def test_malformed_requests_get_400_and_close(mesh: Cluster, name: str, data: bytes,
                                              status: str):
    reply = raw_exchange(mesh, data)
    first = reply.split("\r\n", 1)[0]
    assert first.startswith("HTTP/1.1 " + status), (name, reply[:200])
    assert reply.count("HTTP/1.1 ") == 1, reply[:500]  # nothing after it was served
    assert "smuggled" not in reply
    assert requests(mesh, url(mesh, "web", "/status/200"))["statuses"] == {"200": 1}


def test_http2_protocol_error_gets_goaway(mesh: Cluster):
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    # SETTINGS frame with a length that is not a multiple of 6: FRAME_SIZE_ERROR.
    reply = raw_exchange(mesh, preface + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00abcde")
    data = reply.encode("latin-1")
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9:9 + length]))
        data = data[9 + length:]
    goaway = [payload for kind, payload in frames if kind == 7]
    assert goaway, frames
    assert int.from_bytes(goaway[0][4:8], "big") == 6  # FRAME_SIZE_ERROR
    assert requests(mesh, url(mesh, "web", "/status/200"))["statuses"] == {"200": 1}


def test_garbage_to_a_declared_http_port_is_refused_alone(mesh: Cluster):
    reply = raw_exchange(mesh, b"\x16\x03\x01\x02\x00garbage-not-http")
    assert reply.startswith("HTTP/1.1 400"), reply
    assert requests(mesh, url(mesh, "web", "/status/200"))["statuses"] == {"200": 1}


def test_no_route_gets_404_nr(mesh: Cluster):
    assert requests(mesh, url(mesh, "narrow", "/allowed/x"))["statuses"] == {"200": 1}
    result = requests(mesh, url(mesh, "narrow", "/elsewhere"))
    assert result["statuses"] == {"404": 1}
    assert result["results"][0]["body"] == "no route"
    assert wait_for(lambda: metric(mesh, "node0", "istio_requests_total",
                                   destination_service=fqdn("narrow"),
                                   response_flags="NR") == 1)

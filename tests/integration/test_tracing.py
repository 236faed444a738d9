"""Request tracing through the daemons: a client's trace context reaches the backend with
the proxy's span as its parent, and that span reaches a collector.

The collector is ``nodeproxy_dev.testbed.otlp_receiver`` (OTLP/HTTP, parsed with
opentelemetry-proto's classes) on 127.0.0.1:4318 inside node0's netns, where node0's
daemon runs; the client is on node0 and the backend on node1, so each request crosses
the nodes.  The backend echoes the headers it got.  Tests that change the ``tracing``
section reload the daemons and put it back.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy.telemetry.trace_headers import parse_traceparent
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from nodeproxy_dev.testbed.otlp_receiver import read_spans
from tests.integration.observe import metric_sum, wait_for

pytestmark = pytest.mark.privileged

APP = 8080
COLLECTOR = "http://127.0.0.1:4318/v1/traces"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACING = {"enabled": True, "endpoint": COLLECTOR, "samplingPercent": 100,
           "scheduleDelaySeconds": 0.1}


def configure(c: Cluster, tracing: dict[str, Any] | None) -> None:
    overrides: dict[str, Any] = {
        "http": {"accessLog": {"path": os.path.join(c.dir, "access.log")}}}
    if tracing is not None:
        overrides["tracing"] = tracing
    c.write_configs(overrides=overrides)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client",
                  settings={"accessLog": True})
        c.add_pod("node1", "web", labels={"app": "web"}, service_account="web")
        c.serve_http("web", APP)
        c.add_service("web", port=80, target_port=APP, app_protocol="http")
        spans = os.path.join(c.dir, "spans.jsonl")
        receiver = c.spawn_in_node("node0", c.tool_argv("otlp_receiver", "--port", "4318",
                                                        "--out", spans))
        netns.wait_for_port(c.nodes["node0"].netns_path, "127.0.0.1", 4318, 10.0,
                            process=receiver)
        configure(c, TRACING)
        c.start_daemons()
        yield c


@pytest.fixture
def traced(mesh: Cluster) -> Iterator[Cluster]:
    """The mesh with the module's tracing section back in force afterwards."""
    yield mesh
    configure(mesh, TRACING)
    mesh.reload_daemons()


def spans(c: Cluster) -> list[dict[str, Any]]:
    return read_spans(os.path.join(c.dir, "spans.jsonl"))


def span_of_trace(c: Cluster, trace_id: str, timeout: float = 10.0) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found[:] = [s for s in spans(c) if s["trace_id"] == trace_id]
        return bool(found)

    assert wait_for(arrived, timeout), f"no span of trace {trace_id} arrived"
    assert len(found) == 1, found
    return found[0]


def get(c: Cluster, path: str = "/", *headers: str, n: int = 1) -> list[dict[str, Any]]:
    """n requests from the client to the web service; each result with the headers the
    backend saw (``seen``)."""
    argv = [sys.executable, "-m", "nodeproxy_dev.testbed.http_requests", "--url",
            f"http://{c.services['default/web'].address(4)}{path}", "-n", str(n)]
    for header in headers:
        argv += ["--header", header]
    out = c.run_in_pod("client", argv, timeout=120, check=True)
    results = json.loads(out.stdout)["results"]
    for r in results:
        assert r["status"] == 200, r
        r["seen"] = json.loads(r["body"])["headers"]
    return results


def metric(c: Cluster, name: str, **labels: str) -> float:
    return metric_sum(c.metrics("node0"), name, **labels)


def test_w3c_context_gets_the_proxy_span_as_parent(mesh: Cluster):
    sent = f"00-{TRACE}-{PARENT}-01"
    seen = get(mesh, "/w3c", f"traceparent: {sent}", "tracestate: vendor=a1")[0]["seen"]
    trace_id, span_id, sampled = parse_traceparent(seen["traceparent"]) or (0, 0, False)
    assert f"{trace_id:032x}" == TRACE and sampled
    assert f"{span_id:016x}" != PARENT  # the proxy's own span is the backend's parent
    assert seen["tracestate"] == "vendor=a1"
    assert "b3" not in seen and "x-b3-traceid" not in seen  # only the formats that came
    span = span_of_trace(mesh, TRACE)
    assert span["span_id"] == f"{span_id:016x}"
    assert span["parent_span_id"] == PARENT
    assert span["kind"] == "SPAN_KIND_CLIENT" and span["status"] == "STATUS_CODE_UNSET"
    assert span["trace_state"] == "vendor=a1"
    attributes = span["attributes"]
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/w3c"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.request.header.x-request-id"] == seen["x-request-id"]
    assert attributes["nodeproxy.destination.workload"] == "web"
    assert attributes["nodeproxy.source.workload"] == "client"
    assert attributes["network.peer.port"] == APP
    assert span["resource"]["service.name"] == "nodeproxy"
    assert span["resource"]["k8s.node.name"] == "node0"
    assert 0 < span["end_ns"] - span["start_ns"] < 5e9
    # The access log's trace id is the trace the backend saw.
    log = os.path.join(mesh.dir, "access.log")
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        with open(log) as f:
            lines[:] = [json.loads(x) for x in f if '"/w3c"' in x]
        return bool(lines)

    assert wait_for(logged, 5)
    assert lines[-1]["trace_id"] == TRACE
    assert lines[-1]["request_id"] == seen["x-request-id"]


def test_http2_requests_carry_the_context_too(mesh: Cluster):
    trace = os.urandom(16).hex()
    out = mesh.run_in_pod("client", [
        "curl", "-sS", "--http2-prior-knowledge", "-H", f"traceparent: 00-{trace}-{PARENT}-01",
        f"http://{mesh.services['default/web'].address(4)}/h2"], check=True).stdout
    seen = json.loads(out)["headers"]
    span = span_of_trace(mesh, trace)
    assert seen["traceparent"] == f"00-{trace}-{span['span_id']}-01"
    assert span["parent_span_id"] == PARENT
    assert span["attributes"]["network.protocol.version"] == "2"


@pytest.mark.parametrize("form", ["multi", "single"])
def test_b3_in_gives_b3_out(mesh: Cluster, form: str):
    trace = os.urandom(16).hex()
    if form == "multi":
        headers = (f"x-b3-traceid: {trace}", f"x-b3-spanid: {PARENT}", "x-b3-sampled: 1")
    else:
        headers = (f"b3: {trace}-{PARENT}-1",)
    seen = get(mesh, f"/b3-{form}", *headers)[0]["seen"]
    span = span_of_trace(mesh, trace)
    assert span["parent_span_id"] == PARENT
    own = span["span_id"]
    if form == "multi":
        assert (seen["x-b3-traceid"], seen["x-b3-spanid"]) == (trace, own)
        assert seen["x-b3-parentspanid"] == PARENT and seen["x-b3-sampled"] == "1"
        assert "b3" not in seen
    else:
        assert seen["b3"] == f"{trace}-{own}-1-{PARENT}"
        assert "x-b3-traceid" not in seen
    assert seen["traceparent"] == f"00-{trace}-{own}-01"  # W3C always


def test_a_request_without_context_starts_a_trace(mesh: Cluster):
    results = get(mesh, "/fresh", n=3)
    traces = set()
    for r in results:
        trace_id, span_id, sampled = parse_traceparent(r["seen"]["traceparent"]) or (0, 0, 0)
        assert sampled  # samplingPercent 100
        span = span_of_trace(mesh, f"{trace_id:032x}")
        assert span["parent_span_id"] == "" and span["span_id"] == f"{span_id:016x}"
        assert r["seen"]["x-request-id"]
        traces.add(trace_id)
    assert len(traces) == 3


def test_a_malformed_traceparent_is_replaced_and_counted(mesh: Cluster):
    before = metric(mesh, "nodeproxy_tracing_invalid_context_total", format="w3c")
    bad = f"00-{TRACE.upper()}-{PARENT}-01"  # uppercase hex is not W3C
    results = get(mesh, "/malformed", f"traceparent: {bad}", n=2)
    for r in results:
        replacement = r["seen"]["traceparent"]
        assert replacement != bad
        parsed = parse_traceparent(replacement)
        assert parsed is not None and f"{parsed[0]:032x}" != TRACE.lower()
        assert span_of_trace(mesh, f"{parsed[0]:032x}")["parent_span_id"] == ""
    assert metric(mesh, "nodeproxy_tracing_invalid_context_total", format="w3c") \
        - before == 2


def test_a_malformed_tracestate_is_dropped_and_counted(mesh: Cluster):
    before = metric(mesh, "nodeproxy_tracing_invalid_context_total", format="tracestate")
    trace = os.urandom(16).hex()
    seen = get(mesh, "/bad-state", f"traceparent: 00-{trace}-{PARENT}-01",
               "tracestate: Vendor=has space,x")[0]["seen"]
    assert "tracestate" not in seen
    assert seen["traceparent"].split("-")[1] == trace  # the traceparent still counts
    assert span_of_trace(mesh, trace)["parent_span_id"] == PARENT
    assert metric(mesh, "nodeproxy_tracing_invalid_context_total",
                  format="tracestate") - before == 1


def test_an_unsampled_parent_is_honoured(mesh: Cluster):
    trace = os.urandom(16).hex()
    seen = get(mesh, "/unsampled", f"traceparent: 00-{trace}-{PARENT}-00")[0]["seen"]
    parsed = parse_traceparent(seen["traceparent"])
    assert parsed is not None and f"{parsed[0]:032x}" == trace and parsed[2] is False
    # A sampled request after it: once its span arrived, the unsampled one would have.
    marker = os.urandom(16).hex()
    get(mesh, "/marker", f"traceparent: 00-{marker}-{PARENT}-01")
    span_of_trace(mesh, marker)
    assert [s for s in spans(mesh) if s["trace_id"] == trace] == []


def test_sampling_zero_propagates_without_spans(traced: Cluster):
    configure(traced, {**TRACING, "samplingPercent": 0})
    traced.reload_daemons()
    exported = metric(traced, "nodeproxy_tracing_spans_exported_total")
    results = get(traced, "/zero", n=20)
    traces = set()
    for r in results:
        parsed = parse_traceparent(r["seen"]["traceparent"])
        assert parsed is not None and parsed[2] is False  # flag 00
        traces.add(f"{parsed[0]:032x}")
    assert len(traces) == 20
    marker = os.urandom(16).hex()
    get(traced, "/marker", f"traceparent: 00-{marker}-{PARENT}-01")  # parent-based: sampled
    span_of_trace(traced, marker)
    assert not traces & {s["trace_id"] for s in spans(traced)}
    assert metric(traced, "nodeproxy_tracing_spans_exported_total") - exported == 1


def test_an_unreachable_collector_costs_requests_nothing(traced: Cluster):
    baseline = [r["seconds"] for r in get(traced, "/baseline", n=30)]
    configure(traced, {**TRACING, "endpoint": "http://127.0.0.1:4319/v1/traces",
                       "exportTimeoutSeconds": 1, "maxQueueSize": 20,
                       "maxExportBatchSize": 10})
    traced.reload_daemons()
    failures = metric(traced, "nodeproxy_tracing_export_failures_total")
    dropped = metric(traced, "nodeproxy_tracing_spans_dropped_total")
    t0 = time.monotonic()
    results = get(traced, "/unreachable", n=200)
    elapsed = time.monotonic() - t0
    seconds = [r["seconds"] for r in results]
    assert len(results) == 200
    # Exports block for up to 1 s each on the exporter thread; requests never wait.
    assert max(seconds) < 0.5, max(seconds)
    assert statistics.median(seconds) < max(3 * statistics.median(baseline), 0.02), \
        (statistics.median(seconds), statistics.median(baseline))
    assert wait_for(lambda: metric(traced, "nodeproxy_tracing_export_failures_total")
                    > failures, 10)
    # Every one of the 200 sampled spans is accounted for as dropped: queue_full while
    # 20 wait for the exporter, export_failed for those it tried to send.
    assert wait_for(lambda: metric(traced, "nodeproxy_tracing_spans_dropped_total")
                    - dropped == 200, 15), \
        metric(traced, "nodeproxy_tracing_spans_dropped_total") - dropped
    assert "not exported to http://127.0.0.1:4319/v1/traces" in \
        traced.daemon_output("node0", 20000)
    print(f"unreachable collector: 200 requests in {elapsed:.2f}s, median "
          f"{statistics.median(seconds) * 1000:.2f} ms (baseline "
          f"{statistics.median(baseline) * 1000:.2f} ms), max {max(seconds) * 1000:.1f} ms")


def test_tracing_off_leaves_headers_untouched(traced: Cluster):
    configure(traced, None)  # the default: off
    traced.reload_daemons()
    exported = metric(traced, "nodeproxy_tracing_spans_exported_total")
    trace = os.urandom(16).hex()
    sent = f"00-{trace}-{PARENT}-01"
    seen = get(traced, "/off", f"traceparent: {sent}", "b3: 0")[0]["seen"]
    assert seen["traceparent"] == sent and seen["b3"] == "0"
    assert "x-b3-traceid" not in seen
    assert seen["x-request-id"]  # request ids do not depend on tracing
    time.sleep(0.5)  # four export intervals of the old tracer
    assert [s for s in spans(traced) if s["trace_id"] == trace] == []
    assert metric(traced, "nodeproxy_tracing_spans_exported_total") == exported

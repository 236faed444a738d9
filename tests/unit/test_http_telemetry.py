"""L7 telemetry: Istio's request series, the JSON access log and the admin /clusters page."""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time
from dataclasses import replace
from typing import Any

import aiohttp
import prometheus_client.metrics
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.admin.http_server import HttpServer
from nodeproxy.admin.server import AdminServers
from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import AccessLogSettings
from nodeproxy.http.access_log import FIELDS, AccessLog, AccessLogEntry, rfc3339_ms, trace_id
from nodeproxy.telemetry.labels import REQUEST_LABELS, RequestLabels, TcpLabels
from nodeproxy.telemetry.request_metrics import (
    ISTIO_BUCKETS,
    RequestMetrics,
    istio_request_protocol,
)

TCP = TcpLabels(
    reporter="source", source_workload="client", source_workload_namespace="default",
    source_principal="spiffe://cluster.local/ns/default/sa/client",
    destination_workload="web", destination_workload_namespace="prod",
    destination_principal="spiffe://cluster.local/ns/prod/sa/web",
    destination_service="web.prod.svc.cluster.local", connection_security_policy="unknown",
)
LABELS = RequestLabels.from_tcp(TCP, "http", source_app="client")

# Istio's label names for the request series (its proxy's stats filter), sorted.
ISTIO_REQUEST_LABELS = sorted([
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "source_app", "source_version", "source_canonical_service", "source_canonical_revision",
    "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
])


def label_dict(labels: RequestLabels, code: str, grpc: str, flags: str) -> dict[str, str]:
    names = [n for n in REQUEST_LABELS
             if n not in ("response_code", "grpc_response_status", "response_flags")]
    out = dict(zip(names, labels.values(), strict=True))
    out.update(response_code=code, grpc_response_status=grpc, response_flags=flags)
    return out


# --- metrics -------------------------------------------------------------------------------


def test_request_series_values_equal_what_was_observed() -> None:
    registry = CollectorRegistry()
    m = RequestMetrics(registry)
    m.observe(LABELS, code=200, grpc_status="", flags="-", duration_s=0.0032,
              request_bytes=120, response_bytes=4000)
    m.observe(LABELS, code=200, grpc_status="", flags="", duration_s=0.0418,
              request_bytes=80, response_bytes=6000)
    m.observe(LABELS, code=503, grpc_status="", flags="UF,URX", duration_s=1.5,
              request_bytes=0, response_bytes=91)

    ok = label_dict(LABELS, "200", "", "-")  # "" flags are Envoy's "-" too
    bad = label_dict(LABELS, "503", "", "UF,URX")
    get = registry.get_sample_value
    assert get("istio_requests_total", ok) == 2
    assert get("istio_requests_total", bad) == 1
    assert get("istio_request_duration_milliseconds_count", ok) == 2
    assert abs(get("istio_request_duration_milliseconds_sum", ok) - 45.0) < 1e-9
    assert get("istio_request_duration_milliseconds_bucket", {**ok, "le": "5.0"}) == 1
    assert get("istio_request_duration_milliseconds_bucket", {**ok, "le": "50.0"}) == 2
    assert get("istio_request_duration_milliseconds_sum", bad) == 1500
    assert get("istio_request_bytes_sum", ok) == 200
    assert get("istio_response_bytes_sum", ok) == 10000
    assert get("istio_response_bytes_count", bad) == 1
    assert get("istio_response_bytes_bucket", {**bad, "le": "100.0"}) == 1
    assert get("istio_response_bytes_bucket", {**bad, "le": "50.0"}) == 0


def test_grpc_status_label() -> None:
    registry = CollectorRegistry()
    m = RequestMetrics(registry)
    grpc = RequestLabels.from_tcp(TCP, "grpc")
    m.observe(grpc, code=200, grpc_status="14", flags="-", duration_s=0.01,
              request_bytes=10, response_bytes=0)
    assert registry.get_sample_value(
        "istio_requests_total", label_dict(grpc, "200", "14", "-")) == 1


def test_label_names_are_istios() -> None:
    registry = CollectorRegistry()
    m = RequestMetrics(registry)
    m.observe(LABELS, code=0, grpc_status="", flags="DC", duration_s=0.001,
              request_bytes=1, response_bytes=0)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    for name, sample_name in [("istio_requests", "istio_requests_total"),
                              ("istio_request_duration_milliseconds",
                               "istio_request_duration_milliseconds_count"),
                              ("istio_request_bytes", "istio_request_bytes_count"),
                              ("istio_response_bytes", "istio_response_bytes_count")]:
        sample = next(s for s in families[name].samples if s.name == sample_name)
        assert sorted(sample.labels) == ISTIO_REQUEST_LABELS, name
    assert families["istio_requests"].type == "counter"
    assert families["istio_request_duration_milliseconds"].type == "histogram"
    buckets = [s.labels["le"] for s in families["istio_request_bytes"].samples
               if s.name == "istio_request_bytes_bucket"]
    assert [float(b) for b in buckets[:-1]] == [float(b) for b in ISTIO_BUCKETS]
    assert buckets[-1] == "+Inf"


def test_labels_from_tcp_fill_what_istio_derives() -> None:
    assert LABELS.destination_service_name == "web"
    assert LABELS.destination_service_namespace == "prod"
    assert LABELS.source_canonical_service == "client"
    assert LABELS.destination_canonical_service == "web"
    assert LABELS.source_app == "client"
    assert LABELS.destination_app == "unknown"
    assert LABELS.destination_canonical_revision == "latest"  # Istio's unknown revision
    # Not a service FQDN (a passthrough address, a Host header): the name is the whole value.
    raw = RequestLabels.from_tcp(
        replace(TCP, destination_service="10.0.0.7"), "http")
    assert (raw.destination_service_name, raw.destination_service_namespace) == \
        ("10.0.0.7", "prod")


def test_istio_request_protocol() -> None:
    h2 = RequestHead("GET", "/", "web", version="2")
    grpc = RequestHead("POST", "/pkg.Svc/M", "web", version="2",
                       headers=[("content-type", "application/grpc+proto")])
    assert istio_request_protocol(RequestHead("GET", "/", "web")) == "http"
    assert istio_request_protocol(h2) == "http"  # Istio reports HTTP/2 as "http"
    assert istio_request_protocol(grpc) == "grpc"


def test_nodeproxy_counters() -> None:
    registry = CollectorRegistry()
    m = RequestMetrics(registry)
    for _ in range(3):
        m.count_retry("web.prod.svc.cluster.local", "connect-failure")
    m.count_budget_exhausted("web.prod.svc.cluster.local")
    m.count_bad_request("http/1.1", "header-too-large")
    get = registry.get_sample_value
    assert get("nodeproxy_http_retries_total", {
        "destination_service": "web.prod.svc.cluster.local", "reason": "connect-failure"}) == 3
    assert get("nodeproxy_http_retry_budget_exhausted_total",
               {"destination_service": "web.prod.svc.cluster.local"}) == 1
    assert get("nodeproxy_http_bad_requests_total",
               {"protocol": "http/1.1", "reason": "header-too-large"}) == 1
    m.access_log_dropped.inc(2)
    assert get("nodeproxy_access_log_dropped_total") == 2


def test_request_series_expose_exactly_what_prometheus_client_would() -> None:
    """The project's own Istio series (counts per label set, read at scrape) against
    prometheus_client's Counter and Histogram fed the same requests: the same text,
    bucket edges (a value equal to a bound is in that bucket), +Inf and sums included."""
    rng = random.Random(7)
    ours = CollectorRegistry()
    m = RequestMetrics(ours)
    theirs = CollectorRegistry()
    requests = Counter("istio_requests_total", "Requests the proxy handled",
                       REQUEST_LABELS, registry=theirs)
    hist = {name: Histogram(name, doc, REQUEST_LABELS, buckets=ISTIO_BUCKETS,
                            registry=theirs)
            for name, doc in (("istio_request_duration_milliseconds",
                               "Request duration in milliseconds"),
                              ("istio_request_bytes", "Request size in bytes"),
                              ("istio_response_bytes", "Response size in bytes"))}
    other = RequestLabels.from_tcp(TCP, "grpc")
    edges = [*ISTIO_BUCKETS, 0, 7_200_000]
    for _ in range(3000):
        labels = rng.choice((LABELS, other))
        code, grpc, flags = rng.choice(((200, "", "-"), (503, "", "UF,URX"), (0, "", ""),
                                        (200, "14", "-")))
        duration_ms = rng.choice((rng.random() * 20_000, float(rng.choice(edges))))
        sizes = [rng.choice((rng.randrange(0, 5_000_000), int(rng.choice(edges))))
                 for _ in range(2)]
        m.observe(labels, code=code, grpc_status=grpc, flags=flags,
                  duration_s=duration_ms / 1000.0, request_bytes=sizes[0],
                  response_bytes=sizes[1])
        values = label_dict(labels, str(code), grpc, flags or "-")
        ordered = [values[name] for name in REQUEST_LABELS]
        requests.labels(*ordered).inc()
        for h, value in zip(hist.values(), (duration_ms, *sizes), strict=True):
            h.labels(*ordered).observe(value)

    def families(registry: CollectorRegistry) -> dict[str, list[tuple[str, str, float]]]:
        out = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            out[family.name] = sorted(
                (s.name, repr(sorted(s.labels.items())), round(s.value, 6))
                for s in family.samples if not s.name.endswith("_created"))
        return out

    got, want = families(ours), families(theirs)
    for name in ("istio_requests", "istio_request_duration_milliseconds",
                 "istio_request_bytes", "istio_response_bytes"):
        assert got[name] == want[name], name
        assert got[name]  # something was compared
    assert registry_value(ours, "istio_requests_total", label_dict(LABELS, "200", "", "-")) \
        == registry_value(theirs, "istio_requests_total", label_dict(LABELS, "200", "", "-"))


def _istio_text(registry: CollectorRegistry) -> bytes:
    """The Istio request families' lines of a scrape, in the order they are written."""
    return b"".join(line + b"\n" for line in generate_latest(registry).splitlines()
                    if b"istio_re" in line)


def test_request_series_text_is_byte_identical_to_prometheus_client() -> None:
    """The scrape's text itself, not only its parsed values: prometheus_client's
    Counter and Histogram children (the daemon's _created series off, as
    Telemetry.create sets it) and the project's counts, fed the same requests in the
    same order, write the same bytes: names, label order, series order, bucket bounds,
    _count, _sum and float formatting."""
    created = prometheus_client.metrics._use_created
    disable_created_metrics()
    try:
        rng = random.Random(11)
        ours = CollectorRegistry()
        m = RequestMetrics(ours)
        theirs = CollectorRegistry()
        requests = Counter("istio_requests_total", "Requests the proxy handled",
                           REQUEST_LABELS, registry=theirs)
        hist = [Histogram(name, doc, REQUEST_LABELS, buckets=ISTIO_BUCKETS, registry=theirs)
                for name, doc in (("istio_request_duration_milliseconds",
                                   "Request duration in milliseconds"),
                                  ("istio_request_bytes", "Request size in bytes"),
                                  ("istio_response_bytes", "Response size in bytes"))]
        other = RequestLabels.from_tcp(TCP, "grpc")
        edges = [*ISTIO_BUCKETS, 0, 0.1, 7_200_000]
        for _ in range(2000):
            labels = rng.choice((LABELS, other))
            code, grpc, flags = rng.choice(((200, "", "-"), (503, "", "UF,URX"), (0, "", ""),
                                            (200, "14", "-"), (404, "", "NR")))
            duration_s = rng.choice((rng.random() * 3, rng.choice(edges) / 1000.0))
            sizes = [rng.choice((rng.randrange(0, 5_000_000), int(rng.choice(edges))))
                     for _ in range(2)]
            m.observe(labels, code=code, grpc_status=grpc, flags=flags, duration_s=duration_s,
                      request_bytes=sizes[0], response_bytes=sizes[1])
            values = label_dict(labels, str(code), grpc, flags or "-")
            ordered = [values[name] for name in REQUEST_LABELS]
            requests.labels(*ordered).inc()
            # The same float the recorder computes (seconds to milliseconds).
            for h, value in zip(hist, (duration_s * 1000.0, *sizes), strict=True):
                h.labels(*ordered).observe(value)
        got, want = _istio_text(ours), _istio_text(theirs)
        assert want.count(b"\n") > 8 * (3 * 22 + 1)  # four families, eight label sets at least
        assert got == want
    finally:
        if created:
            enable_created_metrics()


def test_request_series_scraped_from_another_thread_while_observed() -> None:
    """A scrape on another thread (prometheus_client's own HTTP server would make one)
    while the loop's thread observes and adds label sets: no error, every scrape
    self-consistent (each histogram's _count is its +Inf bucket, buckets cumulative),
    counts never going back, and the last scrape equal to what was observed."""
    import sys

    m = RequestMetrics(registry := CollectorRegistry())
    done = threading.Event()
    failures: list[BaseException] = []
    scrapes: list[dict[tuple[str, str], float]] = []

    def scrape() -> None:
        try:
            while not done.is_set():
                seen: dict[tuple[str, str], float] = {}
                for family in registry.collect():
                    if not family.name.startswith("istio_re"):
                        continue
                    by_series: dict[str, list[float]] = {}
                    for s in family.samples:
                        key = repr(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                        seen[(s.name + key, s.labels.get("le", ""))] = s.value
                        if s.name.endswith("_bucket"):
                            by_series.setdefault(key, []).append(s.value)
                        elif s.name.endswith("_count"):
                            buckets = by_series[key]
                            assert buckets == sorted(buckets) and buckets[-1] == s.value
                scrapes.append(seen)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    thread = threading.Thread(target=scrape)
    thread.start()
    observed = 0
    deadline = time.monotonic() + 10
    try:
        # At least 40,000 observations and three scrapes (bounded: 10 s at most).
        while (observed < 40_000 or len(scrapes) < 3) and time.monotonic() < deadline:
            # A new label set every 1,000 observations, all along: the dict grows while
            # scrapes read it.
            m.observe(LABELS, code=200 + observed % 2, grpc_status=str(observed // 2000),
                      flags="-", duration_s=0.001 * (observed % 50),
                      request_bytes=observed % 700, response_bytes=10)
            observed += 1
    finally:
        done.set()
        sys.setswitchinterval(interval)
        thread.join()
    assert not failures, failures[0]
    assert len(scrapes) >= 3
    for before, after in zip(scrapes, scrapes[1:], strict=False):
        assert all(after.get(k, 0) >= v for k, v in before.items() if not k[0].endswith(
            "_sum"))
    final = {f.name: f for f in registry.collect()}["istio_requests"]
    assert sum(s.value for s in final.samples if s.name == "istio_requests_total") == observed


def registry_value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None and value > 0
    return value


# --- access log ----------------------------------------------------------------------------


def entry(n: int = 0, **over: Any) -> AccessLogEntry:
    values: dict[str, Any] = dict(
        start_time=1714564800.1234, source_principal="spiffe://cluster.local/ns/default/sa/client",
        source_workload="client", source_namespace="default",
        destination_principal="spiffe://cluster.local/ns/prod/sa/web", destination_workload="web",
        destination_namespace="prod", destination_service="web.prod.svc.cluster.local",
        method="GET", authority="web.prod", path=f"/item/{n}?q=1", protocol="HTTP/1.1",
        status=200, grpc_status=None, response_flags="-", bytes_received=0, bytes_sent=512,
        duration_ms=3.14159, upstream_host="10.1.2.3:8080", attempts=1,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", request_id=f"req-{n}")
    values.update(over)
    return AccessLogEntry(**values)


EXPECTED_FIELDS = [
    "start_time", "source_principal", "source_workload", "source_namespace",
    "destination_principal", "destination_workload", "destination_namespace",
    "destination_service", "method", "authority", "path", "protocol", "status", "grpc_status",
    "response_flags", "bytes_received", "bytes_sent", "duration_ms", "upstream_host",
    "attempts", "trace_id", "request_id",
]


def test_access_log_lines_are_json_one_per_request(tmp_path) -> None:
    path = tmp_path / "access.log"
    path.write_text("an earlier line\n")  # appended to, not truncated
    registry = CollectorRegistry()
    dropped = RequestMetrics(registry).access_log_dropped
    log = AccessLog(AccessLogSettings(path=str(path)), dropped)
    log.write(entry(1))
    log.write(entry(2, status=0, response_flags="UF", upstream_host=None, attempts=0,
                    trace_id=None, request_id=None, path='/"quoted"\n'))
    log.close()

    lines = path.read_text().splitlines()
    assert lines[0] == "an earlier line"
    first, second = (json.loads(line) for line in lines[1:])
    assert list(first) == EXPECTED_FIELDS == list(FIELDS)
    assert first["start_time"] == "2024-05-01T12:00:00.123Z"
    assert first["status"] == 200 and first["grpc_status"] is None
    assert first["duration_ms"] == 3.142
    assert first["upstream_host"] == "10.1.2.3:8080" and first["request_id"] == "req-1"
    assert second["status"] == 0 and second["response_flags"] == "UF"
    assert second["upstream_host"] is None and second["trace_id"] is None
    assert second["path"] == '/"quoted"\n'
    assert registry.get_sample_value("nodeproxy_access_log_dropped_total") == 0


def test_rfc3339_ms() -> None:
    assert rfc3339_ms(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(1714564800.9999) == "2024-05-01T12:00:00.999Z"


class StalledStream(io.StringIO):
    """A stream whose writes wait until released (a stuck disk or pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().write(s)


def test_full_queue_drops_and_counts_without_blocking() -> None:
    registry = CollectorRegistry()
    dropped = RequestMetrics(registry).access_log_dropped
    stream = StalledStream()
    log = AccessLog(AccessLogSettings(queue_size=100), dropped, stream=stream)
    try:
        log.write(entry(0))  # taken by the writer, which then stalls in write()
        assert stream.entered.wait(5)
        e = entry(1)
        # The writer is stalled until release: a write() that waited for room would never
        # return, so finishing at all (a generous bound for a busy machine) is the proof.
        writer = threading.Thread(target=lambda: [log.write(e) for _ in range(5 * 10_000)])
        writer.start()
        writer.join(60)
        assert not writer.is_alive(), "write() blocked on a full queue"
        assert log.pending == 100
        assert registry.get_sample_value("nodeproxy_access_log_dropped_total") == \
            5 * 10_000 - 100
    finally:
        stream.release.set()
        log.close()
    assert len(stream.getvalue().splitlines()) == 101


def test_close_flushes_everything_written_before_it(tmp_path) -> None:
    path = tmp_path / "access.log"
    registry = CollectorRegistry()
    log = AccessLog(AccessLogSettings(path=str(path), queue_size=100_000),
                    RequestMetrics(registry).access_log_dropped)
    for n in range(5000):
        log.write(entry(n))
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == \
        [f"req-{n}" for n in range(5000)]
    log.write(entry(5000))  # after close: dropped and counted, never written
    assert registry.get_sample_value("nodeproxy_access_log_dropped_total") == 1
    assert len(path.read_text().splitlines()) == 5000


def test_aclose_from_the_event_loop(tmp_path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogSettings(path=str(path)),
                    RequestMetrics(CollectorRegistry()).access_log_dropped)

    async def main() -> None:
        log.write(entry(1))
        await log.aclose()

    asyncio.run(main())
    assert len(path.read_text().splitlines()) == 1


def test_trace_id() -> None:
    w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id([("traceparent", w3c), ("x-b3-traceid", "a" * 16),
                     ("x-request-id", "r")]) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id([("x-b3-traceid", "80F198EE56343BA864FE8B2A57D3EFF7")]) == \
        "80f198ee56343ba864fe8b2a57d3eff7"
    assert trace_id([("x-b3-traceid", "463ac35c9f6413ad")]) == "463ac35c9f6413ad"
    # invalid traceparent / b3 (all-zero trace id, bad length): the next source is used
    zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    assert trace_id([("traceparent", zero), ("x-b3-traceid", "xyz"),
                     ("x-request-id", "abc-123")]) == "abc-123"
    assert trace_id([("content-type", "text/plain")]) is None


# --- admin /clusters -----------------------------------------------------------------------


class Daemon:
    registry = CollectorRegistry()

    def is_ready(self) -> bool:
        return True

    def ready_detail(self) -> list[str]:
        return []

    def config_dump(self) -> dict[str, Any]:
        return {}

    def pods_view(self) -> list[dict[str, Any]]:
        return []

    def pod_view(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        return 404, {}

    async def enroll_request(self, body: Any) -> tuple[int, dict[str, Any]]:
        return 200, {}

    async def unenroll_request(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        return 200, {}

    async def handover_request(self) -> tuple[int, dict[str, Any]]:
        return 200, {}


CLUSTERS = [{
    "service": "web.prod.svc.cluster.local", "port": 8080,
    "endpoints": [
        {"address": "10.1.2.3:8080", "active_requests": 2, "latency_ewma_ms": 1.75,
         "requests": 120, "failures": 1},
        {"address": "[fd00::5]:8080", "active_requests": 0, "latency_ewma_ms": None,
         "requests": 0, "failures": 0},
    ],
    "retries": 3, "retry_budget_exhausted": 0,
}]


async def get_clusters(servers: AdminServers) -> tuple[int, Any]:
    server = HttpServer(servers.admin_app())
    await server.start_tcp("127.0.0.1", 0)
    host, port = "127.0.0.1", server.port
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://{host}:{port}/clusters") as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()
    finally:
        await server.stop()


def test_admin_clusters_page() -> None:
    assert asyncio.run(get_clusters(AdminServers(Daemon(), clusters=lambda: CLUSTERS))) == \
        (200, CLUSTERS)
    assert asyncio.run(get_clusters(AdminServers(Daemon()))) == (200, [])


def test_admin_clusters_page_survives_a_broken_provider() -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("pool gone")

    status, body = asyncio.run(get_clusters(AdminServers(Daemon(), clusters=broken)))
    assert status == 500 and "pool gone" in body["error"]

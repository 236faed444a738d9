"""Istio's HTTP request series, so Istio's dashboards, Kiali and alerts work unchanged.

The four standard request series, with Istio's names, label names and buckets:

- ``istio_requests_total``: counter, one per request (response or not)
- ``istio_request_duration_milliseconds``: histogram, the request's duration
- ``istio_request_bytes`` / ``istio_response_bytes``: histograms, the request's and the
  response's sizes (Istio's filter records the downstream connection's bytes for the
  request, headers included; ``RequestMetrics.observe`` records what its caller measured)

All three histograms use Envoy's default buckets (``ISTIO_BUCKETS``), which Istio keeps
unless a pod overrides them.

Label values follow Istio's proxy filter:

- ``request_protocol``: "grpc" for gRPC, "http" otherwise: HTTP/1.1 and HTTP/2 alike
  (``istio_request_protocol``)
- ``response_code``: the status sent to the client, "0" when none was
- ``grpc_response_status``: the numeric gRPC status ("0", "14", ...), "" when the request
  is not gRPC or ended with no status (an empty label is an absent label to Prometheus)
- ``response_flags``: Envoy's short flags ("UF", "UH,URX", ...), "-" when none
- ``connection_security_policy``: "mutual_tls" or "none" (reporter=destination),
  "unknown" (reporter=source, as Istio's client side reports it)
- peer labels nodeproxy cannot know are "unknown", except the canonical revisions, which
  Istio reports as "latest" when unknown

nodeproxy's own series, beside them: retries (``nodeproxy_http_retries_total``), retry
budget refusals (``nodeproxy_http_retry_budget_exhausted_total``), mirrored requests
(``nodeproxy_http_mirrored_requests_total``, see mirror.py), requests refused by a
local rate limit (``nodeproxy_http_rate_limited_total``), injected faults
(``nodeproxy_http_faults_total``), malformed requests
refused (``nodeproxy_http_bad_requests_total``), HTTP/2 connections closed for abuse
(``nodeproxy_http2_abuse_total``, h2_guard.py) and access-log lines dropped
(``nodeproxy_access_log_dropped_total``).

Per request the cost is one dict lookup and plain integer and float additions: the four
Istio series are kept by ``IstioRequestSeries`` (a collector of the project's own) as
counts per label set, bucketed with ``bisect``, and turned into Prometheus families only
when scraped.  prometheus_client's own ``Counter`` and ``Histogram`` take a lock on every
``inc`` and ``observe`` and walk a histogram's buckets in Python, which was about a tenth
of the Python work a proxied request costs.  The event loop updates the counts and the
admin server's scrape (on the same loop) reads them, so nothing needs a lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nodeproxy.telemetry.labels import REQUEST_LABELS, RESPONSE_LABELS
from nodeproxy.telemetry.resilience_metrics import ResilienceMetrics

if TYPE_CHECKING:
    from nodeproxy.codec.message import RequestHead
    from nodeproxy.telemetry.labels import RequestLabels

# Envoy's default histogram buckets (ms for durations, bytes for sizes); Istio's request
# histograms use them unless overridden.
ISTIO_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                 60000, 300000, 600000, 1800000, 3600000)

# response_flags when there is none (Envoy's "-").
NO_FLAGS = "-"


def istio_request_protocol(head: RequestHead) -> str:
    """request_protocol as Istio's proxy reports it: "grpc" or "http" (HTTP/2 included)."""
    return "grpc" if head.is_grpc else "http"


def wire_protocol(head: RequestHead) -> str:
    """The protocol label of the proxy's own counters ("http/1.1", "http/2")."""
    return "http/2" if head.version == "2" else "http/1.1"


class _Series:
    """One label set's counts: requests, and per histogram (duration in ms, request
    bytes, response bytes) the observations per bucket (the last one past every bound,
    "+Inf"; not cumulative) and their sum."""

    __slots__ = ("requests", "duration", "duration_sum", "request_bytes",
                 "request_bytes_sum", "response_bytes", "response_bytes_sum")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = [0] * (len(ISTIO_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.request_bytes = [0] * (len(ISTIO_BUCKETS) + 1)
        self.request_bytes_sum = 0.0
        self.response_bytes = [0] * (len(ISTIO_BUCKETS) + 1)
        self.response_bytes_sum = 0.0


_LE = [floatToGoString(b) for b in ISTIO_BUCKETS] + ["+Inf"]  # as prometheus_client writes


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus's cumulative buckets of per-bucket counts."""
    out: list[tuple[str, float]] = []
    total = 0
    for le, n in zip(_LE, counts, strict=True):
        total += n
        out.append((le, total))
    return out


class IstioRequestSeries(Collector):
    """Istio's four request series as plain counts per label set, exposed at scrape
    (see the module docstring).  Not thread-safe: one event loop updates and reads it."""

    def __init__(self) -> None:
        # (request label values, code, grpc status, flags) -> counts; a series once made
        # is exported for good, as a prometheus_client child is.
        self.series: dict[tuple[tuple[str, ...], int, str, str], _Series] = {}

    def observe(self, values: tuple[str, ...], code: int, grpc_status: str, flags: str,
                duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        key = (values, code, grpc_status, flags or NO_FLAGS)  # "" and "-" are one series
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        series.requests += 1
        series.duration[bisect_left(ISTIO_BUCKETS, duration_ms)] += 1
        series.duration_sum += duration_ms
        series.request_bytes[bisect_left(ISTIO_BUCKETS, request_bytes)] += 1
        series.request_bytes_sum += request_bytes
        series.response_bytes[bisect_left(ISTIO_BUCKETS, response_bytes)] += 1
        series.response_bytes_sum += response_bytes

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("istio_requests", "Requests the proxy handled",
                                       labels=REQUEST_LABELS)
        duration = HistogramMetricFamily("istio_request_duration_milliseconds",
                                         "Request duration in milliseconds",
                                         labels=REQUEST_LABELS)
        request_bytes = HistogramMetricFamily("istio_request_bytes", "Request size in bytes",
                                              labels=REQUEST_LABELS)
        response_bytes = HistogramMetricFamily("istio_response_bytes",
                                               "Response size in bytes", labels=REQUEST_LABELS)
        for key, series in list(self.series.items()):
            labels = _label_values(key)
            requests.add_metric(labels, series.requests)
            duration.add_metric(labels, _buckets(series.duration), series.duration_sum)
            request_bytes.add_metric(labels, _buckets(series.request_bytes),
                                     series.request_bytes_sum)
            response_bytes.add_metric(labels, _buckets(series.response_bytes),
                                      series.response_bytes_sum)
        yield requests
        yield duration
        yield request_bytes
        yield response_bytes


_REQUEST_ONLY = tuple(n for n in REQUEST_LABELS if n not in RESPONSE_LABELS)


def _label_values(key: tuple[tuple[str, ...], int, str, str]) -> list[str]:
    """Every label value in REQUEST_LABELS order, the response's among them."""
    values, code, grpc_status, flags = key
    by_name = dict(zip(_REQUEST_ONLY, values, strict=True))
    by_name.update(response_code=str(code), grpc_response_status=grpc_status,
                   response_flags=flags)
    return [by_name[name] for name in REQUEST_LABELS]


class RequestMetrics:
    """Istio's request series and nodeproxy's HTTP counters, in one registry.

    Use from the event loop's thread (the child caches are not locked).
    """

    def __init__(self, registry: CollectorRegistry, *, max_cached: int = 4096):
        self.istio = IstioRequestSeries()
        registry.register(self.istio)
        self.retries = Counter(
            "nodeproxy_http_retries_total", "Request attempts retried, by retry reason",
            ("destination_service", "reason"), registry=registry)
        self.retry_budget_exhausted = Counter(
            "nodeproxy_http_retry_budget_exhausted_total",
            "Retries not made because the destination's retry budget was spent",
            ("destination_service",), registry=registry)
        self.bad_requests = Counter(
            "nodeproxy_http_bad_requests_total",
            "Malformed requests the proxy refused, by protocol and reason",
            ("protocol", "reason"), registry=registry)
        self.upgrade_refusals = Counter(
            "nodeproxy_http_upgrade_refusals_total",
            "Upgrade and CONNECT requests not switched to a byte stream, by reason "
            "(nodeproxy.codec.upgrade.REASONS)",
            ("protocol", "reason"), registry=registry)
        self.mirrored = Counter(
            "nodeproxy_http_mirrored_requests_total",
            "Mirrored (shadow) requests, by result (sent, failed, skipped) and reason",
            ("destination_service", "result", "reason"), registry=registry)
        self.rate_limited = Counter(
            "nodeproxy_http_rate_limited_total",
            "Requests refused (429) by a local rate limit, by scope (route, workload)",
            ("destination_service", "scope"), registry=registry)
        self.faults = Counter(
            "nodeproxy_http_faults_total",
            "Faults injected into requests, by kind (delay, abort)",
            ("destination_service", "kind"), registry=registry)
        self.refused = Counter(
            "nodeproxy_http_refused_total",
            "Requests refused (503, flag OM) because their source pod had maxRequests in "
            "flight, by source and reason",
            ("source_workload_namespace", "source_workload", "reason"), registry=registry)
        self.downstream_timeouts = Counter(
            "nodeproxy_http_downstream_timeouts_total",
            "Client connections and requests ended because the client was too slow to "
            "send: request_headers (no complete head in time), request (no complete "
            "request in time), by protocol",
            ("protocol", "timeout"), registry=registry)
        self.http2_abuse = Counter(
            "nodeproxy_http2_abuse_total",
            "HTTP/2 client connections closed with GOAWAY ENHANCE_YOUR_CALM, by the "
            "budget they spent (h2_guard.py)",
            ("reason",), registry=registry)
        self.access_log_dropped = Counter(
            "nodeproxy_access_log_dropped_total",
            "Access-log lines dropped (the writer fell behind or could not write)",
            registry=registry)
        # Circuit breaking and outlier detection (resilience_metrics.py).
        self.resilience = ResilienceMetrics(registry)
        self._max_cached = max_cached
        self._counters: dict[tuple[Counter, tuple[str, ...]], Any] = {}

    def observe(self, labels: RequestLabels, *, code: int, grpc_status: str, flags: str,
                duration_s: float, request_bytes: int, response_bytes: int) -> None:
        """Count one finished request (code 0: no response was sent; flags "" or "-":
        none; grpc_status "" unless gRPC)."""
        self.istio.observe(labels.values(), code, grpc_status, flags, duration_s * 1000.0,
                           request_bytes, response_bytes)

    def count_retry(self, destination_service: str, reason: str) -> None:
        self._child(self.retries, (destination_service, reason)).inc()

    def count_budget_exhausted(self, destination_service: str) -> None:
        self._child(self.retry_budget_exhausted, (destination_service,)).inc()

    def count_mirror(self, destination_service: str, result: str, reason: str) -> None:
        self._child(self.mirrored, (destination_service, result, reason)).inc()

    def count_rate_limited(self, destination_service: str, scope: str) -> None:
        self._child(self.rate_limited, (destination_service, scope)).inc()

    def count_fault(self, destination_service: str, kind: str) -> None:
        self._child(self.faults, (destination_service, kind)).inc()

    def count_refused(self, namespace: str, workload: str, reason: str) -> None:
        self._child(self.refused, (namespace, workload, reason)).inc()

    def count_downstream_timeout(self, protocol: str, timeout: str) -> None:
        self._child(self.downstream_timeouts, (protocol, timeout)).inc()
    def count_http2_abuse(self, reason: str) -> None:
        self._child(self.http2_abuse, (reason,)).inc()

    def count_upgrade_refusal(self, protocol: str, reason: str) -> None:
        self._child(self.upgrade_refusals, (protocol, reason)).inc()

    def count_bad_request(self, protocol: str, reason: str) -> None:
        self._child(self.bad_requests, (protocol, reason)).inc()

    def _child(self, metric: Counter, values: tuple[str, ...]) -> Any:
        key = (metric, values)
        child = self._counters.get(key)
        if child is None:
            child = metric.labels(*values)
            _remember(self._counters, key, child, self._max_cached)
        return child


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert, evicting the oldest entry past `limit` (the series itself stays exported:
    only the shortcut to it goes)."""
    if len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value

"""The nodeproxy_tracing_* counters: spans exported and dropped, export failures and
malformed trace contexts.  Shared by the daemon's tracing holder (tracing.py) and the
tracer it makes (request_spans.py, which only tracing.enabled imports)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.telemetry.trace_headers import B3_MULTI, B3_SINGLE, TRACESTATE, W3C


class TracingMetrics:
    """nodeproxy_tracing_* counters (exporter-thread increments are safe: the client
    library locks its values)."""

    def __init__(self, registry: CollectorRegistry):
        invalid = Counter(
            "nodeproxy_tracing_invalid_context",
            "Requests whose trace headers were malformed and replaced, by format",
            ("format",), registry=registry)
        self.invalid = {f: invalid.labels(f) for f in (W3C, TRACESTATE, B3_MULTI, B3_SINGLE)}
        self.exported = Counter("nodeproxy_tracing_spans_exported",
                                "Spans the collector accepted", registry=registry)
        dropped = Counter(
            "nodeproxy_tracing_spans_dropped",
            "Sampled spans not exported: queue_full (the exporter fell behind), "
            "export_failed (the collector refused them or could not be reached), "
            "shutdown (still queued when a tracer was replaced or the daemon stopped)",
            ("reason",), registry=registry)
        self.queue_full = dropped.labels("queue_full")
        self.export_failed = dropped.labels("export_failed")
        self.shutdown = dropped.labels("shutdown")
        self.export_failures = Counter(
            "nodeproxy_tracing_export_failures",
            "Export calls to the collector that failed (each a batch of spans)",
            registry=registry)

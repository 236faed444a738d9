"""Request tracing: the daemon's holder of the active tracer, and its counters.

``Tracing.configure`` (every config) returns the active ``Tracer`` or None when
``tracing.enabled`` is false, so a request pays one None check when tracing is off and
the OpenTelemetry SDK (``nodeproxy.telemetry.request_spans``) is only imported once tracing is
enabled.  A changed ``tracing`` section makes a new ``Tracer``; the old one is shut
down on a thread of its own (it flushes what it queued), never on the event loop.
See ``nodeproxy.telemetry.request_spans`` for what a request's span does and how export is
bounded and counted.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.telemetry.trace_headers import B3_MULTI, B3_SINGLE, TRACESTATE, W3C

if TYPE_CHECKING:
    from nodeproxy.config.model import TracingSettings
    from nodeproxy.telemetry.request_spans import Tracer

log = logging.getLogger(__name__)

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


class Tracing:
    """The daemon's tracing across configurations (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.metrics = TracingMetrics(registry)
        self._node = node
        self._tracer: Tracer | None = None
        self._settings: TracingSettings | None = None

    def configure(self, settings: TracingSettings) -> Tracer | None:
        """The tracer for this section: the running one if the section is unchanged."""
        if settings == self._settings:
            return self._tracer
        old, self._settings = self._tracer, settings
        self._tracer = None
        if settings.enabled:
            from nodeproxy.telemetry.request_spans import Tracer  # the SDK: only when used

            self._tracer = Tracer(settings, self.metrics, self._node)
        if old is not None:
            threading.Thread(target=old.shutdown, name="tracing-shutdown",
                             daemon=True).start()
        if self._tracer is not None:
            log.info("tracing: exporting %.4g%% of requests' spans to %s",
                     settings.sampling_percent, settings.endpoint)
        return self._tracer

    def close(self, wait_seconds: float = 2.0) -> None:
        """Stop exporting: queued spans are flushed for up to wait_seconds (the daemon is
        stopping; nothing else waits on the loop by then)."""
        tracer, self._tracer, self._settings = self._tracer, None, None
        if tracer is not None:
            thread = threading.Thread(target=tracer.shutdown, name="tracing-shutdown",
                                      daemon=True)
            thread.start()
            thread.join(wait_seconds)

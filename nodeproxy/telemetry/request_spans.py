"""The SDK side of request tracing: one ``tracing`` section's tracer, spans and export.

Imported only when tracing is enabled (``nodeproxy.telemetry.tracing`` does it), so a
daemon without tracing never loads the OpenTelemetry SDK.

Per request (``Tracer.begin``): the incoming context is read (``trace_headers.extract``;
malformed headers are counted in ``nodeproxy_tracing_invalid_context_total{format}``,
logged at most every 10 s, and replaced), the sampling decision is made (an incoming
decision is honoured, parent-based; else ``samplingPercent`` with the tracer's PRNG),
and the request's trace headers are rewritten with the proxy's span as the parent
(``trace_headers.inject``) before routing, so every attempt and the access log's
``trace_id`` carry it.  Only a sampled request makes an SDK span (kind CLIENT: the proxy
acts for the source pod, as a sidecar's outbound or a waypoint does, and the span is
the call to the destination); an unsampled one only gets ids from the PRNG and the
headers, with the sampled flag 0, and no object (``begin`` returns None).  A request
that arrives with no trace header at all is decided before anything is parsed: unsampled,
it costs two draws from the PRNG and one appended ``traceparent``.  ``RequestSpan.finish``
sets the OpenTelemetry HTTP client attributes (the request's, kept since ``begin``, and
the response's, in one ``set_attributes``: the SDK validates and copies per call) and
the status and ends the span with the request's own times.

Export never holds the data path: ended spans go to the SDK's ``BatchSpanProcessor``,
whose thread batches them to ``OTLPSpanExporter`` (OTLP/HTTP protobuf).  The SDK's queue
drops its oldest span silently when full, so ``_BoundedProcessor`` keeps its own count
of spans not yet through the exporter and drops new ones past ``maxQueueSize`` itself,
counted in ``nodeproxy_tracing_spans_dropped_total{reason="queue_full"}``.
``_CountingExporter`` counts ``nodeproxy_tracing_spans_exported_total``, failed export
calls (``nodeproxy_tracing_export_failures_total``, their spans in
``..._spans_dropped_total{reason="export_failed"}``) and logs a failure's reason at most
every 10 s.  Every sampled span ends up exported or dropped, once the queue is empty.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode

from nodeproxy.log_limit import LogLimiter
from nodeproxy.telemetry.trace_headers import NONE, Incoming, extract, inject
from nodeproxy.telemetry.trace_start import SAMPLED, UNSAMPLED, first_decision
from nodeproxy.telemetry.tracing_metrics import TracingMetrics

if TYPE_CHECKING:
    from nodeproxy.codec.message import RequestHead
    from nodeproxy.config.model import TracingSettings

# The SDK exporter's logger: its messages are the reason our own failure log gives.
_OTLP_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class _Reasons(logging.Handler):
    """Keeps the SDK exporter's first and last messages of an export call: the cause
    (a connection error, a status) and the outcome (given up after retries)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()[:300]
        except Exception:  # noqa: BLE001 - a bad format string must not break export
            message = str(record.msg)[:300]
        if len(self.messages) > 1:
            self.messages[1] = message
        else:
            self.messages.append(message)

    @property
    def text(self) -> str:
        return " ... ".join(self.messages) or "export failed"


_REASON = _Reasons()
log = logging.getLogger(__name__)
_otlp_log = logging.getLogger(_OTLP_LOGGER)
_otlp_log.addHandler(_REASON)
_otlp_log.propagate = False  # our own rate-limited warning tells it


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counted: exported spans, failed calls and their spans."""

    def __init__(self, inner: SpanExporter, metrics: TracingMetrics, endpoint: str):
        self._inner = inner
        self._metrics = metrics
        self._endpoint = endpoint
        self._log = LogLimiter(log)
        self.finished = 0  # spans through export (written by the exporter thread only)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        _REASON.messages.clear()
        try:
            result = self._inner.export(spans)
        except Exception as e:  # noqa: BLE001 - the SDK thread would only log it
            _REASON.messages.append(repr(e)[:300])
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._metrics.exported.inc(len(spans))
        else:
            self._metrics.export_failures.inc()
            self._metrics.export_failed.inc(len(spans))
            self._log.warn("export", "tracing: %d spans not exported to %s: %s", len(spans),
                           self._endpoint, _REASON.text)
        self.finished += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor behind a counted bound: a span finding maxQueueSize
    spans not yet through the exporter (queued or in the batch being sent) is dropped
    and counted, instead of the SDK dropping its oldest one silently."""

    def __init__(self, batch: BatchSpanProcessor, exporter: _CountingExporter,
                 metrics: TracingMetrics, max_queue: int):
        self._batch = batch
        self._exporter = exporter
        self._metrics = metrics
        self._max = max_queue
        self.submitted = 0  # written by the event loop only

    def on_start(self, span: object, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.submitted - self._exporter.finished >= self._max:
            self._metrics.queue_full.inc()
            return
        self.submitted += 1
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._batch.shutdown()
        lost = self.submitted - self._exporter.finished
        if lost > 0:
            self._metrics.shutdown.inc(lost)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class RequestSpan:
    """A sampled request's trace: its ids, the SDK span that ``finish`` ends (an
    unsampled request has none) and the request's attributes, given to the span with
    the response's in one call at the end (the SDK checks and copies them per call)."""

    __slots__ = ("trace_id", "span_id", "_span", "_attributes")

    def __init__(self, trace_id: int, span_id: int, span: trace_api.Span,
                 attributes: dict[str, str | int]):
        self.trace_id, self.span_id, self._span = trace_id, span_id, span
        self._attributes = attributes

    def finish(self, *, status: int, grpc_status: str, flags: str, attempts: int,
               upstream: tuple[str, int] | None, service: str,
               source: tuple[str, str], destination: tuple[str, str] | None,
               end_ns: int) -> None:
        """End the span.  source/destination: (workload, namespace); upstream: the last
        attempt's endpoint (address, port)."""
        span = self._span
        attributes = self._attributes
        attributes["nodeproxy.response_flags"] = flags
        attributes["nodeproxy.destination.service"] = service
        attributes["nodeproxy.source.workload"] = source[0]
        attributes["nodeproxy.source.namespace"] = source[1]
        if status:
            attributes["http.response.status_code"] = status
        if attempts > 1:
            attributes["http.request.resend_count"] = attempts - 1
        if upstream is not None:
            attributes["network.peer.address"] = upstream[0]
            attributes["network.peer.port"] = upstream[1]
        if destination is not None:
            attributes["nodeproxy.destination.workload"] = destination[0]
            attributes["nodeproxy.destination.namespace"] = destination[1]
        if grpc_status:
            attributes["rpc.grpc.status_code"] = int(grpc_status)
        # A client span: 4xx and 5xx, no response, or a gRPC error are errors.
        error = (str(status) if status >= 400 else flags if not status else
                 f"grpc {grpc_status}" if grpc_status not in ("", "0") else None)
        if error is not None:
            attributes["error.type"] = error
            span.set_status(Status(StatusCode.ERROR, f"{status} {flags}"))
        span.set_attributes(attributes)
        span.end(end_time=end_ns)


class Tracer:
    """The active tracing of one ``tracing`` section: sampling, headers, export."""

    def __init__(self, settings: TracingSettings, metrics: TracingMetrics, node: str):
        self.settings = settings
        self._metrics = metrics
        self._ratio = settings.sampling_percent / 100.0
        self._random = random.Random()
        self._invalid_log = LogLimiter(log)
        self._exporter = _CountingExporter(
            OTLPSpanExporter(endpoint=settings.endpoint,
                             timeout=settings.export_timeout_seconds),
            metrics, settings.endpoint)
        batch = BatchSpanProcessor(
            self._exporter, max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_seconds * 1000,
            max_export_batch_size=settings.max_export_batch_size,
            export_timeout_millis=settings.export_timeout_seconds * 1000)
        self._processor = _BoundedProcessor(batch, self._exporter, metrics,
                                            settings.max_queue_size)
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name,
                                      "k8s.node.name": node}),
            sampler=ALWAYS_ON, shutdown_on_exit=False)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("nodeproxy.http")

    def begin(self, head: RequestHead, request_id: str, start_ns: int) -> RequestSpan | None:
        """The request's span: its context from the headers, its sampling decision; the
        headers rewritten to carry it (see the module docstring).  None: not sampled
        (the headers carry new ids with the sampled flag 0, and there is nothing to end).

        A request that brought no trace header at all (most do) is decided first and,
        unsampled, costs one random draw, one for its ids and a ``traceparent``
        appended: no parsing, no header list rebuilt, no objects."""
        return self.begin_decided(first_decision(head.headers, self._random, self._ratio),
                                  head, request_id, start_ns)

    @property
    def random(self) -> random.Random:
        """The PRNG of the sampling decisions and the ids (first_decision's)."""
        return self._random

    @property
    def ratio(self) -> float:
        """The share of requests without an incoming decision that are sampled."""
        return self._ratio

    def begin_decided(self, decided: int, head: RequestHead, request_id: str,
                      start_ns: int) -> RequestSpan | None:
        """begin, after trace_start.first_decision(head.headers, self.random,
        self.ratio) said `decided` (the request path makes that call itself, compiled,
        and comes here only when it says other than UNSAMPLED)."""
        if decided == UNSAMPLED:
            return None
        if decided == SAMPLED:
            return self._sampled(head, NONE, request_id, start_ns)
        headers = head.headers
        incoming = extract(headers)
        for fmt in incoming.invalid:
            self._metrics.invalid[fmt].inc()
            self._invalid_log.warn("invalid", "tracing: malformed %s trace context from a client "
                                   "(%s %s): replaced", fmt, head.method, head.path[:100])
        sampled = incoming.sampled
        if sampled is None:
            sampled = self._random.random() < self._ratio
        if sampled:
            return self._sampled(head, incoming, request_id, start_ns)
        trace_id = incoming.trace_id or (self._random.getrandbits(128) or 1)
        span_id = self._random.getrandbits(64) or 1
        inject(headers, incoming, trace_id, span_id, False)
        return None

    def _sampled(self, head: RequestHead, incoming: Incoming, request_id: str,
                 start_ns: int) -> RequestSpan:
        """A sampled request's SDK span, its context written into the headers."""
        if incoming.trace_id:
            parent = trace_api.SpanContext(
                incoming.trace_id, incoming.span_id, is_remote=True,
                trace_flags=trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED),
                trace_state=trace_api.TraceState.from_header([incoming.tracestate])
                if incoming.tracestate else None)
            context = trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent))
        else:
            context = Context()  # a root: not whatever the task's context holds
        host, _, port = head.authority.rpartition(":") if _has_port(head.authority) \
            else (head.authority, "", "")
        attributes: dict[str, str | int] = {
            "http.request.method": head.method,
            "url.path": head.path.split("?", 1)[0],
            "url.scheme": head.scheme,
            "server.address": host.strip("[]"),
            "network.protocol.version": head.version,
            "http.request.header.x-request-id": request_id,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        span = self._tracer.start_span(head.method, context, SpanKind.CLIENT,
                                       start_time=start_ns,
                                       record_exception=False,
                                       set_status_on_exception=False)
        own = span.get_span_context()
        inject(head.headers, incoming, own.trace_id, own.span_id, True)
        return RequestSpan(own.trace_id, own.span_id, span, attributes)

    def shutdown(self) -> None:
        """Flush what is queued (up to the export timeout) and stop the exporter thread;
        blocking: call it on a thread."""
        self._provider.shutdown()


def _has_port(authority: str) -> bool:
    return ":" in authority and not authority.endswith("]")

"""Telemetry: Istio-compatible series, the kernel's own counters, live figures, tracing.

proxy_metrics.py       TCP series with Istio's names and labels
request_metrics.py     Istio's HTTP request series (istio_requests_total, ...)
resilience_metrics.py  circuit-breaker overflow and outlier-ejection series
kernel_collector.py    counters the BPF programs keep, read at scrape time
identity_collector.py  certificate expiry and rotations, read at scrape time
share_collector.py     each pod's use of its fair share, read at scrape time
live_stats.py          the last minutes of traffic for `nodeproxy top` / `stat`
tracing.py             the active tracer (or none) and the tracing counters
trace_headers.py       W3C and B3 trace context read from and written to headers
request_spans.py       the OpenTelemetry SDK side: a request's span and its export
"""

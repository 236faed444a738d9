"""TunnelMetrics.stream: the per-stream "ok" count through a child looked up once is
the same series, with the same value, as counting through ``streams.labels``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from nodeproxy.tunnel.metrics import TunnelMetrics


def test_stream_counts_into_the_labelled_series() -> None:
    registry = CollectorRegistry()
    metrics = TunnelMetrics(registry)
    for _ in range(3):
        metrics.stream("server", "ok")
    metrics.stream("client", "ok")
    metrics.streams.labels("server", "ok").inc()

    def value(side: str) -> float | None:
        return registry.get_sample_value("nodeproxy_hbone_streams_total",
                                         {"side": side, "result": "ok"})

    assert value("server") == 4
    assert value("client") == 1
    assert registry.get_sample_value("nodeproxy_hbone_streams_total",
                                     {"side": "server", "result": "cancelled"}) is None

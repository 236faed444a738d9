"""Tunnel and identity series."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class TunnelMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.handshakes = Counter(
            "nodeproxy_hbone_handshakes", "mTLS handshakes of the HBONE tunnel, by side and result",
            ("side", "result"), registry=registry)
        self.streams = Counter(
            "nodeproxy_hbone_streams", "CONNECT streams, by side and result",
            ("side", "result"), registry=registry)
        self.abuse = Counter(
            "nodeproxy_hbone_abuse_total",
            "HBONE server connections closed with GOAWAY ENHANCE_YOUR_CALM, by the HTTP/2 "
            "budget the peer spent (nodeproxy/codec/h2_guard.py)",
            ("reason",), registry=registry)
        self._stream_results: dict[tuple[str, str], Any] = {}
        self.pooled_connections = Gauge(
            "nodeproxy_hbone_pooled_connections", "Open pooled HBONE client connections",
            registry=registry)

    def stream(self, side: str, result: str) -> None:
        """Count a stream's result: the series' child looked up once per label pair, not
        per stream.  For the fixed results of the per-stream path ("ok"); a result made
        from a peer's bytes (a status) goes through ``streams.labels`` so nothing here
        grows with them."""
        child = self._stream_results.get((side, result))
        if child is None:
            child = self._stream_results[(side, result)] = self.streams.labels(side, result)
        child.inc()

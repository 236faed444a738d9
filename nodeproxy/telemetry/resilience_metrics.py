"""Prometheus series of circuit breaking and outlier detection (circuit_breaker.py, outlier.py).

- ``nodeproxy_http_overflow_total{destination_service, limit}``: requests refused by a
  circuit breaker (limit ``requests`` or ``pending``: answered 503, flag UO), retries not
  made (``retries``) and connections opened past maxConnections by a pool that had none
  (``connections``)
- ``nodeproxy_http_outlier_ejections_total{destination_service, endpoint}`` and
  ``nodeproxy_http_outlier_returns_total{destination_service, endpoint}``
- ``nodeproxy_http_outlier_ejections_skipped_total{destination_service, reason}``: an
  endpoint past its threshold left in because of the cap (``max_ejection_percent``) or
  because it is the last one not ejected (``last_healthy``)
- ``nodeproxy_http_outlier_ejected{destination_service}``: endpoints ejected now, summed
  over the service's clusters (ports and address families)
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge


class ResilienceMetrics:
    """The series above; also the OutlierEvents sink of outlier.OutlierDetector."""

    def __init__(self, registry: CollectorRegistry):
        self.overflows = Counter(
            "nodeproxy_http_overflow_total",
            "Requests, retries and connections refused or exceeded by a circuit breaker",
            ("destination_service", "limit"), registry=registry)
        self.ejections = Counter(
            "nodeproxy_http_outlier_ejections_total",
            "Endpoints ejected by outlier detection",
            ("destination_service", "endpoint"), registry=registry)
        self.returns = Counter(
            "nodeproxy_http_outlier_returns_total",
            "Ejected endpoints returned to load balancing",
            ("destination_service", "endpoint"), registry=registry)
        self.skipped_ejections = Counter(
            "nodeproxy_http_outlier_ejections_skipped_total",
            "Ejections not made because of the ejection cap or the last healthy endpoint",
            ("destination_service", "reason"), registry=registry)
        self.ejected_gauge = Gauge(
            "nodeproxy_http_outlier_ejected", "Endpoints ejected now",
            ("destination_service",), registry=registry)
        # Per service: ejected count per cluster (detector id), summed into the gauge.
        self._ejected: dict[str, dict[int, int]] = defaultdict(dict)

    def overflow(self, service: str, limit: str) -> None:
        self.overflows.labels(service, limit).inc()

    def ejected(self, service: str, endpoint: str) -> None:
        self.ejections.labels(service, endpoint).inc()

    def returned(self, service: str, endpoint: str) -> None:
        self.returns.labels(service, endpoint).inc()

    def skipped(self, service: str, reason: str) -> None:
        self.skipped_ejections.labels(service, reason).inc()

    def ejected_now(self, service: str, cluster: int, count: int) -> None:
        """Cluster `cluster` (any id unique per detector) of the service has `count`
        endpoints ejected now (0 when it goes away)."""
        clusters = self._ejected[service]
        clusters[cluster] = count
        if not count:
            del clusters[cluster]
        self.ejected_gauge.labels(service).set(sum(clusters.values()))

"""Which circuit breaker and which outlier detector each cluster uses, across reloads.

HttpProxy rebuilds its clusters on every configuration; this registry keeps the state
that must outlive that: one CircuitBreaker per service (its limits replaced in place, so
requests and connections in flight stay counted) and one OutlierDetector per cluster
(service, port, address family), kept while the service's outlierDetection is unchanged
and replaced (ejections forgotten) when it changes, dropped when it is removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nodeproxy.config.model import TrafficPolicy
from nodeproxy.http.circuit_breaker import CircuitBreaker
from nodeproxy.http.outlier import OutlierDetector
from nodeproxy.http.pool import Endpoint
from nodeproxy.telemetry.resilience_metrics import ResilienceMetrics

ClusterKey = tuple[str, int, int]  # service key, port, address family


class Resilience:
    def __init__(self, metrics: ResilienceMetrics | None):
        self._metrics = metrics
        self._policies: Mapping[str, TrafficPolicy] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.detectors: dict[ClusterKey, OutlierDetector[Endpoint]] = {}

    def update(self, policies: Mapping[str, TrafficPolicy]) -> None:
        """The services' traffic policies of a new configuration."""
        self._policies = policies
        for service in [s for s in self.breakers if s not in policies]:
            del self.breakers[service]
        for service, breaker in self.breakers.items():
            breaker.limits = policies[service].connection_pool
        for key, detector in list(self.detectors.items()):
            policy = policies.get(key[0])
            if policy is None or policy.outlier_detection != detector.config:
                detector.close()
                del self.detectors[key]

    def breaker(self, service: str, fqdn: str) -> CircuitBreaker:
        breaker = self.breakers.get(service)
        if breaker is None:
            policy = self._policies.get(service, TrafficPolicy())
            metrics = self._metrics
            breaker = self.breakers[service] = CircuitBreaker(
                policy.connection_pool,
                on_overflow=None if metrics is None
                else lambda limit: metrics.overflow(fqdn, limit))
        return breaker

    def detector(self, key: ClusterKey, fqdn: str,
                 endpoints: Sequence[Endpoint]) -> OutlierDetector[Endpoint] | None:
        """The cluster's detector, attached to its current endpoints (None: no outlier
        detection on the service)."""
        policy = self._policies.get(key[0])
        if policy is None or policy.outlier_detection is None:
            return None
        detector = self.detectors.get(key)
        if detector is None:
            detector = self.detectors[key] = OutlierDetector(
                policy.outlier_detection, service=fqdn, events=self._metrics)
        detector.attach(endpoints)
        return detector

    def close(self) -> None:
        for detector in self.detectors.values():
            detector.close()
        self.detectors.clear()


class Slots:
    """The circuit-breaker slots one client request holds: one request slot (its attempts
    follow one another, so one is enough) and, while a retry is in progress, one retry
    slot.  release() gives back whatever is held."""

    __slots__ = ("_request", "_retry")

    def __init__(self) -> None:
        self._request: CircuitBreaker | None = None
        self._retry: CircuitBreaker | None = None

    def request(self, breaker: CircuitBreaker) -> None:
        """Hold a request slot of `breaker` (the attempt's service), or raise Overflow."""
        if self._request is breaker:
            return
        if self._request is not None:
            self._request.end_request()
            self._request = None
        breaker.begin_request()
        self._request = breaker

    def retry(self, breaker: CircuitBreaker) -> bool:
        """Hold a retry slot for the next attempt; False if the breaker refuses it."""
        if not breaker.begin_retry():
            return False
        self._retry = breaker
        return True

    def attempt_done(self) -> None:
        """An attempt's result is known: a retry in progress is over."""
        if self._retry is not None:
            self._retry.end_retry()
            self._retry = None

    def release(self) -> None:
        self.attempt_done()
        if self._request is not None:
            self._request.end_request()
            self._request = None

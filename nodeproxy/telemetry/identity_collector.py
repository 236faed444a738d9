"""Certificate series: expiry per workload identity and rotations, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.identity.certificates import CertificateManager


class IdentityCollector(Collector):
    def __init__(self, certificates: CertificateManager):
        self._certs = certificates

    def collect(self) -> Iterator:
        expiry = GaugeMetricFamily(
            "nodeproxy_certificate_expiry_timestamp_seconds",
            "When the current leaf certificate of each workload identity expires",
            labels=["identity"])
        for identity, when in sorted(self._certs.expiry_timestamps().items()):
            expiry.add_metric([identity], when)
        yield expiry
        yield CounterMetricFamily(
            "nodeproxy_certificate_rotations", "Leaf certificates replaced before expiry",
            value=self._certs.rotations)
        yield CounterMetricFamily(
            "nodeproxy_certificates_issued",
            "Leaf certificates this node obtained (signed itself, or by the signing service)",
            value=self._certs.issued)
        up = getattr(self._certs, "signer_up", None)
        if up is not None:  # certificates come from the mesh signing service
            yield GaugeMetricFamily(
                "nodeproxy_identity_signer_up",
                "1 while the mesh signing service answers; 0: current leaves keep serving",
                value=1.0 if up else 0.0)
            failures = CounterMetricFamily(
                "nodeproxy_identity_signer_failures",
                "Signing requests that got no certificate, by reason (the signer's refusal "
                "reason, or unavailable)", labels=["reason"])
            for reason, count in sorted(getattr(self._certs, "failures", {}).items()):
                failures.add_metric([reason], count)
            yield failures

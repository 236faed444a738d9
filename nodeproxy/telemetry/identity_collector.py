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
            "nodeproxy_certificates_issued", "Leaf certificates signed by this node",
            value=self._certs.issued)

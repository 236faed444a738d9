"""Each enrolled pod's use of its fair share (tcp/fairshare.py), read at scrape time: how
close a pod is to its caps, before it is refused."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.tcp.fairshare import SourceShares


class PodShareCollector(Collector):
    def __init__(self, shares: SourceShares):
        self._shares = shares

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connections = GaugeMetricFamily(
            "nodeproxy_pod_connections",
            "Connections a pod holds open through its outbound listener now "
            "(limits.perPod.maxConnections)", labels=["pod_namespace", "pod"])
        requests = GaugeMetricFamily(
            "nodeproxy_pod_requests_in_flight",
            "HTTP requests a pod has in flight now (limits.perPod.maxRequests)",
            labels=["pod_namespace", "pod"])
        for key, held, in_flight in self._shares.snapshot():
            namespace, _, name = key.partition("/")
            connections.add_metric([namespace, name], held)
            requests.add_metric([namespace, name], in_flight)
        yield connections
        yield requests

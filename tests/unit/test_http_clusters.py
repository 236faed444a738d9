"""Upstream clusters across reloads: what a new configuration keeps (retry budgets,
breakers, detectors, endpoint statistics) and what it replaces, and the /clusters view."""

from __future__ import annotations

import asyncio
from typing import Any

from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import NodeConfig
from nodeproxy.http.clusters import Clusters
from nodeproxy.mesh.destinations import DestinationTable

DOC = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
workloads:
  - {name: web-1, node: n2, ips: [10.244.2.2, "fd00::2:2"], labels: {app: web}}
  - {name: web-2, node: n2, ips: [10.244.2.3], labels: {app: web}}
services:
  - name: web
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
    trafficPolicy:
      retryBudget: {ratio: %s}
      outlierDetection: {consecutive5xxErrors: %d}
  - name: api
    vips: [10.96.0.11]
    ports: [{port: 81, targetPort: 8081}]
    selector: {app: web}
"""


def config(ratio: float = 0.2, errors: int = 5, *, api: bool = True) -> NodeConfig:
    text = DOC % (ratio, errors)
    if not api:
        text = text[:text.index("  - name: api")]
    return parse_config(text).config


def load(clusters: Clusters, cfg: NodeConfig) -> None:
    clusters.update({s.key: s.traffic_policy for s in cfg.services},
                    DestinationTable(cfg), frozenset())


def run(body: Any) -> None:
    """Outlier detectors take the running loop's timers: run inside one."""
    async def main() -> None:
        body()
    asyncio.run(main())


def test_a_cluster_is_one_service_port_and_family_built_once_per_configuration():
    def body() -> None:
        clusters = Clusters(upstreams=None, metrics=None)  # type: ignore[arg-type]
        load(clusters, config())
        web = clusters.get("default/web", 80, 4)
        assert web is not None and clusters.get("default/web", 80, 4) is web
        assert sorted(e.key for e in web.endpoints) == ["10.244.2.2:8080", "10.244.2.3:8080"]
        six = clusters.get("default/web", 80, 6)
        assert six is not None and [e.key for e in six.endpoints] == ["[fd00::2:2]:8080"]
        assert six.breaker is web.breaker and six.budget is web.budget  # per service
        assert six.outlier is not web.outlier  # per cluster
        assert clusters.get("default/web", 81, 4) is None  # not a port of web
        assert clusters.get("default/gone", 80, 4) is None
    run(body)


def test_a_reload_keeps_what_did_not_change_and_replaces_what_did():
    def body() -> None:
        clusters = Clusters(upstreams=None, metrics=None)  # type: ignore[arg-type]
        load(clusters, config())
        web = clusters.get("default/web", 80, 4)
        assert web is not None and web.outlier is not None
        started = web.endpoints[0].stats.begin()
        web.endpoints[0].stats.end(started, ok=True)
        web.budget.record_request()
        web.breaker.requests = 1  # a request in flight across the reload

        load(clusters, config())  # the same configuration again
        again = clusters.get("default/web", 80, 4)
        assert again is not None and again is not web  # rebuilt ...
        assert again.budget is web.budget and again.budget.requests_in_window == 1
        assert again.breaker is web.breaker and again.breaker.requests == 1
        assert again.outlier is web.outlier
        by_key = {e.key: e for e in again.endpoints}
        assert by_key[web.endpoints[0].key].stats.requests == 1  # statistics survive

        load(clusters, config(ratio=0.5, errors=3))  # budget and outlier settings change
        changed = clusters.get("default/web", 80, 4)
        assert changed is not None
        assert changed.budget is not web.budget and changed.budget.ratio == 0.5
        assert changed.outlier is not web.outlier and changed.outlier is not None
        assert changed.breaker is web.breaker  # limits replaced in place, counts kept
    run(body)


def test_the_admin_view_lists_the_clusters_requests_used_with_their_state():
    def body() -> None:
        clusters = Clusters(upstreams=None, metrics=None)  # type: ignore[arg-type]
        load(clusters, config())
        assert clusters.view() == []  # none used yet
        web = clusters.get("default/web", 80, 4)
        assert web is not None
        web.outlier.record("10.244.2.2:8080", 503)  # type: ignore[union-attr]
        [view] = clusters.view()
        assert (view["service"], view["port"], view["family"]) == ("default/web", 80, "ipv4")
        assert view["fqdn"] == "web.default.svc.cluster.local"
        assert view["outlier_detection"] is True
        endpoints = {e["address"]: e for e in view["endpoints"]}  # type: ignore[union-attr]
        assert endpoints["10.244.2.2:8080"]["consecutive_5xx"] == 1
        assert endpoints["10.244.2.3:8080"]["consecutive_5xx"] == 0
        assert view["circuit_breaker"]["max_requests"] == 1024  # type: ignore[index]
        load(clusters, config(api=False))
        assert clusters.view() == []  # a new configuration starts the list afresh
    run(body)

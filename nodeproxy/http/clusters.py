"""Upstream clusters: every service port's endpoints, and the state kept about them.

A cluster is one service port of one address family (Envoy's cluster).  This module
owns, node-wide and across configuration reloads:

- the clusters themselves (``Cluster``), built on first use from the destination table
  and the service's traffic policy: endpoints, balancer, retry budget, hash key source,
  circuit breaker and outlier detector;
- each endpoint's balancing statistics (kept by address across reloads);
- each service's retry budget (kept while its ``retryBudget`` is unchanged);
- the circuit breakers and outlier detectors (through resilience.Resilience);
- the upstream connection pools, one per (source pod, endpoint, upstream protocol,
  service), closed when their pod, endpoint or service goes and swept when idle;
- the admin view of all this (/clusters).

What a request does with a cluster (which endpoint, how many tries) is the router's
(router.py); this module answers "which cluster", "which endpoints may be picked" and
"a connection to this endpoint".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from nodeproxy.codec.message import RequestHead, UpstreamConnection
from nodeproxy.config.model import TrafficPolicy
from nodeproxy.http.balancer import Balancer, make_balancer
from nodeproxy.http.circuit_breaker import CircuitBreaker
from nodeproxy.http.context import RequestContext
from nodeproxy.http.outlier import OutlierDetector
from nodeproxy.http.pool import Endpoint, EndpointPool
from nodeproxy.http.resilience import Resilience
from nodeproxy.http.retry import RetryBudget
from nodeproxy.mesh.destinations import DestinationTable, ServicePortEntry
from nodeproxy.mesh.upstream import Upstreams
from nodeproxy.telemetry.resilience_metrics import ResilienceMetrics

ClusterKey = tuple[str, int, int]  # service key, port, address family
PoolKey = tuple[str, str, bool, str]  # source pod, endpoint, HTTP/2 upstream, service


@dataclass
class Cluster:
    """One service port's endpoints of one address family, and how requests pick them."""

    entry: ServicePortEntry
    endpoints: list[Endpoint]
    balancer: Balancer
    budget: RetryBudget
    hash_header: str | None
    hash_source: bool
    breaker: CircuitBreaker
    outlier: OutlierDetector[Endpoint] | None  # None: no outlier detection

    @property
    def available(self) -> list[Endpoint]:
        """The endpoints a request may go to: those not ejected by outlier detection."""
        return self.endpoints if self.outlier is None else self.outlier.available

    def hash_key(self, ctx: RequestContext, head: RequestHead) -> str | None:
        """The ring-hash key of a request: the configured header, or the source identity."""
        if self.hash_header is not None:
            return head.header(self.hash_header)
        if self.hash_source:
            return ctx.pod.principal
        return None


class Clusters:
    """The node's clusters, pools, breakers and detectors (see the module docstring)."""

    def __init__(self, upstreams: Upstreams, metrics: ResilienceMetrics | None):
        self._upstreams = upstreams
        self._table: DestinationTable | None = None
        self._policies: Mapping[str, TrafficPolicy] = {}
        self._clusters: dict[ClusterKey, Cluster] = {}
        self._stats: dict[str, Endpoint] = {}  # endpoint key -> endpoint (stats survive)
        self._budgets: dict[str, RetryBudget] = {}
        self._pools: dict[PoolKey, EndpointPool] = {}
        self._resilience = Resilience(metrics)

    def update(self, policies: Mapping[str, TrafficPolicy], table: DestinationTable,
               local_pods: Collection[str]) -> None:
        """A new configuration or pod set: clusters are built again on first use; budgets,
        breakers, detectors and statistics carry over where their settings did not change;
        the pools of pods no longer enrolled, endpoints no longer listed and services
        removed are closed."""
        self._table = table
        self._policies = policies
        self._clusters.clear()
        budgets = {}
        for key, policy in policies.items():
            old = self._budgets.get(key)
            budgets[key] = old if old is not None and old.config == policy.retry_budget \
                else RetryBudget(policy.retry_budget)
        self._budgets = budgets
        self._resilience.update(policies)
        endpoints = {Endpoint(b).key for entry in table.service_ports.values()
                     for b in (*entry.backends_v4, *entry.backends_v6)}
        for pool_key in [k for k in self._pools if k[0] not in local_pods
                         or k[1] not in endpoints or k[3] not in policies]:
            self._pools.pop(pool_key).close()
        self._stats = {k: v for k, v in self._stats.items() if k in endpoints}

    def get(self, service: str, port: int, version: int) -> Cluster | None:
        """The cluster of a service port and address family; None if the port is unknown."""
        key = (service, port, version)
        cluster = self._clusters.get(key)
        if cluster is not None:
            return cluster
        assert self._table is not None
        entry = self._table.service_ports.get((service, port))
        if entry is None:
            return None
        endpoints = []
        for backend in entry.backends(version):
            endpoint = Endpoint(backend)
            known = self._stats.get(endpoint.key)
            if known is not None:
                endpoint.stats = known.stats
            self._stats[endpoint.key] = endpoint
            endpoints.append(endpoint)
        policy = self._policies.get(service, TrafficPolicy())
        cluster = Cluster(entry, endpoints, make_balancer(policy.load_balancer),
                          self._budgets.setdefault(service, RetryBudget(policy.retry_budget)),
                          policy.load_balancer.hash_header,
                          policy.load_balancer.hash_source_identity,
                          self._resilience.breaker(service, entry.fqdn),
                          self._resilience.detector(key, entry.fqdn, endpoints))
        self._clusters[key] = cluster
        return cluster

    @staticmethod
    def hash_key(cluster: Cluster, ctx: RequestContext, head: RequestHead) -> str | None:
        """Cluster.hash_key, in the shape mirror.Mirrors takes."""
        return cluster.hash_key(ctx, head)

    def pooled(self, ctx: RequestContext, endpoint: Endpoint,
               cluster: Cluster) -> UpstreamConnection | None:
        """A pooled connection ready to send on now, without awaiting; None: connect()."""
        pool = self._pools.get((ctx.pod.key, endpoint.key, ctx.http2_upstream,
                                cluster.entry.service))
        return None if pool is None else pool.take()

    async def connect(self, ctx: RequestContext, endpoint: Endpoint,
                      cluster: Cluster) -> UpstreamConnection:
        """A pooled connection from the request's source pod to the endpoint, ready to
        send on (pool.EndpointPool.acquire: circuit_breaker.Overflow, proxy.upstream.Refused
        and UpstreamError as it raises them)."""
        key = (ctx.pod.key, endpoint.key, ctx.http2_upstream, cluster.entry.service)
        pool = self._pools.get(key)
        if pool is None:
            policy = self._policies.get(cluster.entry.service, TrafficPolicy())
            backend, pod, service = endpoint.backend, ctx.pod, cluster.entry.fqdn
            upstreams = self._upstreams

            async def connect(protocol: UpstreamConnection) -> object:
                return await upstreams.open(pod, backend, service,
                                            protocol, l7_checked=True)  # type: ignore[type-var]

            pool = self._pools[key] = EndpointPool(
                connect, http2=ctx.http2_upstream, idle_timeout=policy.idle_timeout_seconds,
                breaker=cluster.breaker)
        return await pool.acquire()

    def sweep(self, now: float) -> None:
        """Close upstream connections idle past their service's idle timeout."""
        for pool in list(self._pools.values()):
            pool.sweep(now)

    def view(self) -> list[dict[str, object]]:
        """/clusters: every cluster requests have used, with its endpoints' statistics."""
        view = []
        for (service, port, version), cluster in sorted(self._clusters.items()):
            view.append({
                "service": service, "port": port, "family": f"ipv{version}",
                "fqdn": cluster.entry.fqdn,
                "retry_budget": cluster.budget.snapshot(),
                "retry_budget_exhausted": cluster.budget.exhausted,
                "circuit_breaker": cluster.breaker.snapshot(),
                "outlier_detection": cluster.outlier is not None,
                "endpoints": [_endpoint_view(e, cluster.outlier) for e in cluster.endpoints],
            })
        return view

    def close(self) -> None:
        self._resilience.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _endpoint_view(endpoint: Endpoint,
                   outlier: OutlierDetector[Endpoint] | None) -> dict[str, object]:
    stats = endpoint.stats.snapshot()
    view: dict[str, object] = {
        "address": endpoint.key, "active_requests": stats["active"],
        "latency_ewma_ms": stats["ewma_ms"], "requests": stats["requests"],
        "failures": stats["failures"]}
    if outlier is not None:
        view.update(outlier.endpoint_view(endpoint.key))
    return view

"""The node's L7 proxy: builds the request path's parts and hands them each new mesh
snapshot (mesh/holder.py: it reads the one in force when it starts, then watches for
the next).  Its surface is what the daemon and the outbound listener use: ``serve`` (a
client connection found to speak HTTP), ``settings``, ``clusters_view`` (/clusters) and
``close``.

The request path, in the order a request meets it (Envoy's division of the same work):

- client_connections.py  the client connection: HTTP/1.1 or HTTP/2 server protocol,
                  request-header and idle timeouts, HTTP/2 abuse budgets
                  (uvicorn's protocol classes; Envoy's HTTP connection manager's codec)
- handler.py      one request: fair share, one meaning, route match, rate limit,
                  faults, upgrade or router, its record (Envoy's HCM filter chain)
- router.py       one routed request upstream, attempt by attempt; what follows each
                  attempt is attempts.py's pure decision (Envoy's router filter)
- clusters.py     upstream clusters: endpoints, balancers, retry budgets, circuit
                  breakers, outlier detectors, connection pools (Envoy's cluster manager)
- mirror.py, upgrade_flow.py, authorize.py, local_reply.py, recorder.py  the rest.
"""

from __future__ import annotations

import asyncio
import random

from nodeproxy.config.model import HttpSettings
from nodeproxy.http.access_log import AccessLog
from nodeproxy.http.authorize import RequestAuthorizer
from nodeproxy.http.client_connections import ClientConnection, ClientConnections
from nodeproxy.http.clusters import Clusters
from nodeproxy.http.handler import RequestHandler
from nodeproxy.http.mirror import Mirrors
from nodeproxy.http.rate_limit import Limiters
from nodeproxy.http.recorder import Recorder
from nodeproxy.http.router import Router
from nodeproxy.http.routes import Routes
from nodeproxy.http.upgrade_flow import Upgrades
from nodeproxy.mesh.destinations import ServicePortEntry
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.mesh.upstream import Upstreams
from nodeproxy.tcp.fairshare import SourceShares
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.live_stats import LiveStats
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.telemetry.request_metrics import RequestMetrics
from nodeproxy.telemetry.tracing import Tracing

SWEEP_SECONDS = 5.0


class HttpProxy:
    """Node-wide L7 state: routes, clusters, upstream pools; rebuilt on every config."""

    def __init__(self, *, upstreams: Upstreams, metrics: RequestMetrics,
                 state: MeshState, tracker: ConnectionTracker, trust_domain: str,
                 access_log: AccessLog | None, live: LiveStats | None = None,
                 tracing: Tracing | None = None, tcp_metrics: ProxyMetrics | None = None,
                 shares: SourceShares | None = None):
        self._tracing = tracing
        self._settings = HttpSettings()
        self._limiters = Limiters()
        rng = random.Random()
        self._clusters = Clusters(upstreams, metrics.resilience)
        self._authorizer = RequestAuthorizer(state)
        self._mirrors = Mirrors(metrics, rng, cluster=self._clusters.get,
                                hash_key=self._clusters.hash_key,
                                authorized=self._authorizer.allows,
                                connect=self._clusters.connect)
        self._router = Router(clusters=self._clusters, authorizer=self._authorizer,
                              mirrors=self._mirrors, metrics=metrics, rng=rng)
        recorder = Recorder(metrics=metrics, live=live, access_log=access_log,
                            trust_domain=trust_domain)
        # tracker: upgraded connections join it, to be judged again (upgrade_flow.py).
        self._upgrades = Upgrades(router=self._router, authorizer=self._authorizer,
                                  upstreams=upstreams, metrics=metrics, recorder=recorder,
                                  tcp_metrics=tcp_metrics, tracker=tracker)
        self._handler = RequestHandler(router=self._router, upgrades=self._upgrades,
                                       recorder=recorder, metrics=metrics, shares=shares,
                                       rng=rng)
        self._connections = ClientConnections(self._handler.handle, metrics)
        self._sweeper: asyncio.Task[None] | None = None
        self._refresh(state.current)
        state.watch(self._refresh)

    def _refresh(self, snapshot: MeshSnapshot) -> None:
        """A new mesh snapshot (configuration or pod set): rebuild routes and clusters;
        close the pools of pods no longer enrolled and of endpoints no longer listed."""
        config, table, local_pods = snapshot.config, snapshot.table, snapshot.local_pods
        settings = self._settings = config.http
        tracer = self._tracing.configure(config.tracing) if self._tracing is not None \
            else None
        self._limiters = Limiters(self._limiters)
        routes = Routes(config, self._limiters)
        self._clusters.update({s.key: s.traffic_policy for s in config.services}, table,
                              local_pods)
        self._router.update(settings, self._limiters.workloads(config))
        self._upgrades.update(settings)
        self._handler.update(settings, routes, tracer)
        self._connections.update(settings, local_pods)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle upstream connections and idle HTTP/2 client connections."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = loop.time()
            self._clusters.sweep(now)
            self._connections.expire(now)

    @property
    def settings(self) -> HttpSettings:
        return self._settings

    def serve(self, pod: EnrolledPod, entry: ServicePortEntry, version: int,
              transport: asyncio.Transport, initial: bytes, *, http2_client: bool,
              http2_upstream: bool, client_eof: bool = False,
              accepted_at: float | None = None) -> ClientConnection:
        """Serve a client connection at L7 (client_connections.ClientConnections.serve)."""
        return self._connections.serve(pod, entry, version, transport, initial,
                                       http2_client=http2_client,
                                       http2_upstream=http2_upstream, client_eof=client_eof,
                                       accepted_at=accepted_at)

    def clusters_view(self) -> list[dict[str, object]]:
        """/clusters: every cluster requests have used, with its endpoints' statistics."""
        return self._clusters.view()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._mirrors.close()
        self._clusters.close()
        if self._tracing is not None:
            self._tracing.close()

"""HTTP servers of the daemon (nodeproxy.admin.http_server).

- admin, 127.0.0.1:15000: /ready, /config_dump, /pods, /clusters, /metrics,
  /stats/live?window=SECONDS&namespace=NS (`nodeproxy top` and `nodeproxy stat` read it)
- metrics, :15020: /metrics and /stats/prometheus (Istio's path)
- readiness, :15021: /healthz/ready
- control, a Unix socket (mode 0600): the application nodeproxy.daemon.control_api makes
  (runtime enrollment, used by the CNI plugin and `nodeproxy enroll`; the upgrade handover)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NotRequired, Protocol, TypedDict

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.admin.http_server import HttpServer, PathTable, Request, Response
from nodeproxy.admin.metrics_page import MetricsPage

log = logging.getLogger(__name__)


class DaemonView(Protocol):
    registry: CollectorRegistry

    def is_ready(self) -> bool: ...
    def ready_detail(self) -> list[str]: ...
    def config_dump(self) -> dict[str, Any]: ...
    def pods_view(self) -> list[dict[str, Any]]: ...


class EndpointView(TypedDict):
    """One upstream endpoint of a cluster, as /clusters shows it."""

    address: str  # "ip:port" ("[ip6]:port")
    active_requests: int  # requests in flight to it now
    latency_ewma_ms: float | None  # the balancer's latency estimate, None before any sample
    requests: int  # attempts sent to it since it joined
    failures: int  # attempts that failed, as the balancer counts failures
    # With outlier detection (nodeproxy/http/outlier.py OutlierDetector.endpoint_view):
    ejected: NotRequired[bool]
    ejection_remaining_seconds: NotRequired[float]
    ejection_multiplier: NotRequired[int]  # ejections in a row
    times_ejected: NotRequired[int]  # ejections, ever
    consecutive_5xx: NotRequired[int]
    consecutive_gateway_errors: NotRequired[int]


class ClusterView(TypedDict):
    """One upstream cluster: a destination service's port and its endpoints."""

    service: str  # destination_service FQDN
    port: int
    endpoints: list[EndpointView]
    retries: int  # attempts retried
    retry_budget_exhausted: int  # retries refused by the retry budget
    circuit_breaker: dict[str, Any]  # limits, live counts, overflows (CircuitBreaker.snapshot)
    outlier_detection: bool  # whether endpoints carry the outlier fields


# What the daemon passes for /clusters: the L7 pools' current state, one entry per cluster
# (ClusterView is the expected shape; any JSON-serializable mappings are shown as given).
ClustersProvider = Callable[[], Sequence[Mapping[str, Any]]]
# What the daemon passes for /stats/live: (window seconds or None for its default,
# namespace or None) -> the figures (nodeproxy.telemetry.live_stats); ValueError for a
# window it does not keep.
LiveProvider = Callable[[int | None, str | None], Mapping[str, Any]]



class FaceCollector(Collector):
    """The daemon's own HTTP faces at scrape time: connections open on each, and what each
    refused, timed out or cut, by reason (the bounds in nodeproxy.admin.http_server), so an
    operator sees a scraper or a probe being turned away before the kubelet does."""

    def __init__(self, servers: Sequence[HttpServer], page: MetricsPage | None = None):
        self._servers = servers
        self._page = page

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        open_now = GaugeMetricFamily(
            "nodeproxy_admin_connections", "Connections open on the daemon's own HTTP "
            "face (admin, metrics, readiness, control)", labels=["face"])
        refused = CounterMetricFamily(
            "nodeproxy_admin_refusals", "Connections and requests the daemon's own HTTP "
            "face refused, timed out or cut, by reason (per_source, full, evicted, "
            "stalled, late_head, late_body, refused_<status>)", labels=["face", "reason"])
        for server in self._servers:
            open_now.add_metric([server.name], len(server.connections))
            for reason, count in sorted(server.limiter.counts.items()):
                refused.add_metric([server.name, reason], count)
        yield open_now
        yield refused
        if self._page is not None:
            pages = CounterMetricFamily(
                "nodeproxy_admin_metrics_pages", "Prometheus pages served by the daemon: "
                "rendered, or shared (the last rendering, at most 1 s old, served to a "
                "client other than the node itself)", labels=["served"])
            pages.add_metric(["rendered"], self._page.rendered)
            pages.add_metric(["shared"], self._page.shared)
            yield pages


class AdminServers:
    def __init__(self, daemon: DaemonView, clusters: ClustersProvider | None = None,
                 live: LiveProvider | None = None):
        self._d = daemon
        self._clusters = clusters
        self._live = live
        self._servers: list[HttpServer] = []
        self._control_socket: str | None = None
        self._faces: FaceCollector | None = None
        self._page = MetricsPage(daemon.registry)

    async def _metrics(self, request: Request) -> Response:
        return Response(self._page.body(request.source), content_type=CONTENT_TYPE_LATEST)

    async def _ready(self, _request: Request) -> Response:
        detail = "".join(f"{line}\n" for line in self._d.ready_detail())
        if self._d.is_ready():
            return Response.text("ready\n" + detail)
        return Response.text("not ready\n" + detail, 503)

    async def _config_dump(self, _request: Request) -> Response:
        return Response.json(self._d.config_dump())

    async def _pods(self, _request: Request) -> Response:
        return Response.json(self._d.pods_view())

    async def _clusters_page(self, _request: Request) -> Response:
        if self._clusters is None:
            return Response.json([])
        try:
            clusters = [dict(c) for c in self._clusters()]
        except Exception as e:  # the admin page must answer even if the provider breaks
            log.exception("admin: the /clusters provider failed")
            return Response.json({"error": f"{type(e).__name__}: {e}"}, 500)
        return Response.json(clusters)

    async def _live_page(self, request: Request) -> Response:
        if self._live is None:
            return Response.json({"error": "live figures are not kept (admin.liveStatsSeconds: 0)"},
                         404)
        raw = request.query.get("window")
        if raw is not None and not raw.isdigit():
            return Response.json(
                {"error": f"window must be a whole number of seconds, not {raw!r}"}, 400)
        try:
            window = int(raw) if raw is not None else None
            return Response.json(dict(self._live(window, request.query.get("namespace") or None)))
        except ValueError as e:
            return Response.json({"error": str(e)}, 400)
        except Exception as e:  # the admin page must answer even if the provider breaks
            log.exception("admin: the /stats/live provider failed")
            return Response.json({"error": f"{type(e).__name__}: {e}"}, 500)

    def admin_app(self) -> PathTable:
        """The 127.0.0.1:15000 routes (their own method so tests can serve them alone)."""
        admin = PathTable()
        admin.add_get("/ready", self._ready)
        admin.add_get("/config_dump", self._config_dump)
        admin.add_get("/pods", self._pods)
        admin.add_get("/clusters", self._clusters_page)
        admin.add_get("/stats/live", self._live_page)
        admin.add_get("/metrics", self._metrics)
        return admin

    async def start(self, *, admin_address: str, admin_port: int, metrics_address: str,
                    metrics_port: int, readiness_port: int, control_socket: str,
                    control: PathTable) -> None:
        admin = self.admin_app()
        self._faces = FaceCollector(self._servers, self._page)
        self._d.registry.register(self._faces)

        metrics = PathTable()
        metrics.add_get("/metrics", self._metrics)
        metrics.add_get("/stats/prometheus", self._metrics)

        readiness = PathTable()
        readiness.add_get("/healthz/ready", self._ready)

        await self._serve_tcp(admin, "admin", admin_address, admin_port)
        await self._serve_tcp(metrics, "metrics", metrics_address, metrics_port)
        await self._serve_tcp(readiness, "readiness", metrics_address, readiness_port)
        os.makedirs(os.path.dirname(control_socket) or ".", exist_ok=True)
        if os.path.exists(control_socket):
            os.unlink(control_socket)  # left by a crashed instance
        server = HttpServer(control, "control")
        await server.start_unix(control_socket)
        os.chmod(control_socket, 0o600)
        self._servers.append(server)
        self._control_socket = control_socket

    async def _serve_tcp(self, routes: PathTable, name: str, host: str, port: int) -> None:
        # Throttled: a pod may ask a face RATE_PER_SOURCE requests/s (the node itself, any).
        server = HttpServer(routes, name, throttle=True)
        # reuse_port: during an upgrade the new instance binds while the old one still does.
        await server.start_tcp(host, port, reuse_port=True)
        self._servers.append(server)

    async def stop(self, unlink_control_socket: bool = True) -> None:
        """Close every server; the control socket's path is left alone after a handover
        (it is the new instance's by then)."""
        for server in reversed(self._servers):
            await server.stop()
        self._servers.clear()
        if self._faces is not None:
            self._d.registry.unregister(self._faces)
            self._faces = None
        path = self._control_socket
        if unlink_control_socket and path and os.path.exists(path):
            os.unlink(path)

"""The HTTP connection manager: every request of a captured client connection to a service.

Per request (Envoy's order): give the request its one meaning (request_target.py,
header_fields.py: the target normalized, one value per header name; a refusal is 400,
flag DPE), match a route rule (none: 404, flag NR), pick the rule's
backend service by weight, pick an endpoint with the service's balancer, authorize the
request against the destination workload's policies (403, flag UAEX), send it over a
pooled upstream connection, and retry a failed attempt when the rule's retry policy, the
retry budget and the request body allow, after a backoff with full jitter.  A request
timeout bounds the whole exchange (504, UT); a per-try timeout bounds each attempt.
The response streams back; a backend that breaks off mid-response resets the client's
exchange (flag UC) instead of leaving it waiting.  Each request ends in one metric
observation (Istio's series) and, if the source workload asks, one access-log line.
A rule with mirrors also starts copies of the request to its shadow services (mirror.py).
Local rate limits (rate_limit.py) and injected faults (fault.py) act in this order: the
rule's limit (429, RL), the rule's fault delay (DI) and abort (FI), then per attempt,
after the endpoint is picked and authorized, its workload's limit (429, RL).

Fair share: a source pod may have ``limits.perPod.maxRequests`` requests in flight over
all its connections; past it a request is answered 503 at once (flag OM, as Envoy's
overload manager), counted in nodeproxy_http_refused_total.  A client too slow to send
is cut off: no whole request head within ``http.requestHeadersTimeoutSeconds`` (h1.py;
HTTP/2: _ClientH2Server), or no whole request within ``http.requestTimeoutSeconds``
of its head (408 if nothing was answered yet, and the connection closes).

The proxy acts for the source pod here, as Istio's waypoint does: it authorizes each
request with the destination's policies itself and marks the HBONE streams it opens,
so the destination node does not refuse them for rules it cannot see at L4.

Upgrades (upgrade.py decides which): an allowed HTTP/1.1 upgrade request is authorized
like any request and sent to one endpoint on a connection of its own; nothing else goes
upstream until that endpoint answers it with a 101 naming the offered protocol.  Then
the request is recorded (status 101) and both connections become one new L4 flow (Istio's
TCP series, and an access-log line when it ends), the client's early bytes first.  Any
other answer goes back as an ordinary response and the client connection closes, its
early bytes unread; a 101 naming another protocol is an upstream protocol error (502,
UPE).  CONNECT, in both protocols, is refused (403).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.h2 import ErrorCodes, H2Server
from nodeproxy.codec.header_fields import one_view
from nodeproxy.codec.message import (
    Body,
    BodyError,
    Exchange,
    Headers,
    MalformedRequest,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.codec.request_target import (
    Normalized,
    Refusal,
    TargetPolicy,
    normalize,
    normalize_authority,
)
from nodeproxy.codec.upgrade import (
    NOT_SWITCHED,
    UNEXPECTED_101,
    WITH_BODY,
    WRONG_PROTOCOL,
    Verdict,
    completes,
    connect_refusal,
    decide_upgrade,
)
from nodeproxy.config.model import (
    Http2Limits,
    HttpSettings,
    RetryPolicy,
    TrafficPolicy,
    Workload,
)
from nodeproxy.http.access_log import AccessLog, AccessLogEntry, trace_id
from nodeproxy.http.balancer import Balancer, make_balancer
from nodeproxy.http.circuit_breaker import OVERFLOW_TEXT, CircuitBreaker, Overflow
from nodeproxy.http.fault import ABORT_BODY, Fault
from nodeproxy.http.mirror import BodyTap, Mirrors
from nodeproxy.http.outlier import OutlierDetector
from nodeproxy.http.pool import Endpoint, EndpointPool, abort_exchange
from nodeproxy.http.rate_limit import Limiter, Limiters, retry_after
from nodeproxy.http.resilience import Resilience, Slots
from nodeproxy.http.retry import RetryBudget, backoff_delay, should_retry
from nodeproxy.http.routes import CompiledRule, Routes, apply_modifier
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.mesh.destinations import (
    Backend,
    ServicePortEntry,
    WorkloadRef,
)
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.mesh.upstream import Refused, Upstreams, source_address
from nodeproxy.policy.admission import Admitter
from nodeproxy.policy.authorization import DestinationWorkload, RequestAttributes
from nodeproxy.tcp.fairshare import REQUEST_LIMIT, RefusalLog, SourceShares
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.telemetry.live_stats import LiveStats, route_name
from nodeproxy.telemetry.proxy_metrics import UNKNOWN, ConnectionMeter, ProxyMetrics, TcpLabels
from nodeproxy.telemetry.request_metrics import (
    RequestLabels,
    RequestMetrics,
    istio_request_protocol,
)
from nodeproxy.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from nodeproxy.telemetry.request_spans import RequestSpan, Tracer

log = logging.getLogger(__name__)

# gRPC's mapping of HTTP statuses to gRPC codes, for local replies to gRPC clients.
GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
LOCAL_REPLY_BODY = {
    403: "RBAC: access denied",
    404: "no route",
    503: "no healthy upstream",
    429: "local_rate_limited",
}
OVERLOAD_TEXT = "overloaded: too many requests in flight from this pod"
UPGRADE_REFUSED = "upgrade not allowed"
RESOURCE_EXHAUSTED = 8  # a gRPC client refused by a rate limit gets this code


@dataclass
class _Cluster:
    """One service port's endpoints of one address family, and how requests pick them."""

    entry: ServicePortEntry
    endpoints: list[Endpoint]
    balancer: Balancer
    budget: RetryBudget
    hash_header: str | None
    hash_source: bool
    breaker: CircuitBreaker
    outlier: OutlierDetector[Endpoint] | None  # None: no outlier detection


@dataclass
class _Outcome:
    """What one request did, for its metric and its access-log line."""

    flags: list[str] = field(default_factory=list)
    attempts: int = 0
    status: int = 0
    grpc_status: str = ""  # Istio leaves it empty for requests that are not gRPC
    endpoint: Endpoint | None = None
    destination: WorkloadRef | None = None
    service: str = UNKNOWN
    bytes_sent: int = 0
    route: str | None = None  # the matched rule's HTTPRoute ("" default, None: no match)
    mirror_tap: BodyTap | None = None  # the request's body, copied for mirrors

    @property
    def flag_text(self) -> str:
        return ",".join(dict.fromkeys(self.flags)) or "-"


class ClientConnection:
    """A captured client connection served at L7: what drain, idle expiry and pod removal
    need of it."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.server: H1Server | _ClientH2Server | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def closed(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def begin_drain(self) -> None:
        """Stop taking requests: close at once if idle, else after the requests in flight
        (HTTP/1.1: ``connection: close`` on the last response; HTTP/2: GOAWAY)."""
        if isinstance(self.server, H1Server):
            self.server.drain()
        elif self.server is not None:
            self.server.shutdown()

    def expire(self, now: float, idle_timeout: float) -> None:
        """HTTP/2 connections idle past the timeout are closed (HTTP/1.1 times itself)."""
        server = self.server
        if isinstance(server, _ClientH2Server) and server.idle_since is not None \
                and now - server.idle_since >= idle_timeout:
            server.shutdown()

    def abort(self) -> None:
        reset(self.transport)


SWEEP_SECONDS = 5.0


class HttpProxy:
    """Node-wide L7 state: routes, clusters, upstream pools; rebuilt on every config."""

    def __init__(self, *, upstreams: Upstreams, metrics: RequestMetrics,
                 state: MeshState, trust_domain: str,
                 access_log: AccessLog | None, live: LiveStats | None = None,
                 tracing: Tracing | None = None, tcp_metrics: ProxyMetrics | None = None,
                 shares: SourceShares | None = None):
        self._upstreams = upstreams
        self._tcp_metrics = tcp_metrics  # upgraded connections are counted as TCP flows
        self._shares = shares  # requests in flight per source pod
        self._live = live
        self._metrics = metrics
        self._state = state  # read at each decision; its watcher rebuilds what follows
        self._trust_domain = trust_domain
        self._access_log = access_log
        self._tracing = tracing
        self._tracer: Tracer | None = None  # None: tracing off, one check per request
        self._random = random.Random()
        self._settings = HttpSettings()
        self._target_policy = TargetPolicy.of(self._settings)
        self._routes: Routes | None = None
        self._limiters = Limiters()
        self._workload_limits: dict[tuple[str, str], Limiter] = {}
        self._policies: dict[str, TrafficPolicy] = {}
        self._clusters: dict[tuple[str, int, int], _Cluster] = {}
        self._stats: dict[str, Endpoint] = {}  # endpoint key -> endpoint (stats survive)
        self._budgets: dict[str, RetryBudget] = {}
        self._pools: dict[tuple[str, str, bool, str], EndpointPool] = {}
        self._resilience = Resilience(metrics.resilience)
        self._refusals = RefusalLog(log)
        self._clients: set[ClientConnection] = set()
        # Pods whose HTTP/2 connection was closed for abuse: loop time it last happened.
        self._h2_abusers: dict[str, float] = {}
        self._policed_for: Admitter | None = None
        self._policed_cache: dict[str, bool] = {}
        self._labels: dict[tuple[object, ...], RequestLabels] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._mirrors = Mirrors(metrics, self._random, cluster=self._cluster,
                                hash_key=self._hash_key, authorized=self._authorized,
                                connect=self._connection)
        self._refresh(state.current)
        state.watch(self._refresh)

    # -- configuration ---------------------------------------------------------------------

    def _refresh(self, snapshot: MeshSnapshot) -> None:
        """A new mesh snapshot (configuration or pod set): rebuild routes and clusters;
        close the pools of pods no longer enrolled and of endpoints no longer listed."""
        config, table, local_pods = snapshot.config, snapshot.table, snapshot.local_pods
        self._settings = config.http
        self._target_policy = TargetPolicy.of(config.http)
        if self._tracing is not None:
            self._tracer = self._tracing.configure(config.tracing)
        self._limiters = Limiters(self._limiters)
        self._routes = Routes(config, self._limiters)
        self._workload_limits = self._limiters.workloads(config)
        self._policies = {s.key: s.traffic_policy for s in config.services}
        self._clusters.clear()
        budgets = {}
        for key, policy in self._policies.items():
            old = self._budgets.get(key)
            budgets[key] = old if old is not None and old.config == policy.retry_budget \
                else RetryBudget(policy.retry_budget)
        self._budgets = budgets
        self._resilience.update(self._policies)
        endpoints = {Endpoint(b).key for entry in table.service_ports.values()
                     for b in (*entry.backends_v4, *entry.backends_v6)}
        for key in [k for k in self._pools if k[0] not in local_pods or k[1] not in endpoints
                    or k[3] not in self._policies]:
            self._pools.pop(key).close()
        self._stats = {k: v for k, v in self._stats.items() if k in endpoints}
        self._h2_abusers = {k: v for k, v in self._h2_abusers.items() if k in local_pods}
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle upstream connections and idle HTTP/2 client connections."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = loop.time()
            for pool in list(self._pools.values()):
                pool.sweep(now)
            for client in list(self._clients):
                client.expire(now, self._settings.idle_timeout_seconds)

    @property
    def settings(self) -> HttpSettings:
        return self._settings

    def _cluster(self, service: str, port: int, version: int) -> _Cluster | None:
        key = (service, port, version)
        cluster = self._clusters.get(key)
        if cluster is not None:
            return cluster
        entry = self._state.current.table.service_ports.get((service, port))
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
        cluster = _Cluster(entry, endpoints, make_balancer(policy.load_balancer),
                           self._budgets.setdefault(service, RetryBudget(policy.retry_budget)),
                           policy.load_balancer.hash_header,
                           policy.load_balancer.hash_source_identity,
                           self._resilience.breaker(service, entry.fqdn),
                           self._resilience.detector(key, entry.fqdn, endpoints))
        self._clusters[key] = cluster
        return cluster

    def clusters_view(self) -> list[dict[str, object]]:
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._mirrors.close()
        self._resilience.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._tracing is not None:
            self._tracing.close()

    # -- connections -----------------------------------------------------------------------

    def serve(self, pod: EnrolledPod, entry: ServicePortEntry, version: int,
              transport: asyncio.Transport, initial: bytes, *, http2_client: bool,
              http2_upstream: bool, client_eof: bool = False,
              accepted_at: float | None = None) -> ClientConnection:
        """Serve a client connection whose first bytes were `initial` (and that has already
        half-closed, if client_eof); its first request has been awaited since
        `accepted_at` (loop time)."""
        connection = ClientConnection(transport)
        self._clients.add(connection)
        connection.done.add_done_callback(lambda _f: self._clients.discard(connection))
        context = _Context(pod, entry, version, http2_upstream, pod.workload.access_log)
        settings = self._settings

        async def handle(exchange: Exchange) -> None:
            await self._handle(context, exchange)

        def bad_request(protocol: str) -> Callable[[str], None]:
            return lambda reason: self._metrics.count_bad_request(protocol, reason)

        def timed_out(protocol: str) -> Callable[[str], None]:
            return lambda kind: self._metrics.count_downstream_timeout(protocol, kind)

        if http2_client:
            h2_server = _ClientH2Server(
                handle, max_header_bytes=settings.max_header_bytes,
                limits=self._http2_limits(pod),
                on_protocol_error=lambda code, message:
                self._metrics.count_bad_request("http/2", _h2_error_label(code)),
                on_bad_request=bad_request("http/2"),
                on_abuse=lambda reason: self._http2_abuse(pod, reason))
            h2_server.on_closed = connection.closed
            h2_server.watch_heads(settings.request_headers_timeout_seconds, accepted_at,
                                  timed_out("http/2"))
            connection.server = h2_server
            h2_server.attach(transport, initial)
            if not h2_server.closed:  # (closed for abuse already: it stays unread)
                transport.resume_reading()  # the sniffer left it paused
        else:
            h1_server = H1Server(handle, max_header_bytes=settings.max_header_bytes,
                                 idle_timeout=settings.idle_timeout_seconds,
                                 on_bad_request=bad_request("http/1.1"),
                                 on_closed=connection.closed,
                                 request_headers_timeout=settings.request_headers_timeout_seconds,
                                 on_timeout=timed_out("http/1.1"))
            connection.server = h1_server
            h1_server.attach(transport, initial, accepted_at)
            if client_eof:
                h1_server.eof_received()
        return connection

    def _http2_limits(self, pod: EnrolledPod) -> Http2Limits:
        """The HTTP/2 budgets of a new connection from the pod: a tenth of them while the
        pod is under an abuse penalty (Http2Limits.abuse_penalty_seconds)."""
        limits = self._settings.http2
        since = self._h2_abusers.get(pod.key)
        if since is None:
            return limits
        if asyncio.get_running_loop().time() - since < limits.abuse_penalty_seconds:
            return limits.penalized()
        del self._h2_abusers[pod.key]
        return limits

    def _http2_abuse(self, pod: EnrolledPod, reason: str) -> None:
        self._metrics.count_http2_abuse(reason)
        if self._settings.http2.abuse_penalty_seconds:
            self._h2_abusers[pod.key] = asyncio.get_running_loop().time()

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, ctx: _Context, exchange: Exchange) -> None:
        shares = self._shares
        if shares is not None and not shares.begin_request(ctx.pod.key):
            await self._overloaded(ctx, exchange)
            return
        try:
            await self._handle_admitted(ctx, exchange)
        finally:
            if shares is not None:
                shares.end_request(ctx.pod.key)

    async def _overloaded(self, ctx: _Context, exchange: Exchange) -> None:
        """The source pod has maxRequests in flight: 503 OM at once, counted and logged
        (rate-limited); the request is recorded like any other."""
        start, started_at = time.monotonic(), time.time()
        outcome = _Outcome(service=ctx.entry.fqdn, flags=["OM"])
        reason = "pod_" + REQUEST_LIMIT
        self._metrics.count_refused(ctx.pod.workload.namespace, ctx.pod.ref.workload, reason)
        self._refusals.refused(ctx.pod.key, reason, "HTTP request")
        request_id = exchange.request.header("x-request-id") or self._request_id()
        try:
            await self._local_reply(exchange, outcome, 503, OVERLOAD_TEXT)
        except (ConnectionError, OSError, BodyError):
            outcome.flags.append("DC")
        finally:
            self._record(ctx, exchange, outcome, start, started_at, request_id)

    def _request_timer(self, exchange: Exchange) -> asyncio.TimerHandle | None:
        """http.requestTimeoutSeconds for the rest of the request to arrive (none needed
        when the head ended it)."""
        seconds = self._settings.request_timeout_seconds
        if not seconds or exchange.body.ended:
            return None
        return asyncio.get_running_loop().call_later(seconds, self._request_timed_out,
                                                     exchange)

    def _request_timed_out(self, exchange: Exchange) -> None:
        body = exchange.body
        if body.ended or body.error is not None:
            return
        self._metrics.count_downstream_timeout(_wire(exchange.request), "request")
        if isinstance(exchange, H1Exchange):
            exchange.keep_alive = False  # the rest of its body cannot be told from a request
        # The forwarding path sees a malformed request and answers its status, unless it
        # has answered already (then the exchange is reset).
        body.fail(MalformedRequest(408, "request timeout"))

    async def _handle_admitted(self, ctx: _Context, exchange: Exchange) -> None:
        start = time.monotonic()
        started_at = time.time()
        head = exchange.request
        outcome = _Outcome(service=ctx.entry.fqdn)
        refusal = self._one_meaning(head)
        if refusal is not None:
            await self._refuse(ctx, exchange, outcome, refusal, start, started_at)
            return
        request_id = head.header("x-request-id")
        if request_id is None:
            request_id = self._request_id()
            head.headers.append(("x-request-id", request_id))
        span = None if self._tracer is None else \
            self._tracer.begin(head, request_id, int(started_at * 1e9))
        assert self._routes is not None
        rule = self._routes.table(ctx.entry.service, ctx.entry.port).match(head)
        if rule is not None:
            outcome.route = rule.route
        # A rule without a request timeout is declared streaming: its requests may take
        # as long as they take to arrive, too.
        receiving = self._request_timer(exchange) if rule is None or \
            rule.timeouts.request_seconds else None
        tunnel: _Tunnel | None = None
        try:
            if head.method == "CONNECT":
                await self._refuse_upgrade(exchange, outcome,
                                           connect_refusal(head.path, head.version))
            elif rule is None:
                outcome.flags.append("NR")
                await self._local_reply(exchange, outcome, 404)
            elif rule.rate_limit is not None and \
                    await self._limited(ctx, exchange, rule.rate_limit, outcome, "route"):
                pass
            elif rule.fault is not None and await self._inject(exchange, rule.fault, outcome):
                pass
            elif isinstance(exchange, H1Exchange) and exchange.upgrade:
                tunnel = await self._upgrade(ctx, exchange, rule, outcome)
            else:
                await self._forward_timed(ctx, exchange, rule, outcome)
        except BodyError:
            outcome.flags.append("DC")
        except (ConnectionError, OSError):
            outcome.flags.append("DC")
        finally:
            if receiving is not None:
                receiving.cancel()
            if exchange.client_gone and "DC" not in outcome.flags:
                outcome.flags.append("DC")
            if outcome.mirror_tap is not None:
                outcome.mirror_tap.primary_done()
            self._record(ctx, exchange, outcome, start, started_at, request_id, span)
        if tunnel is not None:
            await self._relay_upgraded(ctx, exchange, tunnel, outcome, request_id)

    async def _forward_timed(self, ctx: _Context, exchange: Exchange, rule: CompiledRule,
                             outcome: _Outcome) -> None:
        """Forward under the rule's request timeout (504, UT, when it passes)."""
        timeout = rule.timeouts.request_seconds or None
        try:
            # asyncio.timeout, not wait_for: no extra task per request.
            async with asyncio.timeout(timeout):
                await self._forward(ctx, exchange, rule, outcome)
        except TimeoutError:
            outcome.flags.append("UT")
            if exchange.responded:
                exchange.reset()
            else:
                await self._local_reply(exchange, outcome, 504, "upstream request timeout")

    def _one_meaning(self, head: RequestHead) -> Refusal | Normalized | None:
        """Give the request the one meaning routing, authorization and the upstream all
        use: its header fields one per name (header_fields.py) and its target normalized
        (request_target.py), in place.  A Refusal, or the Normalized target when it is to
        be redirected to; None when the request goes on.  CONNECT's target is an
        authority, not a path: it is refused whole in _handle (upgrade.py)."""
        if head.method == "CONNECT":
            return None
        try:
            head.headers = one_view(head.headers)
            normalized = normalize(head.path, self._target_policy)
            head.authority = normalize_authority(head.authority)
        except Refusal as e:
            return e
        if normalized.redirect:
            return normalized
        head.path = normalized.target
        return None

    async def _refuse(self, ctx: _Context, exchange: Exchange, outcome: _Outcome,
                      refusal: Refusal | Normalized, start: float, started_at: float) -> None:
        """Answer a request refused before routing: 400 (counted by reason), or 307 to its
        normalized target (UNESCAPE_AND_REDIRECT).  Nothing is forwarded."""
        head = exchange.request
        request_id = head.header("x-request-id") or self._request_id()
        try:
            if isinstance(refusal, Refusal):
                log.debug("request refused (%s): %s", refusal.reason, refusal)
                self._metrics.count_bad_request(_wire(head), refusal.reason)
                outcome.flags.append("DPE")
                await self._local_reply(exchange, outcome, 400, "bad request")
            else:
                await self._local_reply(exchange, outcome, 307, "",
                                        headers=[("location", refusal.target)])
        except (BodyError, ConnectionError, OSError):
            outcome.flags.append("DC")
        finally:
            self._record(ctx, exchange, outcome, start, started_at, request_id)

    async def _forward(self, ctx: _Context, exchange: Exchange, rule: CompiledRule,
                       outcome: _Outcome) -> None:
        slots = Slots()  # the circuit-breaker slots the request holds
        try:
            await self._forward_attempts(ctx, exchange, rule, outcome, slots)
        finally:
            slots.release()

    async def _forward_attempts(self, ctx: _Context, exchange: Exchange, rule: CompiledRule,
                                outcome: _Outcome, slots: Slots) -> None:
        head = exchange.request
        policy: RetryPolicy = rule.retry
        source: Body = exchange.body
        if rule.mirrors:  # copies for shadow services; the body is read through a tap
            outcome.mirror_tap = self._mirrors.start(
                ctx, head, source, rule, self._settings.retry_buffer_bytes)
            source = outcome.mirror_tap or source  # type: ignore[assignment]
        body = ReplayableBody(source,
                              self._settings.retry_buffer_bytes if policy.attempts else 0)
        budget: RetryBudget | None = None
        last_error: UpstreamError | None = None
        response: UpstreamResponse | None = None
        connection: UpstreamConnection | None = None
        while True:
            outcome.attempts += 1
            chosen = await self._choose(ctx, exchange, rule, outcome)
            if chosen is None:
                return
            cluster, endpoint = chosen
            if budget is None:
                budget = cluster.budget
                budget.record_request()
            upstream_head = RequestHead(
                head.method, head.path, head.authority,
                apply_modifier(head.headers, rule.request_headers), head.scheme,
                "2" if ctx.http2_upstream else "1.1")
            if outcome.attempts > 1:
                # A copy: without header modifiers the list is the client's own, and an
                # append would pile one count per attempt onto it.
                upstream_head.headers = [*upstream_head.headers,
                                         ("x-envoy-attempt-count", str(outcome.attempts))]
            response, connection, last_error = None, None, None
            started = endpoint.stats.begin()
            judged = True  # does the result say something about the endpoint (outliers)?
            try:
                slots.request(cluster.breaker)
                connection = await self._connection(ctx, endpoint, cluster)
                if policy.per_try_timeout_seconds is None:
                    response = await connection.send(upstream_head, body.reader())
                else:
                    async with asyncio.timeout(policy.per_try_timeout_seconds):
                        response = await connection.send(upstream_head, body.reader())
            except Refused as e:
                last_error = UpstreamError("UF", str(e))
                judged = e.reason != "denied"  # a policy refusal is not the endpoint's
            except Overflow:
                endpoint.stats.end(started, ok=False)
                outcome.flags.append("UO")
                await self._local_reply(exchange, outcome, 503, OVERFLOW_TEXT)
                return
            except UpstreamError as e:
                last_error = e
            except TimeoutError:
                last_error = UpstreamError("UT", "per-try timeout")
                if connection is not None:
                    abort_exchange(connection)
            except asyncio.CancelledError:
                # The request timeout (or the client) ended the exchange mid-attempt: the
                # connection's response would never be read, so it cannot serve again.
                endpoint.stats.end(started, ok=False)
                if connection is not None:
                    abort_exchange(connection)
                raise
            status = response.head.status if response else None
            grpc_status = _grpc_status(response.head.headers) if response else None
            endpoint.stats.end(started, ok=response is not None and status is not None
                               and status < 500)
            slots.attempt_done()
            if cluster.outlier is not None and judged and \
                    (last_error is None or last_error.flag != "DC"):
                cluster.outlier.record(endpoint.key, status)
            if last_error is not None and last_error.flag == "DC":
                broken = exchange.body.error
                if isinstance(broken, MalformedRequest) and not exchange.responded:
                    await self._local_reply(exchange, outcome, broken.status,
                                            "request timeout" if broken.status == 408
                                            else "bad request")
                    return
                raise BodyError(str(last_error))
            if last_error is not None and last_error.flag == "UPE":
                # A 101 to a request that offered no upgrade: never a tunnel, never retried.
                self._metrics.count_upgrade_refusal(_wire(head), UNEXPECTED_101)
                outcome.flags.append("UPE")
                await self._local_reply(exchange, outcome, 502, "upstream protocol error")
                return
            retriable = should_retry(
                policy, head.method, flag=last_error.flag if last_error else None,
                refused_stream=bool(last_error and last_error.refused_stream),
                status=status, grpc_status=grpc_status)
            retry = (retriable and outcome.attempts <= policy.attempts and body.replayable
                     and not exchange.client_gone)
            if retry and budget is not None and not budget.try_retry():
                self._metrics.count_budget_exhausted(outcome.service)
                retry = False
            # maxRetries retries in progress: no retry, counted as an overflow.  A refused
            # stream (the upstream did not process it, e.g. above a GOAWAY) is exempt.
            if retry and not (last_error is not None and last_error.refused_stream) \
                    and not slots.retry(cluster.breaker):
                retry = False
            if not retry:
                if retriable and outcome.attempts > 1:
                    outcome.flags.append("URX")  # retried and still failing
                break
            self._metrics.count_retry(outcome.service,
                                      last_error.flag if last_error else str(status))
            if response is not None:
                _discard(response, connection)
            await asyncio.sleep(backoff_delay(outcome.attempts, policy.backoff,
                                              self._random))
        if response is None:
            assert last_error is not None
            outcome.flags.append(last_error.flag)
            if last_error.flag == "UT":
                await self._local_reply(exchange, outcome, 504, "upstream request timeout")
            else:
                reason = ("connection failure" if last_error.flag == "UF"
                          else "connection termination")
                await self._local_reply(
                    exchange, outcome, 503,
                    f"upstream connect error or disconnect/reset before headers. "
                    f"reset reason: {reason}")
            return
        await self._stream_response(exchange, rule, response, connection, outcome)

    async def _choose(self, ctx: _Context, exchange: Exchange, rule: CompiledRule,
                      outcome: _Outcome) -> tuple[_Cluster, Endpoint] | None:
        """The rule's backend service by weight, then an endpoint by its balancer, then the
        destination's authorization.  None: answered already (503 UH, or 403 UAEX)."""
        head = exchange.request
        choice = rule.backend(self._random.random())
        cluster = self._cluster(choice.service, choice.port or ctx.entry.port, ctx.version)
        if cluster is None or not cluster.endpoints:
            outcome.flags.append("UH")
            await self._local_reply(exchange, outcome, 503)
            return None
        outcome.service = cluster.entry.fqdn
        endpoints = cluster.endpoints if cluster.outlier is None else cluster.outlier.available
        if not endpoints:  # all ejected (allowLastHealthyEjection)
            outcome.flags.append("UH")
            await self._local_reply(exchange, outcome, 503)
            return None
        endpoint = cluster.balancer.pick(endpoints, self._hash_key(cluster, ctx, head))
        outcome.endpoint, outcome.destination = endpoint, endpoint.backend.workload
        if not self._authorized(ctx, endpoint.backend, head):
            outcome.flags.append("UAEX")
            await self._local_reply(exchange, outcome, 403)
            return None
        if self._workload_limits and endpoint.backend.workload is not None:
            ref = endpoint.backend.workload
            limiter = self._workload_limits.get((ref.namespace, ref.name))
            if limiter is not None and \
                    await self._limited(ctx, exchange, limiter, outcome, "workload"):
                return None
        return cluster, endpoint

    async def _limited(self, ctx: _Context, exchange: Exchange, limiter: Limiter,
                       outcome: _Outcome, scope: str) -> bool:
        """Take a token from limiter; without one, answer 429 (gRPC: RESOURCE_EXHAUSTED)
        with Retry-After, flag RL, and say True."""
        wait = limiter.take(ctx.pod.principal)
        if not wait:
            return False
        outcome.flags.append("RL")
        self._metrics.count_rate_limited(outcome.service, scope)
        await self._local_reply(exchange, outcome, 429, grpc_code=RESOURCE_EXHAUSTED,
                                headers=[("retry-after", retry_after(wait))])
        return True

    async def _inject(self, exchange: Exchange, fault: Fault, outcome: _Outcome) -> bool:
        """The rule's faults: maybe hold the request (DI), then maybe answer it at once
        (FI, and say True).  The delay is outside the request timeout, as Envoy's is."""
        head = exchange.request
        if not fault.eligible(head):
            return False
        delay = fault.delay(self._random)
        if delay:
            outcome.flags.append("DI")
            self._metrics.count_fault(outcome.service, "delay")
            await asyncio.sleep(delay)
        abort = fault.abort(head, self._random)
        if abort is None:
            return False
        outcome.flags.append("FI")
        self._metrics.count_fault(outcome.service, "abort")
        await self._local_reply(exchange, outcome, abort.http_status, ABORT_BODY,
                                grpc_code=abort.grpc_code)
        return True

    async def _stream_response(self, exchange: Exchange, rule: CompiledRule,
                               response: UpstreamResponse,
                               connection: UpstreamConnection | None,
                               outcome: _Outcome) -> None:
        outcome.status = response.head.status
        grpc = _grpc_status(response.head.headers)
        head = ResponseHead(response.head.status,
                            apply_modifier(response.head.headers, rule.response_headers))
        body = response.body
        try:
            await exchange.respond(head, end=body.ended and body.buffered == 0
                                   and body.trailers is None)
            while True:
                data = await body.read()
                if not data:
                    break
                await exchange.send(data)
                outcome.bytes_sent += len(data)
                if exchange.client_gone:
                    raise ConnectionResetError("client went away")
            if body.trailers:
                trailer_grpc = _grpc_status(body.trailers)
                grpc = trailer_grpc if trailer_grpc is not None else grpc
            await exchange.finish(body.trailers)
        except BodyError:
            outcome.flags.append("UC")  # the backend broke off mid-response
            exchange.reset()
        except (ConnectionError, OSError):
            outcome.flags.append("DC")
            if connection is not None:
                abort_exchange(connection, response)
        except asyncio.CancelledError:
            if connection is not None and not (body.ended and body.buffered == 0):
                abort_exchange(connection, response)  # the rest will never be read
            raise
        if grpc is not None:
            outcome.grpc_status = str(grpc)

    async def _connection(self, ctx: _Context, endpoint: Endpoint,
                          cluster: _Cluster) -> UpstreamConnection:
        key = (ctx.pod.key, endpoint.key, ctx.http2_upstream, cluster.entry.service)
        pool = self._pools.get(key)
        if pool is None:
            policy = self._policies.get(cluster.entry.service, TrafficPolicy())
            backend, pod, service = endpoint.backend, ctx.pod, cluster.entry.fqdn

            async def connect(protocol: UpstreamConnection) -> object:
                return await self._upstreams.open(pod, backend, service,
                                                  protocol, l7_checked=True)  # type: ignore[type-var]

            pool = self._pools[key] = EndpointPool(
                connect, http2=ctx.http2_upstream, idle_timeout=policy.idle_timeout_seconds,
                breaker=cluster.breaker)
        return await pool.acquire()

    def _request_id(self) -> str:
        """A random (version 4) UUID, from the proxy's PRNG: uuid4() reads the kernel's
        random pool on every call, a system call per request for an id that only has to
        be unique, not secret."""
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    def _hash_key(self, cluster: _Cluster, ctx: _Context, head: RequestHead) -> str | None:
        if cluster.hash_header is not None:
            return head.header(cluster.hash_header)
        if cluster.hash_source:
            return ctx.pod.principal
        return None

    def _authorized(self, ctx: _Context, backend: Backend, head: RequestHead) -> bool:
        """The destination's policies, per request (the waypoint's job; see the module
        docstring).  Endpoints outside the mesh have no policy."""
        ref = backend.workload
        if ref is None:
            return True
        snapshot = self._state.current
        workload = snapshot.table.workloads.get(f"{ref.namespace}/{ref.name}")
        if workload is None:
            return True
        admitter = snapshot.admitter
        if not self._policed(admitter, workload):
            return True
        admission = admitter.admit_request(
            workload, ctx.pod.principal, source_address(ctx.pod, backend.address),
            backend.port, RequestAttributes(method=head.method, path=head.path,
                                            host=head.authority, headers=dict(head.headers)))
        # head is _one_meaning's: one line per header name, so the dict loses nothing, and
        # the path and authority are what the upstream gets.
        return admission.allowed

    def _policed(self, admitter: Admitter, workload: Workload) -> bool:
        """Does any authorization policy select the workload?  Remembered per admitter (one
        per configuration); a request to an unpoliced workload skips the check."""
        if admitter is not self._policed_for:
            self._policed_for, self._policed_cache = admitter, {}
        key = workload.key
        policed = self._policed_cache.get(key)
        if policed is None:
            policed = bool(admitter.authorizer.applicable(DestinationWorkload.of(workload)))
            self._policed_cache[key] = policed
        return policed

    async def _local_reply(self, exchange: Exchange, outcome: _Outcome, status: int,
                           text: str | None = None, *, grpc_code: int | None = None,
                           headers: Sequence[tuple[str, str]] = ()) -> None:
        """A response the proxy makes itself; its body names no internals.  A gRPC client
        gets a trailers-only response whose code is grpc_code, or the gRPC mapping of
        status; extra headers go on either form."""
        outcome.status = status
        if exchange.responded:
            exchange.reset()
            return
        message = text or LOCAL_REPLY_BODY.get(status, "")
        if exchange.request.is_grpc:
            code = grpc_code if grpc_code is not None else GRPC_FOR_HTTP.get(status, 2)
            outcome.status = 200
            outcome.grpc_status = str(code)
            await exchange.respond(ResponseHead(200, [
                ("content-type", "application/grpc"), ("grpc-status", str(code)),
                ("grpc-message", message), *headers]), end=True)
            return
        body = message.encode()
        await exchange.respond(ResponseHead(status, [
            ("content-type", "text/plain"), ("content-length", str(len(body))), *headers]),
            end=not body)
        if body:
            await exchange.send(body)
            outcome.bytes_sent += len(body)
            await exchange.finish()

    async def _refuse_upgrade(self, exchange: Exchange, outcome: _Outcome,
                              reason: str, status: int = 403) -> None:
        self._metrics.count_upgrade_refusal(_wire(exchange.request), reason)
        await self._local_reply(exchange, outcome, status,
                                UPGRADE_REFUSED if status == 403 else "bad request")

    async def _upgrade(self, ctx: _Context, exchange: H1Exchange, rule: CompiledRule,
                       outcome: _Outcome) -> _Tunnel | None:
        """An HTTP/1.1 upgrade request (see the module docstring).  Returns the tunnel to
        relay once the request is recorded, or None when it was answered otherwise."""
        head = exchange.request
        decision = decide_upgrade(head.header("upgrade"), self._settings.allowed_upgrades)
        if decision.verdict is Verdict.REFUSE:
            await self._refuse_upgrade(exchange, outcome, decision.reason)
            return None
        if exchange.declares_body:
            # Where a body ends and the new protocol begins is where requests hide.
            await self._refuse_upgrade(exchange, outcome, WITH_BODY, 400)
            return None
        if decision.verdict is Verdict.PLAIN:  # h2c: an ordinary request, then close
            # (Upgrade is hop-by-hop: never forwarded; HTTP2-Settings goes with it.)
            head.headers = [(n, v) for n, v in head.headers if n != "http2-settings"]
            self._metrics.count_upgrade_refusal(_wire(head), decision.reason)
            await self._forward_timed(ctx, exchange, rule, outcome)
            return None
        outcome.attempts = 1
        chosen = await self._choose(ctx, exchange, rule, outcome)
        if chosen is None:
            return None
        cluster, endpoint = chosen
        client = H1Client()
        try:
            opened = await self._upstreams.open(ctx.pod, endpoint.backend, cluster.entry.fqdn,
                                                client, l7_checked=True)
        except Refused:
            outcome.flags.append("UF")
            await self._local_reply(exchange, outcome, 503)
            return None
        upstream_head = RequestHead(head.method, head.path, head.authority,
                                    apply_modifier(head.headers, rule.request_headers))
        try:
            async with asyncio.timeout(rule.timeouts.request_seconds or None):
                response = await client.send(upstream_head, Body.empty(),
                                             upgrade=decision.token)
        except TimeoutError:
            client.abort()
            outcome.flags.append("UT")
            await self._local_reply(exchange, outcome, 504, "upstream request timeout")
            return None
        except UpstreamError as e:
            client.abort()
            outcome.flags.append(e.flag)
            await self._local_reply(exchange, outcome, 503,
                                    "upstream connect error or disconnect/reset before "
                                    "headers. reset reason: connection termination")
            return None
        except asyncio.CancelledError:
            client.abort()
            raise
        if response.head.status != 101:
            # Declined: an ordinary response; the client connection closes after it.
            self._metrics.count_upgrade_refusal(_wire(head), NOT_SWITCHED)
            try:
                await self._stream_response(exchange, rule, response, client, outcome)
            finally:
                client.close()
            return None
        if not completes(decision.token, client.upgraded_to):
            self._metrics.count_upgrade_refusal(_wire(head), WRONG_PROTOCOL)
            client.abort()
            outcome.flags.append("UPE")
            await self._local_reply(exchange, outcome, 502, "upstream protocol error")
            return None
        up_transport, up_rest = client.detach()
        if exchange.client_gone or up_transport.is_closing():
            reset(up_transport)
            outcome.flags.append("DC" if exchange.client_gone else "UC")
            outcome.status = 101
            exchange.reset()
            return None
        down_transport, down_rest = exchange.take_over()
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in apply_modifier(response.head.headers, rule.response_headers):
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        lines.append(b"upgrade: %s\r\nconnection: upgrade\r\n\r\n"
                     % (client.upgraded_to or decision.token).encode("latin-1"))
        switched = b"".join(lines)
        down_transport.write(switched)
        outcome.status = 101
        outcome.bytes_sent = len(switched)
        return _Tunnel(decision.token, opened.security, down_transport, down_rest,
                       up_transport, up_rest)

    async def _relay_upgraded(self, ctx: _Context, exchange: H1Exchange, tunnel: _Tunnel,
                              outcome: _Outcome, request_id: str) -> None:
        """The byte stream after a 101: a new L4 flow, counted with Istio's TCP series and
        logged (one access-log line, protocol = the upgrade token) when it ends."""
        start, started_at = time.monotonic(), time.time()
        down = Side("downstream", start_paused=True)
        tunnel.down_transport.set_protocol(down)
        down.connection_made(tunnel.down_transport)
        up = Side("upstream", start_paused=True)
        tunnel.up_transport.set_protocol(up)
        up.connection_made(tunnel.up_transport)  # (an HBONE stream calls it too: no harm)
        if tunnel.down_rest:
            down.early.append(tunnel.down_rest)  # held until the 101, relayed first
        if tunnel.up_rest:
            up.early.append(tunnel.up_rest)
        dest = outcome.destination
        meter = None if self._tcp_metrics is None else ConnectionMeter(
            self._tcp_metrics, TcpLabels(
                reporter="source", source_workload=ctx.pod.ref.workload,
                source_workload_namespace=ctx.pod.workload.namespace,
                source_principal=ctx.pod.principal or UNKNOWN,
                destination_workload=dest.workload if dest else UNKNOWN,
                destination_workload_namespace=dest.namespace if dest else UNKNOWN,
                destination_principal=(spiffe_id(self._trust_domain, dest.namespace,
                                                 dest.service_account) if dest else UNKNOWN),
                destination_service=outcome.service,
                connection_security_policy=tunnel.security))
        done = asyncio.get_running_loop().create_future()
        relay = Relay(down, up, meter.bytes if meter else (lambda _d, _n: None),
                      lambda _r: done.done() or done.set_result(None))
        if meter is not None:
            meter.opened()
        relay.start()
        try:
            await done
        except asyncio.CancelledError:
            relay.abort()
            raise
        finally:
            if meter is not None:
                meter.closed()
            exchange.released()
            head = exchange.request
            flow = _Outcome(flags=outcome.flags, attempts=outcome.attempts, status=101,
                            endpoint=outcome.endpoint, destination=dest,
                            service=outcome.service, bytes_sent=relay.bytes_from_upstream)
            self._log(ctx, head, flow, started_at, time.monotonic() - start,
                      relay.bytes_from_downstream, request_id, dest,
                      spiffe_id(self._trust_domain, dest.namespace, dest.service_account)
                      if dest else UNKNOWN, protocol=tunnel.token)

    def _record(self, ctx: _Context, exchange: Exchange, outcome: _Outcome, start: float,
                started_at: float, request_id: str, span: RequestSpan | None = None) -> None:
        duration = time.monotonic() - start
        head = exchange.request
        dest = outcome.destination
        dest_principal = (spiffe_id(self._trust_domain, dest.namespace, dest.service_account)
                          if dest else UNKNOWN)
        request_bytes = exchange.body.received
        label_key = (ctx.pod.key, ctx.pod.principal, dest, outcome.service, head.is_grpc)
        labels = self._labels.get(label_key)
        if labels is None:
            if len(self._labels) > 4096:
                self._labels.clear()
            labels = self._labels[label_key] = self._request_labels(ctx, dest, dest_principal,
                                                                    outcome.service, head)
        self._metrics.observe(labels, code=outcome.status, grpc_status=outcome.grpc_status,
                              flags=outcome.flag_text, duration_s=duration,
                              request_bytes=request_bytes, response_bytes=outcome.bytes_sent)
        if self._live is not None:
            self._live.request(ctx.entry.service, route_name(outcome.route), labels,
                               outcome.status, outcome.grpc_status, duration, start + duration)
        self._log(ctx, head, outcome, started_at, duration, request_bytes, request_id,
                  dest, dest_principal)
        if span is not None:
            endpoint = outcome.endpoint
            span.finish(status=outcome.status, grpc_status=outcome.grpc_status,
                        flags=outcome.flag_text, attempts=outcome.attempts,
                        upstream=(str(endpoint.backend.address), endpoint.backend.port)
                        if endpoint else None, service=outcome.service,
                        source=(ctx.pod.ref.workload, ctx.pod.workload.namespace),
                        destination=(dest.workload, dest.namespace) if dest else None,
                        end_ns=int((started_at + duration) * 1e9))

    @staticmethod
    def _request_labels(ctx: _Context, dest: WorkloadRef | None, dest_principal: str,
                        service: str, head: RequestHead) -> RequestLabels:
        return RequestLabels.from_tcp(TcpLabels(
            reporter="source",
            source_workload=ctx.pod.ref.workload,
            source_workload_namespace=ctx.pod.workload.namespace,
            source_principal=ctx.pod.principal or UNKNOWN,
            destination_workload=dest.workload if dest else UNKNOWN,
            destination_workload_namespace=dest.namespace if dest else UNKNOWN,
            destination_principal=dest_principal,
            destination_service=service,
            connection_security_policy="mutual_tls" if dest else "none",
        ), istio_request_protocol(head))

    def _log(self, ctx: _Context, head: RequestHead, outcome: _Outcome, started_at: float,
             duration: float, request_bytes: int, request_id: str, dest: WorkloadRef | None,
             dest_principal: str, *, protocol: str | None = None) -> None:
        if self._access_log is not None and ctx.access_log:
            self._access_log.write(AccessLogEntry(
                start_time=started_at, method=head.method, authority=head.authority,
                path=head.path, protocol=protocol or head.protocol, status=outcome.status,
                grpc_status=outcome.grpc_status, response_flags=outcome.flag_text,
                bytes_received=request_bytes, bytes_sent=outcome.bytes_sent,
                duration_ms=duration * 1000.0,
                upstream_host=outcome.endpoint.key if outcome.endpoint else None,
                attempts=outcome.attempts, request_id=request_id,
                trace_id=trace_id(head.headers),
                source_principal=ctx.pod.principal, source_workload=ctx.pod.ref.workload,
                source_namespace=ctx.pod.workload.namespace,
                destination_principal=dest_principal if dest else None,
                destination_workload=dest.workload if dest else None,
                destination_namespace=dest.namespace if dest else None,
                destination_service=outcome.service))


class _ClientH2Server(H2Server):
    """An HTTP/2 client connection that tells its tracker when it ends, and holds the
    client to the request-header timeout: its first request's header block must be
    complete within it of the connection's start, and any header block (HEADERS and its
    CONTINUATIONs: h2 refuses every other frame until it ends, so one unfinished block
    stalls the whole connection) within it of its first byte.  Past it: GOAWAY
    (ENHANCE_YOUR_CALM) and close."""

    on_closed: Callable[[], None] | None = None
    _headers_timeout: float | None = None
    _on_timeout: Callable[[str], None] | None = None
    _head_since: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def watch_heads(self, timeout: float, since: float | None,
                    on_timeout: Callable[[str], None]) -> None:
        """Start the first request's clock (at loop time `since`, default now)."""
        self._headers_timeout = timeout
        self._on_timeout = on_timeout
        self._head_since = since if since is not None else self._loop.time()
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_timeout is None or self.requests == 0:
            return  # before the first request the connection's own clock runs
        if self.conn.incoming_buffer.head_pending:
            if self._head_since is None:
                self._head_since = self._loop.time()
                self._arm_head_timer()
        else:
            self._head_since = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._headers_timeout is not None \
                and self._head_since is not None:
            delay = self._head_since + self._headers_timeout - self._loop.time()
            self._head_timer = self._loop.call_later(max(delay, 0.0), self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        if self._head_since is None or not self.usable or self._headers_timeout is None:
            return
        if self.requests and not self.conn.incoming_buffer.head_pending:
            self._head_since = None
            return
        left = self._head_since + self._headers_timeout - self._loop.time()
        if left > 0:
            self._arm_head_timer()
            return
        self._head_since = None
        if self._on_timeout is not None:
            self._on_timeout("request_headers")
        log.info("HTTP/2 client %s sent no whole request head within %.1fs: closing",
                 self.peername, self._headers_timeout)
        # Past H2Server's override: a timeout is counted as one, not as a bad request.
        super(H2Server, self)._protocol_error(int(ErrorCodes.ENHANCE_YOUR_CALM),
                                              "request header timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)
        if self.on_closed is not None:
            self.on_closed()


@dataclass(frozen=True)
class _Tunnel:
    """An upgrade the upstream accepted (101): both connections, taken out of HTTP, and
    the bytes each side sent after its head (the client's held since its request)."""

    token: str
    security: str  # connection_security_policy of the upstream connection
    down_transport: asyncio.Transport
    down_rest: bytes
    up_transport: asyncio.Transport
    up_rest: bytes


@dataclass(frozen=True)
class _Context:
    pod: EnrolledPod
    entry: ServicePortEntry
    version: int  # the client's address family
    http2_upstream: bool
    access_log: bool


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


def _wire(head: RequestHead) -> str:
    """The protocol label of the proxy's own counters ("http/1.1", "http/2")."""
    return "http/2" if head.version == "2" else "http/1.1"


def _h2_error_label(code: int) -> str:
    """A bounded label for an HTTP/2 connection error (h2's messages quote the peer)."""
    try:
        return "h2_" + ErrorCodes(code).name.lower()
    except ValueError:
        return "h2_error"


def _grpc_status(headers: Headers | None) -> int | None:
    for name, value in headers or ():
        if name == "grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None



def _discard(response: UpstreamResponse, connection: UpstreamConnection | None) -> None:
    """A response not passed on (its attempt will be retried): read it to its end in the
    background so an HTTP/1.1 connection can serve again, or drop the connection."""
    body: Body = response.body
    if body.ended and body.buffered == 0:
        return
    cancel = getattr(body, "cancel", None)
    if cancel is not None:
        cancel()  # HTTP/2: reset just this stream
        return

    async def drain() -> None:
        try:
            async with asyncio.timeout(1.0):
                while await body.read():
                    pass
        except (TimeoutError, BodyError):
            if connection is not None:
                abort_exchange(connection)

    task = asyncio.get_running_loop().create_task(drain())
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


_DRAINING: set[asyncio.Task[None]] = set()

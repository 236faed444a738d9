"""The destination's own L7 check: an HBONE stream whose HTTP requests this node judges one
by one before they reach the application.

A source node's proxy authorizes each request it sends against the destination's
policies and marks the stream (headers.L7_AUTHORIZED).  Believing that marker means
believing every node that holds a mesh certificate; by default (tunnel.trustSource-
L7Authorization false) the destination does not.  When a stream to a local pod would be
refused as a whole only because the pod's policies have rules on HTTP
(Admitter.needs_requests), the HBONE server hands it here instead:

- the first bytes say HTTP/1.1 or HTTP/2 (prior knowledge); anything else, or nothing
  within http.requestHeadersTimeoutSeconds, ends the stream (the connection-level
  decision, failing closed, already refused it);
- each request is given its one meaning as on the source side (header fields one per
  name, target normalized: header_fields.py, request_target.py; refused: 400), judged
  by Admitter.admit_request with the tunnel's verified peer identity (denied: 403,
  "RBAC: access denied"), and only then sent to the application over a connection
  made transparently from inside the pod, in the protocol the source spoke;
- an HTTP/1.1 upgrade (WebSocket) is judged like any request and checked again against
  http.allowedUpgrades; only the application's 101 naming the offered protocol turns
  the stream into a byte relay (as nodeproxy.http.manager does at the source); a 101
  naming another protocol, or answering a request that offered none, is a 502 counted
  in nodeproxy_http_upgrade_refusals_total here, where it is seen; CONNECT is refused
  (403).  The relay joins the connection tracker with what its request was admitted as
  (AdmittedRequest): a mesh state that would now deny that request resets it
  (daemon/revocation.py).

Every request is counted in nodeproxy_hbone_l7_requests_total{result}; denials are
logged by the Admitter (rate-limited per destination and policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.codec.detect import Sniffed, sniff
from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.h2 import H2Server
from nodeproxy.codec.header_fields import one_view
from nodeproxy.codec.message import (
    Body,
    BodyError,
    Exchange,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.codec.request_target import Refusal, TargetPolicy, normalize, normalize_authority
from nodeproxy.codec.upgrade import (
    UNEXPECTED_101,
    WRONG_PROTOCOL,
    Verdict,
    completes,
    decide_upgrade,
)
from nodeproxy.config.model import HttpSettings
from nodeproxy.http.context import Outcome
from nodeproxy.http.pool import EndpointPool, abort_exchange
from nodeproxy.http.router import stream_response
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.policy.admission import AdmittedRequest, Admitter
from nodeproxy.policy.authorization import RequestAttributes
from nodeproxy.tcp.dial import DialAnnouncer, dial_transparent
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.request_metrics import RequestMetrics

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# nodeproxy_hbone_l7_requests_total{result}: a closed set.
RESULTS = ("allowed", "denied", "bad_request", "upgrade_refused", "upstream_failed",
           "not_http")
DENIED_BODY = b"RBAC: access denied"


class GateMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "nodeproxy_hbone_l7_requests",
            "HTTP requests on HBONE streams judged by this (the destination) node, by "
            "result; not_http counts streams that were not HTTP",
            ("result",), registry=registry)

    def count(self, result: str) -> None:
        self.requests.labels(result).inc()


class _Sniffer(asyncio.Protocol):
    """Holds a stream's first bytes until they say which HTTP it speaks."""

    def __init__(self, decided: Callable[[Sniffed, bytes], None]):
        self._decided = decided
        self._data = b""
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self._data += data
        verdict = sniff(self._data)
        if verdict is not None:
            self.done = True
            self._decided(verdict, self._data)

    def eof_received(self) -> bool | None:
        self.give_up()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.give_up()

    def give_up(self) -> None:
        if not self.done:
            self.done = True
            self._decided(Sniffed.OPAQUE, b"")


class GatedStream:
    """One gated stream: its HTTP server, its upstream pool, and what it was opened as.
    Tracked like a relay (ConnectionTracker): `done`, `begin_drain`, `abort`."""

    def __init__(self, gate: DestinationGate, transport: asyncio.Transport,
                 pod: EnrolledPod, peer: str, source_ip: IPAddress, dest_ip: IPAddress,
                 port: int, on_closed: Callable[[], None]):
        self.gate = gate
        self.transport = transport
        self.pod = pod
        self.peer = peer
        self.source_ip = source_ip
        self.dest_ip = dest_ip
        self.port = port
        self._on_closed = on_closed
        self._closed = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._server: H1Server | H2Server | None = None
        self.pool: EndpointPool | None = None
        self.http2 = False
        self.settings = gate.settings()
        self.target_policy = TargetPolicy.of(self.settings)
        self.sniffer = _Sniffer(self._sniffed)
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            self.settings.request_headers_timeout_seconds, self.sniffer.give_up)

    def start(self) -> None:
        self.transport.set_protocol(self.sniffer)

    def begin_drain(self) -> None:
        """Stop taking requests: after the ones in flight (HTTP/1.1 `connection: close`,
        HTTP/2 GOAWAY), or at once before the first."""
        if isinstance(self._server, H1Server):
            self._server.drain()
        elif self._server is not None:
            self._server.shutdown()
        else:
            self.abort()

    def abort(self) -> None:
        self.transport.abort()  # type: ignore[attr-defined]
        self.closed()

    def _sniffed(self, verdict: Sniffed, initial: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if verdict is Sniffed.OPAQUE:
            self.gate.metrics.count("not_http")
            log.info("HBONE stream from %s to %s:%d is not HTTP, and only its HTTP requests "
                     "could be allowed: closed", self.peer, self.pod.key, self.port)
            self.transport.abort()  # type: ignore[attr-defined]
            self.closed()
            return
        settings = self.settings
        self.http2 = verdict is Sniffed.HTTP2
        self.pool = EndpointPool(self._connect, http2=self.http2,
                                 idle_timeout=settings.idle_timeout_seconds)
        if self.http2:
            server = H2Server(self._handle, max_header_bytes=settings.max_header_bytes,
                              limits=settings.http2,
                              on_bad_request=lambda _reason: None)
            self._server = server
            server.attach(self.transport, initial)
            asyncio.get_running_loop().create_task(self._h2_closed(server))
        else:
            h1 = H1Server(self._handle, max_header_bytes=settings.max_header_bytes,
                          idle_timeout=settings.idle_timeout_seconds,
                          on_closed=self.closed,
                          request_headers_timeout=settings.request_headers_timeout_seconds)
            self._server = h1
            h1.attach(self.transport, initial)

    async def _h2_closed(self, server: H2Server) -> None:
        with contextlib.suppress(Exception):
            await server.wait_closed()
        self.closed()

    def closed(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.pool is not None:
            self.pool.close()
        if not self.done.done():
            self.done.set_result(None)
        self._on_closed()

    async def _connect(self, protocol: UpstreamConnection) -> object:
        gate = self.gate
        return await dial_transparent(self.pod.netns, self.source_ip, self.dest_ip, self.port,
                                      gate.connect_timeout, gate.announcer, protocol)  # type: ignore[type-var]

    # -- requests ------------------------------------------------------------------------

    async def _handle(self, exchange: Exchange) -> None:
        head = exchange.request
        try:
            if head.method == "CONNECT":
                self.gate.metrics.count("upgrade_refused")
                await _reply(exchange, 403, DENIED_BODY)
                return
            try:
                head.headers = one_view(head.headers)
                normalized = normalize(head.path, self.target_policy)
                head.authority = normalize_authority(head.authority)
            except Refusal:
                self.gate.metrics.count("bad_request")
                await _reply(exchange, 400, b"bad request")
                return
            if normalized.redirect:
                # The source proxy answers these itself: this one did not come from it.
                self.gate.metrics.count("bad_request")
                await _reply(exchange, 400, b"bad request")
                return
            head.path = normalized.target
            admission = self.gate.admitter().admit_request(
                self.pod.workload, self.peer, self.source_ip, self.port,
                RequestAttributes(method=head.method, path=head.path, host=head.authority,
                                  headers=dict(head.headers)))
            if not admission.allowed:
                self.gate.metrics.count("denied")
                await _reply(exchange, 403, DENIED_BODY)
                return
            if isinstance(exchange, H1Exchange) and exchange.upgrade:
                await self._upgrade(exchange, head)
            else:
                await self._forward(exchange, head)
        except (BodyError, ConnectionError, OSError):
            exchange.reset()

    async def _upgrade(self, exchange: H1Exchange, head: RequestHead) -> None:
        """An authorized upgrade offer: sent on a connection of its own; bytes flow only
        after a 101 naming the offered protocol, then the stream is a byte relay."""
        decision = decide_upgrade(head.header("upgrade"), self.settings.allowed_upgrades)
        if decision.verdict is Verdict.REFUSE or exchange.declares_body:
            self.gate.metrics.count("upgrade_refused")
            await _reply(exchange, 403, DENIED_BODY)
            return
        if decision.verdict is Verdict.PLAIN:
            head.headers = [(n, v) for n, v in head.headers if n != "http2-settings"]
            await self._forward(exchange, head)
            return
        client = H1Client()
        try:
            await self._connect(client)
            response = await client.send(
                RequestHead(head.method, head.path, head.authority, head.headers),
                Body.empty(), upgrade=decision.token)
        except (UpstreamError, TimeoutError, OSError) as e:
            client.abort()
            self.gate.metrics.count("upstream_failed")
            log.info("HBONE upgrade from %s to %s:%d: upstream failed: %s", self.peer,
                     self.pod.key, self.port, e)
            await _reply(exchange, 503, b"upstream connect error")
            return
        self.gate.metrics.count("allowed")
        if response.head.status != 101 or not completes(decision.token, client.upgraded_to):
            try:
                if response.head.status == 101:  # a 101 naming another protocol
                    self.gate.count_upgrade_refusal(head, WRONG_PROTOCOL)
                    await _reply(exchange, 502, b"upstream protocol error")
                else:
                    await self._respond(exchange, response, client)
            finally:
                client.close()
            return
        up_transport, up_rest = client.detach()
        if exchange.client_gone or up_transport.is_closing():
            up_transport.abort()
            exchange.reset()
            return
        down_transport, down_rest = exchange.take_over()
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in response.head.headers:
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        lines.append(b"upgrade: %s\r\nconnection: upgrade\r\n\r\n"
                     % (client.upgraded_to or decision.token).encode("latin-1"))
        down_transport.write(b"".join(lines))
        down = Side("downstream", start_paused=True)
        down_transport.set_protocol(down)
        down.connection_made(down_transport)
        up = Side("upstream", start_paused=True)
        up_transport.set_protocol(up)
        up.connection_made(up_transport)
        if down_rest:
            down.hold_early(down_rest)
        if up_rest:
            up.hold_early(up_rest)
        relay = Relay(down, up, lambda _d, _n: None, lambda _r: None)
        tracker = self.gate.tracker
        tracker.add(relay, self.pod.key, admitted=AdmittedRequest.of(
            self.pod.workload.key, self.peer, self.source_ip, self.port, head))
        try:
            await relay.run()
        finally:
            tracker.discard(relay)
            exchange.released()

    async def _forward(self, exchange: Exchange, head: RequestHead) -> None:
        assert self.pool is not None
        upstream_head = RequestHead(head.method, head.path, head.authority, head.headers,
                                    head.scheme, "2" if self.http2 else "1.1")
        connection: UpstreamConnection | None = None
        response: UpstreamResponse | None = None
        try:
            connection = await self.pool.acquire()
            response = await connection.send(upstream_head,
                                              ReplayableBody(exchange.body, 0).reader())
        except (UpstreamError, TimeoutError, OSError) as e:
            self.gate.metrics.count("upstream_failed")
            log.info("HBONE request from %s to %s:%d: upstream failed: %s", self.peer,
                     self.pod.key, self.port, e)
            if connection is not None:
                abort_exchange(connection)
            if isinstance(e, UpstreamError) and e.flag == "UPE":
                # A 101 to a request that offered no upgrade: never a tunnel.
                self.gate.count_upgrade_refusal(head, UNEXPECTED_101)
                await _reply(exchange, 502, b"upstream protocol error")
            else:
                await _reply(exchange, 503, b"upstream connect error")
            return
        self.gate.metrics.count("allowed")
        await self._respond(exchange, response, connection)

    async def _respond(self, exchange: Exchange, response: UpstreamResponse,
                       connection: UpstreamConnection) -> None:
        """Pass the response on as the source node's router does (the same loop); a
        source that went away resets this exchange (the caller's reset)."""
        outcome = Outcome()
        await stream_response(exchange, None, response, connection, outcome)
        if "DC" in outcome.flags:
            raise ConnectionResetError("the source went away")


async def _reply(exchange: Exchange, status: int, body: bytes) -> None:
    if exchange.responded:
        exchange.reset()
        return
    await exchange.respond(ResponseHead(status, [
        ("content-type", "text/plain"), ("content-length", str(len(body)))]))
    await exchange.send(body)
    await exchange.finish()


class DestinationGate:
    """Serves the HBONE streams whose requests this node must judge (module docstring)."""

    def __init__(self, *, admitter: Callable[[], Admitter],
                 settings: Callable[[], HttpSettings], announcer: DialAnnouncer,
                 connect_timeout: float, metrics: GateMetrics, tracker: ConnectionTracker,
                 request_metrics: RequestMetrics | None = None):
        self.admitter = admitter
        self.tracker = tracker  # upgraded streams join it, to be judged again
        self.settings = settings
        self.announcer = announcer
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self._request_metrics = request_metrics  # upgrade refusals, as the source counts

    def count_upgrade_refusal(self, head: RequestHead, reason: str) -> None:
        if self._request_metrics is not None:
            self._request_metrics.count_upgrade_refusal(
                "http/2" if head.version == "2" else "http/1.1", reason)

    def open(self, transport: asyncio.Transport, pod: EnrolledPod, peer: str,
             source_ip: IPAddress, dest_ip: IPAddress, port: int,
             on_closed: Callable[[], None]) -> GatedStream:
        """A gated stream for an accepted stream (answered 200 already); `start` it once
        it is tracked.  `on_closed` runs once when it ends."""
        return GatedStream(self, transport, pod, peer, source_ip, dest_ip, port, on_closed)

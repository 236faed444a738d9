"""Serving captured client connections at L7: the HTTP/1.1 or HTTP/2 server protocol on
each, and the connection-level limits (uvicorn's protocol classes' job; Envoy's HTTP
connection manager's codec side).

``ClientConnections.serve`` takes a client connection the outbound listener detected (or was
told) speaks HTTP, wraps it in h1.H1Server or ``ClientH2Server`` and hands every request
the codec parses to the request handler (handler.py), with the connection's
``RequestContext``.  This module owns what lives as long as a connection:

- the request-header timeout (HTTP/1.1: h1.py; HTTP/2: ``ClientH2Server``, client_h2.py) and
  the idle timeout of HTTP/2 connections (``expire``, from the proxy's sweep);
- the HTTP/2 abuse budgets of a new connection, a tenth of them while its pod is
  penalized for an earlier abuse (``http.http2.abusePenaltySeconds``);
- the set of live client connections, for drain, idle expiry and pod removal
  (``ClientConnection``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from functools import partial

from nodeproxy.codec.h1 import H1Server
from nodeproxy.codec.h2 import ErrorCodes
from nodeproxy.codec.message import Exchange
from nodeproxy.config.model import Http2Limits, HttpSettings
from nodeproxy.http.client_h2 import ClientH2Server
from nodeproxy.http.context import RequestContext
from nodeproxy.mesh.destinations import ServicePortEntry
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.tcp.relay import reset
from nodeproxy.telemetry.request_metrics import RequestMetrics

# Serves one request of a connection: handler.RequestHandler.handle, bound.
Handle = Callable[[RequestContext, Exchange], Awaitable[None]]


class ClientConnection:
    """A captured client connection served at L7: what drain, idle expiry and pod removal
    need of it."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.server: H1Server | ClientH2Server | None = None
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
        if isinstance(server, ClientH2Server) and server.idle_since is not None \
                and now - server.idle_since >= idle_timeout:
            server.shutdown()

    def abort(self) -> None:
        reset(self.transport)


class ClientConnections:
    """The node's L7 client connections (see the module docstring)."""

    def __init__(self, handle: Handle, metrics: RequestMetrics):
        self._handle = handle
        self._metrics = metrics
        self._settings = HttpSettings()
        self._clients: set[ClientConnection] = set()
        # Pods whose HTTP/2 connection was closed for abuse: loop time it last happened.
        self._h2_abusers: dict[str, float] = {}

    def update(self, settings: HttpSettings, local_pods: Collection[str]) -> None:
        """A new configuration or pod set: pods no longer enrolled lose their penalty."""
        self._settings = settings
        self._h2_abusers = {k: v for k, v in self._h2_abusers.items() if k in local_pods}

    def expire(self, now: float) -> None:
        """Close HTTP/2 client connections idle past http.idleTimeoutSeconds."""
        for client in list(self._clients):
            client.expire(now, self._settings.idle_timeout_seconds)

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
        context = RequestContext(pod, entry, version, http2_upstream, pod.workload.access_log)
        settings = self._settings
        # The handler bound to this connection's context: no wrapper coroutine per request.
        handle = partial(self._handle, context)

        def bad_request(protocol: str) -> Callable[[str], None]:
            return lambda reason: self._metrics.count_bad_request(protocol, reason)

        def timed_out(protocol: str) -> Callable[[str], None]:
            return lambda kind: self._metrics.count_downstream_timeout(protocol, kind)

        if http2_client:
            h2_server = ClientH2Server(
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


def _h2_error_label(code: int) -> str:
    """A bounded label for an HTTP/2 connection error (h2's messages quote the peer)."""
    try:
        return "h2_" + ErrorCodes(code).name.lower()
    except ValueError:
        return "h2_error"

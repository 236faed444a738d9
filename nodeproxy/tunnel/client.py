"""The HBONE client: pooled mutual-TLS HTTP/2 connections to other nodes' pods.

Connections are pooled per (source identity, destination identity, destination node),
each carrying many CONNECT streams, so a new pod-to-pod connection does not pay a
TLS handshake.  A pooled connection is dialled to the first destination pod's
IP:15008 and serves every pod of that identity on that node (the destination proxy
is one process per node).  Idle connections close after idle_timeout; every
keepalive interval each connection is pinged, and one that does not answer is
dropped; a stream that fails to open on a pooled connection is retried once on a
fresh one, so a stale connection never fails the user's connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass

import h2.errors
import h2.exceptions
from mypy_extensions import mypyc_attr

from nodeproxy.config.model import TunnelSettings
from nodeproxy.identity import tls, tls_transport
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.spiffe import IdentityError, spiffe_id
from nodeproxy.tcp.dial import connect_socket
from nodeproxy.tunnel.header_block import connect_block, source_port_field
from nodeproxy.tunnel.metrics import TunnelMetrics
from nodeproxy.tunnel.response_deadlines import ResponseDeadlines
from nodeproxy.tunnel.session import H2Session, StreamReset, StreamTransport

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@mypyc_attr(native_class=False)  # a builtin exception's subclass (compiled build)
class TunnelError(ConnectionError):
    """The tunnel could not carry this connection; `result` is a short label."""

    def __init__(self, result: str, message: str):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class PoolKey:
    source: str       # SPIFFE ID the client presents
    destination: str  # SPIFFE ID the server must present
    node: str


class HbonePool:
    def __init__(self, *, certificates: CertificateManager, trust_domain: str, port: int,
                 settings: TunnelSettings, metrics: TunnelMetrics,
                 connect_timeout: float = 5.0):
        self._certs = certificates
        self._trust_domain = trust_domain
        self.port = port
        self._settings = settings
        self._metrics = metrics
        # The server connects to the application before it answers: wait for that too.
        self._response_timeout = settings.handshake_timeout_seconds + connect_timeout
        # One timer for every awaited response, not one per stream (response_deadlines.py).
        self._deadlines = ResponseDeadlines(self._response_timeout)
        self._pools: dict[PoolKey, list[H2Session]] = {}
        self._dialing: dict[PoolKey, asyncio.Lock] = {}
        self.handshakes = 0
        self._maintainer: asyncio.Task | None = None

    def start(self) -> None:
        self._maintainer = asyncio.get_running_loop().create_task(self._maintain())

    async def open(self, *, source_namespace: str, source_sa: str, destination: str,
                   node: str, ip: IPAddress, port: int, source_ip: IPAddress,
                   l7_checked: bool = False, source_port: int = 0) -> StreamTransport:
        """A CONNECT stream to ip:port, as the source identity, to the given destination
        identity on `node`; raises TunnelError.

        l7_checked: this proxy authorizes every HTTP request it sends on the stream against
        the destination's policies (Admitter.admit_request), so the destination may judge
        the stream with L7_CHECKED_UPSTREAM.  Set it only then.  An upgrade's stream
        qualifies because nothing but its one authorized request enters it before the
        upstream's 101 (nodeproxy.http.upgrade_flow); after that it carries the upgraded
        protocol, which no node parses.

        source_port: the client's own port, sent as a hint (SOURCE_PORT); 0 sends none."""
        key = PoolKey(spiffe_id(self._trust_domain, source_namespace, source_sa), destination,
                      node)
        # Encoded once per destination (header_block.py), not by h2 per connection.
        block, target = connect_block(ip, port, source_ip, l7_checked)
        if source_port:
            block += source_port_field(source_port)
        last: Exception | None = None
        for attempt in (1, 2):
            session = await self._session(key, ip, source_namespace, source_sa,
                                          fresh=attempt == 2)
            stream = None
            try:
                stream = session.open_encoded_stream(block, target)
                response = await self._response(stream)
            except Exception as e:  # noqa: BLE001 - sorted below
                last = e
                if session.closed or isinstance(e, h2.exceptions.ProtocolError) or (
                        isinstance(e, StreamReset)
                        and e.code == h2.errors.ErrorCodes.REFUSED_STREAM):
                    # A stale or draining connection: carry on with a fresh one; the
                    # streams still open on it are left to finish.
                    self._retire(key, session)
                    continue
                if stream is not None:
                    stream.abort()  # this stream only; the connection serves others
                break
            status = response.get(":status", "")
            if status != "200":
                stream.abort()
                self._metrics.streams.labels("client", f"status_{status}").inc()
                raise TunnelError(f"status_{status}",
                                  f"tunnel to {ip}:{port} refused with HTTP {status}")
            self._metrics.stream("client", "ok")
            return stream
        result = "timeout" if isinstance(last, asyncio.TimeoutError) else "stream_failed"
        self._metrics.streams.labels("client", result).inc()
        raise TunnelError(result, f"tunnel stream to {ip}:{port} failed: {last!r}")

    async def _response(self, stream: StreamTransport) -> dict[str, str]:
        """The stream's CONNECT response; TimeoutError past the response timeout."""
        future = stream.response
        assert future is not None  # a client's stream
        if future.done():
            return future.result()
        deadlines = self._deadlines
        deadlines.watch(future)
        try:
            return await future
        finally:
            deadlines.done(future)

    async def _session(self, key: PoolKey, ip: IPAddress, namespace: str, sa: str,
                       fresh: bool) -> H2Session:
        if not fresh:
            pooled = self._pooled(key)
            if pooled is not None:
                return pooled
        lock = self._dialing.setdefault(key, asyncio.Lock())
        async with lock:
            live = [s for s in self._pools.get(key, [])
                    if not s.closed and not s.goaway and not s.retired]
            self._pools[key] = live
            if not fresh:
                limit = self._settings.max_streams_per_connection
                room = [s for s in live if len(s.streams) < limit]
                if room:
                    return min(room, key=lambda s: len(s.streams))
                if len(live) >= self._settings.max_connections_per_key:
                    return min(live, key=lambda s: len(s.streams))
            session = await self._dial(key, ip, namespace, sa)
            self._pools[key].append(session)
            self._metrics.pooled_connections.inc()
            return session

    def _pooled(self, key: PoolKey) -> H2Session | None:
        """The least busy live connection of the key with room for a stream, without the
        dial lock (what nearly every stream finds); None: ask under the lock."""
        best: H2Session | None = None
        limit = self._settings.max_streams_per_connection
        for session in self._pools.get(key, ()):
            if session.closed or session.goaway or session.retired:
                continue
            if len(session.streams) < limit and (
                    best is None or len(session.streams) < len(best.streams)):
                best = session
        return best

    async def _dial(self, key: PoolKey, ip: IPAddress, namespace: str, sa: str) -> H2Session:
        try:
            context = tls.client_context(self._certs, namespace, sa)
        except IdentityError as e:  # no leaf yet (the signing service has not answered)
            self._metrics.handshakes.labels("client", e.reason).inc()
            raise TunnelError(e.reason, f"tunnel to {ip}:{self.port}: {e}") from e
        failure: list[IdentityError] = []

        def verify(session: H2Session) -> bool:
            assert session.transport is not None
            try:
                identity = tls.verify_peer(session.transport.get_extra_info("ssl_object"),
                                           self._trust_domain, expected=key.destination)
            except IdentityError as e:
                failure.append(e)
                return False
            session.peer_identity = str(identity)
            return True

        session = H2Session(client_side=True, on_ready=verify,
                            on_lost=lambda s: self._lost(key, s))
        timeout = self._settings.handshake_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sock = socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                             socket.SOCK_STREAM)
        try:
            # Our own connect (tcp/dial.py), not loop.create_connection(host, port):
            # uvloop sends even a numeric address to getaddrinfo in its thread pool.
            try:
                sock.setblocking(False)
                await connect_socket(sock, (str(ip), self.port), timeout)
            except BaseException:
                sock.close()  # not a transport's yet (after that, the transport's to close)
                raise
            await tls_transport.handshake_connected(
                session, context, sock, handshake_timeout=max(deadline - loop.time(), 0.0))
            await asyncio.wait_for(session.ready, timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            reason = failure[0].reason if failure else tls.classify_handshake_error(e)
            self._metrics.handshakes.labels("client", reason).inc()
            detail = str(failure[0]) if failure else str(e)
            log.warning("HBONE handshake to %s:%d (%s) failed (%s): %s", ip, self.port,
                        key.destination, reason, detail)
            session.abort()
            raise TunnelError(reason, f"tunnel to {ip}:{self.port}: {detail}") from e
        self.handshakes += 1
        self._metrics.handshakes.labels("client", "ok").inc()
        return session

    def _lost(self, key: PoolKey, session: H2Session) -> None:
        sessions = self._pools.get(key, [])
        if session in sessions:
            sessions.remove(session)
            self._metrics.pooled_connections.dec()

    def _drop(self, key: PoolKey, session: H2Session) -> None:
        self._lost(key, session)
        session.abort()

    def _retire(self, key: PoolKey, session: H2Session) -> None:
        self._lost(key, session)
        session.retire()

    async def _maintain(self) -> None:
        """Close idle connections; ping the rest and drop those that do not answer."""
        interval = min(self._settings.keepalive_seconds, self._settings.idle_timeout_seconds)
        while True:
            await asyncio.sleep(interval)
            now = asyncio.get_running_loop().time()
            for key, sessions in list(self._pools.items()):
                for session in list(sessions):
                    if not session.streams and (
                            now - session.last_activity >= self._settings.idle_timeout_seconds):
                        self._lost(key, session)
                        session.close()
                        continue
                    try:
                        await session.ping(self._settings.handshake_timeout_seconds)
                    except (TimeoutError, ConnectionError):
                        log.warning("pooled HBONE connection to %s did not answer a ping; "
                                    "dropping it", key.destination)
                        self._drop(key, session)

    def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
        self._deadlines.close()
        for key, sessions in list(self._pools.items()):
            for session in list(sessions):
                self._lost(key, session)
                session.close()

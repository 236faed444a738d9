"""The HBONE server: port 15008 inside every enrolled pod, where other nodes' proxies
deliver their pods' connections as HTTP/2 CONNECT streams over mutual TLS.

TLS is started on each accepted socket explicitly (identity.tls_transport.accept), so a
failed handshake — garbage instead of a ClientHello, a certificate from another CA, an expired
or wrong-domain one — is classified, counted and logged here, and touches nothing else.
The listener presents the current certificate of its pod's service account (an SNI
callback swaps in the current context, so rotation needs no new listener).

Fair share: an accepted connection that would take a reserved descriptor is closed at
once, and one remote node (the peer address of its mTLS connections) may have at most
``limits.inbound.maxStreamsPerNode`` streams open here; past it a stream is answered 503
(both counted in nodeproxy_inbound_refused_total and nodeproxy_hbone_streams_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Mapping

import h2.errors

from nodeproxy.identity import tls, tls_transport
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.spiffe import IdentityError, spiffe_id
from nodeproxy.listeners.inbound_hbone_l7 import DestinationGate
from nodeproxy.mesh.enrolled_pod import EnrolledPod, destination_labels
from nodeproxy.mesh.holder import MeshState
from nodeproxy.policy.admission import AdmittedAs
from nodeproxy.tcp.descriptors import BUDGET
from nodeproxy.tcp.dial import DialAnnouncer, dial_transparent, relay_side
from nodeproxy.tcp.fairshare import DESCRIPTORS, Lease, RefusalLog, SourceShares
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.relay_sleep import RelayNaps
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.tunnel.headers import (
    L7_AUTHORIZED,
    SOURCE_PORT,
    HeaderError,
    parse_authority,
    parse_forwarded,
    parse_source_port,
)
from nodeproxy.tunnel.metrics import TunnelMetrics
from nodeproxy.tunnel.session import H2Session, StreamTransport

log = logging.getLogger(__name__)


class _AcceptLoop:
    """Accepts raw TCP connections and starts TLS on each (a closable listener)."""

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket], None]):
        self._sock = sock
        self._handle = handle
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                log.warning("HBONE accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._handle(conn)

    def close(self) -> None:
        self._task.cancel()
        self._sock.close()


class HboneServer:
    def __init__(self, *, certificates: CertificateManager, trust_domain: str, port: int,
                 announcer: DialAnnouncer,
                 handshake_timeout: float, connect_timeout: float,
                 local_pod: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address],
                                     EnrolledPod | None],
                 state: MeshState,
                 tracker: ConnectionTracker, metrics: ProxyMetrics,
                 tunnel_metrics: TunnelMetrics,
                 shares: SourceShares | None = None,
                 gate: DestinationGate | None = None, naps: RelayNaps | None = None):
        self._certs = certificates
        # A quiet stream's relay gives up its server socket's transport while it sleeps
        # (tcp/half_sleep.py).
        self._naps = naps
        self._gate = gate  # None: a stream refused for rules on HTTP stays refused
        self._shares = shares  # streams per remote node
        self._refusals = RefusalLog(log)
        self._announcer = announcer
        self._trust_domain = trust_domain
        self.port = port
        self._handshake_timeout = handshake_timeout
        self._connect_timeout = connect_timeout
        self._local_pod = local_pod
        self._state = state
        self.tracker = tracker
        self._metrics = metrics
        self._tunnel = tunnel_metrics

    def _context(self, pod: EnrolledPod) -> ssl.SSLContext:
        ns, sa = pod.workload.namespace, pod.workload.service_account
        base = tls.server_context(self._certs, ns, sa)

        def current(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            ssl_object.context = tls.server_context(self._certs, ns, sa)

        base.sni_callback = current
        return base

    async def open_listeners(self, pod: EnrolledPod) -> None:
        # Certificates from the mesh signing service are signed ahead of the handshakes
        # that need them (nodeproxy/signer/remote_certificates.py).
        prepare = getattr(self._certs, "prepare", None)
        if prepare is not None:
            await prepare(pod.workload.namespace, pod.workload.service_account)
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = pod.netns.listener(family, host, self.port)
            # A listener closed as a server is (close() is all the pod asks of it).
            pod.listeners.append(_AcceptLoop(  # type: ignore[arg-type]
                sock, functools.partial(self._accepted, pod)))

    def _accepted(self, pod: EnrolledPod, conn: socket.socket) -> None:
        if not BUDGET.admits_socket(conn, headroom=1):
            self._metrics.inbound_refused.labels(pod.workload.namespace, pod.ref.workload,
                                                 DESCRIPTORS).inc()
            self._refusals.refused(pod.key, DESCRIPTORS, "HBONE connection")
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        self.tracker.spawn(self._handshake(pod, conn))

    async def _handshake(self, pod: EnrolledPod, conn: socket.socket) -> None:
        if not self.tracker.accepting:
            conn.close()
            return
        try:
            peer = conn.getpeername()
        except OSError:
            conn.close()
            return
        failure: list[IdentityError] = []
        local_identity = spiffe_id(self._trust_domain, pod.workload.namespace,
                                   pod.workload.service_account)

        def verify(session: H2Session) -> bool:
            assert session.transport is not None
            try:
                identity = tls.verify_peer(session.transport.get_extra_info("ssl_object"),
                                           self._trust_domain)
            except IdentityError as e:
                failure.append(e)
                return False
            session.peer_identity = str(identity)
            session.local_identity = local_identity
            return True

        # A tunnel stream is a TCP connection: short ones are normal, and a client that
        # closes first ends its stream with END_STREAM then CANCEL.  Only a reset before
        # the response (200) is premature here, whatever the stream's age.
        limits = self._state.current.config.http.http2.model_copy(
            update={"premature_reset_lifetime_seconds": 0.0})
        session = H2Session(client_side=False, on_request=self._on_request, on_ready=verify,
                            limits=limits,
                            on_abuse=lambda reason: self._tunnel.abuse.labels(reason).inc())
        try:
            # tls_transport.accept raises the handshake's failure to us, so every
            # refusal is classified and counted here.
            await tls_transport.accept(session, self._context(pod), conn,
                                       handshake_timeout=self._handshake_timeout)
            await asyncio.wait_for(asyncio.shield(session.ready), self._handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError, IdentityError) as e:
            # (IdentityError: this pod has no leaf yet, see remote_certificates.py)
            if failure:
                self._refuse_handshake(peer, pod, failure[0].reason, str(failure[0]))
            else:
                self._refuse_handshake(peer, pod, tls.classify_handshake_error(e), str(e))
            session.abort()
            conn.close()
            return
        self._tunnel.handshakes.labels("server", "ok").inc()

    def _refuse_handshake(self, peer, pod: EnrolledPod, reason: str, detail: str) -> None:
        self._tunnel.handshakes.labels("server", reason).inc()
        log.warning("HBONE handshake from %s to pod %s refused (%s): %s", peer, pod.key,
                    reason, detail)

    def _on_request(self, session: H2Session, stream: StreamTransport) -> None:
        self.tracker.spawn(self._serve(session, stream))

    def _stream_refused(self, session: H2Session, stream: StreamTransport, status: int,
                        result: str, why: str) -> None:
        self._tunnel.streams.labels("server", result).inc()
        log.warning("HBONE stream from %s (%s) refused %d: %s", session.peername,
                    session.peer_identity, status, why)
        session.respond(stream, status, end=True)

    async def _serve(self, session: H2Session, stream: StreamTransport) -> None:
        if stream.is_closing():  # reset by the peer before we got to it: nothing to do
            self._tunnel.streams.labels("server", "cancelled").inc()
            return
        if not self.tracker.accepting:
            # Draining (shutdown or handover): the client retries on a fresh connection,
            # which reaches the new instance.
            self._tunnel.streams.labels("server", "refused_draining").inc()
            session.reset(stream.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            stream._finish(None)
            return
        headers = stream.request_headers
        if headers.get(":method") != "CONNECT":
            self._stream_refused(session, stream, 405, "bad_method",
                                 f"method {headers.get(':method')}")
            return
        try:
            ip, port = parse_authority(headers.get(":authority", ""))
        except HeaderError as e:
            self._stream_refused(session, stream, 400, "bad_authority", str(e))
            return
        pod = self._local_pod(ip)
        if pod is None:
            self._stream_refused(session, stream, 404, "unknown_destination",
                                 f"{ip} is not a pod on this node")
            return
        node = str(session.peername[0]) if session.peername else "?"
        lease = self._shares.admit_connection(node) if self._shares is not None \
            else Lease(None, node)
        if isinstance(lease, str):
            reason = "node_stream_limit" if lease == "connection_limit" else "node_" + lease
            self._metrics.inbound_refused.labels(pod.workload.namespace, pod.ref.workload,
                                                 reason).inc()
            self._refusals.refused(node, reason, f"HBONE stream to {pod.key}")
            self._tunnel.streams.labels("server", reason).inc()
            session.respond(stream, 503, end=True)
            return
        try:
            await self._serve_admitted(session, stream, pod, ip, port, headers, lease)
        finally:
            if not lease.adopted:
                lease.release()

    async def _serve_admitted(self, session: H2Session, stream: StreamTransport,
                              pod: EnrolledPod, ip: ipaddress.IPv4Address |
                              ipaddress.IPv6Address, port: int, headers: Mapping[str, str],
                              lease: Lease) -> None:
        pod_identity = spiffe_id(self._trust_domain, pod.workload.namespace,
                                 pod.workload.service_account)
        if pod_identity != getattr(session, "local_identity", None):
            self._stream_refused(session, stream, 421, "misdirected",
                                 f"{ip} is {pod_identity}, the tunnel was opened to "
                                 f"{getattr(session, 'local_identity', None)}")
            return
        source_ip = parse_forwarded(headers.get("forwarded"))
        if source_ip is None:  # no Forwarded: the peer node's own address
            assert session.peername
            source_ip = ipaddress.ip_address(session.peername[0])
        # A source node marks a stream whose requests it authorized; believed only if
        # tunnel.trustSourceL7Authorization says so (any value but "1" is unmarked).
        # Otherwise a stream refused only for rules on HTTP is judged request by request
        # here (inbound_hbone_l7.py).
        snapshot = self._state.current
        admitter = snapshot.admitter
        trusted = (headers.get(L7_AUTHORIZED) == "1"
                   and snapshot.config.tunnel.trust_source_l7_authorization)
        # An HBONE session's peer always has an identity (mutual TLS): never None here.
        gated = not trusted and self._gate is not None and admitter.needs_requests(
            pod.workload, session.peer_identity, source_ip, port)  # type: ignore[arg-type]
        admission = admitter.admit(pod.workload, session.peer_identity, source_ip, port,
                                   l7_checked=trusted or gated)
        if not admission.allowed:
            self._stream_refused(session, stream, 403, "denied",
                                 f"policy {admission.policy or '-'}: {admission.reason}")
            return
        admitted = admitter.admitted_as(pod.workload, session.peer_identity, source_ip, port,
                                        l7_checked=trusted or gated)
        if gated:
            self._serve_gated(session, stream, pod, ip, port, source_ip, lease, admitted)
            return
        try:
            up = await dial_transparent(pod.netns, source_ip, ip, port, self._connect_timeout,
                                        self._announcer, relay_side(),
                                        source_port=parse_source_port(headers.get(SOURCE_PORT)))
        except (TimeoutError, OSError) as e:
            self._stream_refused(session, stream, 503, "connect_failed",
                                 f"{ip}:{port}: {e}")
            return
        if stream.is_closing():  # the peer reset the stream while we connected
            self._tunnel.streams.labels("server", "cancelled").inc()
            if up.transport is not None:
                up.transport.close()
            return
        self._tunnel.stream("server", "ok")
        session.respond(stream, 200)
        down = Side("downstream", start_paused=True)
        stream.set_protocol(down)
        meter = self._metrics.meter(destination_labels(
            pod, self._state.current.table.pods.get(source_ip), session.peer_identity,
            "mutual_tls"))
        relay = Relay(down, up, meter.bytes, self.tracker.ender(meter))
        self.tracker.add(relay, pod.key, lease=lease, admitted=admitted)
        meter.opened()
        relay.start()
        if self._naps is not None:
            self._naps.offer(relay)

    def _serve_gated(self, session: H2Session, stream: StreamTransport, pod: EnrolledPod,
                     ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                     source_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     lease: Lease, admitted: AdmittedAs) -> None:
        """The stream's requests are judged here one by one (DestinationGate); the
        application is dialled per request, so nothing is connected before the 200."""
        assert self._gate is not None
        self._tunnel.stream("server", "ok")
        session.respond(stream, 200)
        meter = self._metrics.meter(destination_labels(
            pod, self._state.current.table.pods.get(source_ip), session.peer_identity,
            "mutual_tls"))
        meter.opened()

        def closed() -> None:
            self.tracker.discard(gated)  # type: ignore[arg-type]  # releases the lease
            meter.closed()

        gated = self._gate.open(stream, pod,  # type: ignore[arg-type]
                                str(session.peer_identity), source_ip, ip, port, closed)
        # Tracked as relays are: drained at shutdown, aborted with its pod.
        self.tracker.add(gated, pod.key, lease=lease,  # type: ignore[arg-type]
                         admitted=admitted)
        gated.start()

"""The outbound proxy: listeners on 15001 inside each pod, and what happens per connection.

A captured connection arrives on the pod's own loopback listener; its original
destination is the accepted socket's SO_ORIGINAL_DST (answered by netfilter in
iptables mode, by the np_original_dst eBPF program from the capture maps in ebpf
mode).  The destination table picks a backend, and the backend decides the path:

- a meshed pod on this node: admission (peer authentication + authorization on the
  source pod's identity, known from its netns) then a transparent connection into
  the destination pod, so the application sees the client pod's address; no TLS,
  both ends are in this process;
- a meshed pod on another node, with mTLS on: an HBONE stream over a pooled mutual-TLS
  connection to that node (its proxy admits and connects, transparently);
- anything else (no mesh identity, or mTLS off): a plain connection made from inside
  the source pod's netns, marked so the capture programs never touch it.

Both ends of the first and the last path are sockets of this process, so once the
relay starts the splicer may hand the flow to the kernel (nodeproxy/tcp/splicer.py).
A connection the proxy relays itself and does not splice joins the kernel's sk_msg
fast path between the application's socket and the proxy's (capture/msg_redirect.py):
their messages then skip the pod's loopback TCP stack.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable

from nodeproxy.capture.constants import POD_NO_IPV6
from nodeproxy.capture.msg_redirect import MsgRedirect, ProxyReads, counting_reads
from nodeproxy.capture.original_dst import original_destination
from nodeproxy.codec.detect import PortMode, Sniffed, port_mode, sniff
from nodeproxy.http.manager import HttpProxy
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.mesh.destinations import Resolution, ResolutionKind
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.upstream import Opened, Refused, Upstreams
from nodeproxy.tcp.descriptors import BUDGET
from nodeproxy.tcp.dial import relay_side
from nodeproxy.tcp.fairshare import DESCRIPTORS, Lease, RefusalLog, SourceShares
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.tcp.relay_sleep import RelayNaps
from nodeproxy.tcp.splicer import Splicer
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.labels import UNKNOWN, TcpLabels
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
# The one address each family's outbound listener is bound to in a pod's netns: also every
# accepted connection's local address.
_LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


class OutboundProxy:
    def __init__(
        self,
        *,
        upstreams: Upstreams,
        http: HttpProxy | None,
        metrics: ProxyMetrics,
        state: MeshState,
        tracker: ConnectionTracker,
        splicer: Splicer,
        trust_domain: str,
        port: int,
        on_captured: Callable[[EnrolledPod], None] | None = None,
        msg_redirect: MsgRedirect | None = None,
        shares: SourceShares | None = None,
        naps: RelayNaps | None = None,
    ):
        self._upstreams = upstreams
        self._naps = naps  # relays that Python moves sleep while quiet (tcp/relay_sleep.py)
        # Each source pod's fair share: connections at once and per second (fairshare.py).
        self._shares = shares
        self._refusals = RefusalLog(log)
        self._http = http
        # Counts a connection the kernel steered here, where the kernel does not (iptables).
        self._on_captured = on_captured
        self._metrics = metrics
        self._state = state
        self._tracker = tracker
        self._splicer = splicer
        self._trust_domain = trust_domain
        self.port = port
        self._msg_redirect = msg_redirect
        self._opaque_of: object = None  # the HTTP settings self._opaque was built from
        self._opaque: frozenset[int] = frozenset()

    async def open_listeners(self, pod: EnrolledPod) -> None:
        """Listen on 127.0.0.1 and [::1] at the outbound port inside the pod's netns."""
        loop = asyncio.get_running_loop()
        for family, host in _LOOPBACK.items():
            try:
                sock = pod.netns.listener(family, host, self.port, LISTEN_BACKLOG)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    log.warning("pod %s has no IPv6 loopback; IPv6 capture off", pod.key)
                    pod.flags |= POD_NO_IPV6  # connect6 leaves the pod alone
                    continue
                raise
            server = await loop.create_server(self._accepting(pod), sock=sock,
                                              backlog=LISTEN_BACKLOG)
            pod.listeners.append(server)

    def _accepting(self, pod: EnrolledPod) -> Callable[[], Side]:
        """The protocol factory of a pod's listeners: what it passes on is made once per
        pod, not per accepted connection."""
        serve = functools.partial(self._serve, pod)
        admit = functools.partial(self._admit, pod)
        client_side = self._tracker.client_side
        return lambda: client_side(serve, admit)

    def _admit(self, pod: EnrolledPod, down: Side) -> Lease | None:
        """At accept, before anything else: the descriptor reserve, then the pod's fair
        share.  None: refused (reset and counted)."""
        assert down.transport is not None
        if not BUDGET.admits_socket(down.transport.get_extra_info("socket"), headroom=1):
            self._refuse_share(pod, down, DESCRIPTORS)
            return None
        if self._shares is None:
            return Lease(None, pod.key)  # no caps: a lease that holds nothing
        lease = self._shares.admit_connection(pod.key)
        if isinstance(lease, str):
            self._refuse_share(pod, down, "pod_" + lease)
            return None
        return lease

    def _refuse_share(self, pod: EnrolledPod, down: Side, reason: str) -> None:
        self._refusals.refused(pod.key, reason, "outbound connection")
        self._refuse(pod, down, reason)

    async def _serve(self, pod: EnrolledPod, down: Side) -> None:
        assert down.transport is not None
        original = original_destination(down.transport.get_extra_info("socket"))
        if original is None or original.ip.is_loopback:
            # Not a captured connect: something dialled 15001 directly (loopback is never
            # captured, so a loopback answer is the listener itself).
            self._refuse(pod, down, "no_original_destination")
            return
        if self._on_captured is not None:
            self._on_captured(pod)
        table = self._state.current.table
        decision = table.resolve(original.ip, original.port)
        if decision.verdict is ResolutionKind.REFUSE or decision.backend is None:
            log.info("refused %s -> %s:%s: %s", pod.key, original.ip, original.port,
                     decision.reason)
            self._refuse(pod, down, "registry_only" if decision.service is None
                         else "no_endpoints")
            return
        mode = self._l7_mode(decision)
        opened: Opened[Side] | None = None
        if mode is not PortMode.OPAQUE:
            if mode is PortMode.DETECT and decision.backend is not None and \
                    not self._upstreams.has_l7_policy(decision.backend, table):
                # Connect at once: a server that speaks first is never kept waiting, and
                # its first bytes end the detection.  (Not to a workload with HTTP
                # authorization rules: its connections are judged request by request.)
                opened = await self._open_l4(pod, down, decision)
                if opened is None:
                    return
            if await self._serve_http(pod, down, decision, mode, opened):
                return
        if opened is None:
            opened = await self._open_l4(pod, down, decision)
            if opened is None:
                return
        # A flow whose first bytes were sniffed is not spliced: taking such a flow back from
        # the kernel duplicated one segment in 1 of 5 runs (0 of 8 without the sniff); see
        # docs/architecture.md, "Fast paths".  Declare the port (appProtocol: tcp) to splice.
        self._relay(pod, down, decision, opened, spliceable=mode is not PortMode.DETECT)

    def _l7_mode(self, decision: Resolution) -> PortMode:
        if (self._http is None or decision.verdict is not ResolutionKind.SERVICE
                or decision.port is None):
            return PortMode.OPAQUE
        settings = self._http.settings
        if settings is not self._opaque_of:  # a reload: the set built once per settings
            self._opaque_of, self._opaque = settings, frozenset(settings.opaque_ports)
        return port_mode(decision.port.app_protocol, decision.port.port, self._opaque)

    async def _serve_http(self, pod: EnrolledPod, down: Side, decision: Resolution,
                          mode: PortMode, opened: Opened[Side] | None) -> bool:
        """Hand the connection to the HTTP layer if it speaks HTTP; False: relay it as TCP."""
        assert self._http is not None and decision.port is not None
        loop = asyncio.get_running_loop()
        accepted_at = loop.time()
        # A declared HTTP port waits for the first request head as long as the request
        # header timeout allows: a silent connection does not hold its descriptors longer.
        deadline = loop.time() + (self._http.settings.detection_timeout_seconds
                                  if mode is PortMode.DETECT
                                  else self._http.settings.request_headers_timeout_seconds)
        # Bytes may be here already (read before the decision was made).
        sniffed = sniff(b"".join(down.early))
        while sniffed is None and not (down.got_eof or down.lost):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            seen = len(down.early)
            if opened is not None:
                up = opened.protocol
                waiters = [loop.create_task(down.wait_early(remaining, seen)),
                           loop.create_task(up.wait_early(remaining))]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if up.early or up.got_eof or up.lost:
                    return False  # the server spoke first: not HTTP from this client
            else:
                await down.wait_early(remaining, seen)
            sniffed = sniff(b"".join(down.early))
        if not down.early and (down.got_eof or down.lost):
            if mode is PortMode.DETECT:
                return False  # the relay passes the EOF on
            down.transport.close()  # type: ignore[union-attr]
            return True
        if mode is not PortMode.DETECT and sniffed is not Sniffed.HTTP2 and not down.lost:
            sniffed = Sniffed.HTTP1  # declared HTTP: the parser answers what is not (400)
        if sniffed not in (Sniffed.HTTP1, Sniffed.HTTP2) or down.lost:
            return False
        if opened is not None:
            opened.protocol.transport.close()  # type: ignore[union-attr]
        transport = down.transport
        assert transport is not None
        initial = down.take_early()
        http2_client = sniffed is Sniffed.HTTP2
        http2_upstream = mode is PortMode.HTTP2 or (mode is PortMode.DETECT and http2_client)
        connection = self._http.serve(
            pod, decision.port, decision.backend.address.version,  # type: ignore[union-attr]
            transport, initial, http2_client=http2_client, http2_upstream=http2_upstream,
            client_eof=down.got_eof, accepted_at=accepted_at)
        self._tracker.add(connection, pod.key, lease=down.lease)  # type: ignore[arg-type]
        connection.done.add_done_callback(
            lambda _f: self._tracker.discard(connection))  # type: ignore[arg-type]
        return True

    async def _open_l4(self, pod: EnrolledPod, down: Side, decision: Resolution
                       ) -> Opened[Side] | None:
        assert decision.backend is not None
        peer = down.transport.get_extra_info("peername") if down.transport else None
        try:
            return await self._upstreams.open(pod, decision.backend, decision.service,
                                              relay_side(),
                                              source_port=peer[1] if peer else 0)
        except Refused as e:
            log.info("outbound %s -> %s:%d refused (%s): %s", pod.key,
                     decision.backend.address, decision.backend.port, e.reason, e)
            self._refuse(pod, down, e.reason)
            return None

    def _relay(self, pod: EnrolledPod, down: Side, decision: Resolution,
               opened: Opened[Side], *, spliceable: bool) -> None:
        up, security, targets = opened.protocol, opened.security, opened.targets
        meter = self._metrics.meter(self._labels(pod, decision, security))
        pods = (pod.key, *(t.key for t in targets))
        splice = spliceable and pod.workload.splice and all(
            t.workload.splice for t in targets)
        # sk_msg only for a flow the splicer will not take: a spliced flow's bytes must
        # reach the splice's stream verdict, not arrive by redirect.
        reads = None if self._splicer.would_take(up, splice) else self._fast_path(pod, down)
        relay = Relay(down, up, counting_reads(meter.bytes, reads), self._tracker.ender(meter))
        pods = self._tracker.add(relay, *pods, lease=down.lease,  # shared: kept by a splice
                                 admitted=opened.admitted)
        meter.opened()
        relay.start()
        self._splicer.offer(relay, pods, allowed=splice)
        if self._naps is not None and relay.splice is None:
            self._naps.offer(relay)  # a flow the splicer takes later is left to it

    def _fast_path(self, pod: EnrolledPod, down: Side) -> ProxyReads | None:
        """The one place a relayed connection joins the sk_msg fast path, before the proxy
        writes to it.  A flow the proxy splices in the kernel must not come here: its
        proxy-side socket would receive by redirect, past the splice verdict."""
        if self._msg_redirect is None or down.transport is None:
            return None
        transport = down.transport
        sock = transport.get_extra_info("socket")
        remote = transport.get_extra_info("peername")  # asked already by the dial: kept
        if sock is None or remote is None:
            return None
        # The accepted socket's own address is its listener's: each listens on one loopback
        # address (open_listeners).  (uvloop keeps both addresses from connection_made, so
        # asking costs no system call, but a new tuple and address string each time.)
        local = (_LOOPBACK.get(sock.family), self.port)
        if local[0] is None:
            return None
        return self._msg_redirect.enable(sock, pod.netns_cookie, local, remote)

    def _refuse(self, pod: EnrolledPod, down: Side, reason: str) -> None:
        self._metrics.refused.labels(pod.workload.namespace, pod.ref.workload, reason).inc()
        reset(down.transport)

    def _labels(self, pod: EnrolledPod, decision: Resolution, security: str) -> TcpLabels:
        dest = decision.backend.workload if decision.backend else None
        return TcpLabels(
            reporter="source",
            source_workload=pod.ref.workload,
            source_workload_namespace=pod.workload.namespace,
            source_principal=pod.principal,
            destination_workload=dest.workload if dest else UNKNOWN,
            destination_workload_namespace=dest.namespace if dest else UNKNOWN,
            destination_principal=(
                spiffe_id(self._trust_domain, dest.namespace, dest.service_account)
                if dest else UNKNOWN),
            destination_service=decision.service or (
                str(decision.backend.address) if decision.backend else UNKNOWN),
            connection_security_policy=security,
        )


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
relay starts the splicer may hand the flow to the kernel (nodeproxy/proxy/splice.py).
A connection the proxy relays itself and does not splice joins the kernel's sk_msg
fast path between the application's socket and the proxy's (capture/msg_redirect.py):
their messages then skip the pod's loopback TCP stack.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable

from nodeproxy.capture.constants import POD_NO_IPV6
from nodeproxy.capture.msg_redirect import MsgRedirect, ProxyReads, counting_reads
from nodeproxy.capture.original_dst import original_destination
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.pods.pod import EnrolledPod
from nodeproxy.proxy.admission import Admitter
from nodeproxy.proxy.destinations import Backend, Decision, DestinationTable, Verdict
from nodeproxy.proxy.dial import DialAnnouncer, dial_from, dial_transparent
from nodeproxy.proxy.relay import Relay, Side, reset
from nodeproxy.proxy.splice import Splicer
from nodeproxy.proxy.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import UNKNOWN, ConnectionMeter, ProxyMetrics, TcpLabels
from nodeproxy.tunnel.client import HbonePool, TunnelError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


class Refused(Exception):
    """The connection is not allowed or cannot be made; `reason` labels the metric."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class OutboundProxy:
    def __init__(
        self,
        *,
        announcer: DialAnnouncer,
        metrics: ProxyMetrics,
        table: Callable[[], DestinationTable],
        admitter: Callable[[], Admitter],
        local_pod: Callable[[str], EnrolledPod | None],
        pool: HbonePool | None,
        tracker: ConnectionTracker,
        splicer: Splicer,
        node: str,
        trust_domain: str,
        port: int,
        connect_timeout: float,
        on_captured: Callable[[EnrolledPod], None] | None = None,
        msg_redirect: MsgRedirect | None = None,
    ):
        self._announcer = announcer
        # Counts a connection the kernel steered here, where the kernel does not (iptables).
        self._on_captured = on_captured
        self._metrics = metrics
        self._table = table
        self._admitter = admitter
        self._local_pod = local_pod
        self._pool = pool
        self._tracker = tracker
        self._splicer = splicer
        self._node = node
        self._trust_domain = trust_domain
        self.port = port
        self._connect_timeout = connect_timeout
        self._msg_redirect = msg_redirect

    async def open_listeners(self, pod: EnrolledPod) -> None:
        """Listen on 127.0.0.1 and [::1] at the outbound port inside the pod's netns."""
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                sock = pod.netns.listener(family, host, self.port, LISTEN_BACKLOG)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    log.warning("pod %s has no IPv6 loopback; IPv6 capture off", pod.key)
                    pod.flags |= POD_NO_IPV6  # connect6 leaves the pod alone
                    continue
                raise
            server = await loop.create_server(
                lambda pod=pod: self._tracker.client_side(
                    lambda side, pod=pod: self._serve(pod, side)),
                sock=sock, backlog=LISTEN_BACKLOG)
            pod.listeners.append(server)

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
        decision = self._table().resolve(original.ip, original.port)
        if decision.verdict is Verdict.REFUSE or decision.backend is None:
            log.info("refused %s -> %s:%s: %s", pod.key, original.ip, original.port,
                     decision.reason)
            self._refuse(pod, down, "registry_only" if decision.service is None
                         else "no_endpoints")
            return
        try:
            up, security, targets = await self._open(pod, decision.backend, decision)
        except Refused as e:
            log.info("outbound %s -> %s:%d refused (%s): %s", pod.key,
                     decision.backend.address, decision.backend.port, e.reason, e)
            self._refuse(pod, down, e.reason)
            return
        meter = ConnectionMeter(self._metrics, self._labels(pod, decision, security))
        pods = (pod.key, *(t.key for t in targets))
        splice = pod.workload.splice and all(t.workload.splice for t in targets)
        # sk_msg only for a flow the splicer will not take: a spliced flow's bytes must
        # reach the splice's stream verdict, not arrive by redirect.
        reads = None if self._splicer.would_take(up, splice) else self._fast_path(pod, down)
        relay = Relay(down, up, counting_reads(meter.bytes, reads),
                      lambda r: self._done(r, meter))
        self._tracker.add(relay, *pods)
        meter.opened()
        relay.start()
        self._splicer.offer(relay, pods, allowed=splice)

    async def _open(self, pod: EnrolledPod, backend: Backend, decision: Decision
                    ) -> tuple[Side, str, tuple[EnrolledPod, ...]]:
        """Connect to the backend by the right path: (upstream side, security, local
        destination pods)."""
        ref = backend.workload
        source_ip = _source_address(pod, backend.address)
        try:
            if ref is not None and ref.node in (None, self._node):
                target = self._local_pod(f"{ref.namespace}/{ref.name}")
                if target is not None:
                    admission = self._admitter().admit(target.workload, pod.principal,
                                                       source_ip, backend.port)
                    if not admission.allowed:
                        raise Refused("denied", f"policy {admission.policy or '-'}: "
                                                f"{admission.reason}")
                    up = await dial_transparent(target.netns, source_ip, backend.address,
                                                backend.port, self._connect_timeout,
                                                self._announcer)
                    return up, "mutual_tls", (target,)
            if ref is not None and ref.node not in (None, self._node) and self._pool:
                stream = await self._pool.open(
                    source_namespace=pod.workload.namespace,
                    source_sa=pod.workload.service_account,
                    destination=spiffe_id(self._trust_domain, ref.namespace,
                                          ref.service_account),
                    node=ref.node, ip=backend.address, port=backend.port,
                    source_ip=source_ip)
                up = Side("upstream", start_paused=True)
                stream.set_protocol(up)
                return up, "mutual_tls", ()
            up = await dial_from(pod.netns, backend.address, backend.port,
                                 self._connect_timeout)
            return up, "none", ()
        except TunnelError as e:
            self._metrics.upstream_connect_failures.labels(
                decision.service or UNKNOWN, e.result).inc()
            raise Refused("tunnel_" + e.result, str(e)) from e
        except (TimeoutError, OSError) as e:
            reason = "timeout" if isinstance(e, asyncio.TimeoutError) else (
                errno.errorcode.get(e.errno or 0) or "error")
            self._metrics.upstream_connect_failures.labels(
                decision.service or UNKNOWN, reason).inc()
            raise Refused("upstream_" + reason.lower(), str(e)) from e

    def _fast_path(self, pod: EnrolledPod, down: Side) -> ProxyReads | None:
        """The one place a relayed connection joins the sk_msg fast path, before the proxy
        writes to it.  A flow the proxy splices in the kernel must not come here: its
        proxy-side socket would receive by redirect, past the splice verdict."""
        if self._msg_redirect is None or down.transport is None:
            return None
        sock = down.transport.get_extra_info("socket")
        return self._msg_redirect.enable(sock, pod.netns_cookie) if sock else None

    def _done(self, relay: Relay, meter: ConnectionMeter) -> None:
        self._tracker.discard(relay)
        meter.closed()

    def _refuse(self, pod: EnrolledPod, down: Side, reason: str) -> None:
        self._metrics.refused.labels(pod.workload.namespace, pod.ref.workload, reason).inc()
        reset(down.transport)

    def _labels(self, pod: EnrolledPod, decision: Decision, security: str) -> TcpLabels:
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


def _source_address(pod: EnrolledPod, destination: ipaddress.IPv4Address |
                    ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The pod's own address of the destination's family (its first address otherwise)."""
    for ip in pod.workload.ips:
        if ip.version == destination.version:
            return ip
    return pod.workload.ips[0]

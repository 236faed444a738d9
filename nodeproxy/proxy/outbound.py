"""The outbound proxy: listeners on 15001 inside each pod, and what happens per connection.

A captured connection arrives on the pod's own loopback listener; its
original destination comes from the kernel map (keyed by the pod's netns
cookie and the client socket's local address).  The destination table
decides; the upstream socket is created inside the source pod's netns (so
the destination sees the pod's IP, as without the mesh) and marked so the
capture programs never touch it.  Then a Relay moves the bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from nodeproxy.capture.constants import SOCKET_MARK
from nodeproxy.capture.maps import CaptureMaps
from nodeproxy.pods.pod import EnrolledPod, spiffe_id
from nodeproxy.proxy.destinations import Decision, DestinationTable, Verdict
from nodeproxy.proxy.relay import Relay, Side, reset
from nodeproxy.telemetry.proxy_metrics import UNKNOWN, ConnectionMeter, ProxyMetrics, TcpLabels

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


class OutboundProxy:
    def __init__(
        self,
        *,
        maps: CaptureMaps,
        metrics: ProxyMetrics,
        table: Callable[[], DestinationTable],
        trust_domain: str,
        port: int,
        connect_timeout: float,
    ):
        self._maps = maps
        self._metrics = metrics
        self._table = table
        self._trust_domain = trust_domain
        self.port = port
        self._connect_timeout = connect_timeout
        self.relays: set[Relay] = set()
        self._pending: set[asyncio.Task] = set()
        self.accepting = True

    async def open_listeners(self, pod: EnrolledPod) -> None:
        """Listen on 127.0.0.1 and [::1] at the outbound port inside the pod's netns."""
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = pod.netns.socket(family)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, self.port))
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
                server = await loop.create_server(
                    lambda pod=pod: _Downstream(self, pod), sock=sock)
            except OSError as e:
                sock.close()
                if family == socket.AF_INET6 and e.errno == 99:  # no ::1 in this pod
                    log.warning("pod %s has no IPv6 loopback; IPv6 capture off", pod.key)
                    continue
                raise
            pod.listeners.append(server)

    def _accepted(self, pod: EnrolledPod, down: _Downstream) -> None:
        if not self.accepting:
            reset(down.transport)
            return
        task = asyncio.get_running_loop().create_task(self._connect(pod, down))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _connect(self, pod: EnrolledPod, down: _Downstream) -> None:
        assert down.transport is not None
        peer = down.transport.get_extra_info("peername")
        peer_ip = ipaddress.ip_address(peer[0])
        original = self._maps.take_original_destination(pod.netns_cookie, peer_ip, peer[1])
        if original is None:
            # Not a captured connect: something dialled 15001 directly.
            self._refuse(pod, down, "no_original_destination")
            return
        decision = self._table().resolve(original.ip, original.port)
        if decision.verdict is Verdict.REFUSE or decision.backend is None:
            log.info("refused %s -> %s:%s: %s", pod.key, original.ip, original.port,
                     decision.reason)
            self._refuse(pod, down, "registry_only" if decision.service is None
                         else "no_endpoints")
            return
        backend = decision.backend
        family = socket.AF_INET if backend.address.version == 4 else socket.AF_INET6
        sock = pod.netns.socket(family)
        up = Side("upstream", start_paused=True)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(
                loop.sock_connect(sock, (str(backend.address), backend.port)),
                self._connect_timeout)
            await loop.create_connection(lambda: up, sock=sock)
        except (TimeoutError, OSError) as e:
            sock.close()
            reason = "timeout" if isinstance(e, asyncio.TimeoutError) else (
                errno_name(e) or "error")
            log.info("upstream connect %s -> %s:%s failed: %s", pod.key, backend.address,
                     backend.port, reason)
            self._metrics.upstream_connect_failures.labels(
                decision.service or UNKNOWN, reason).inc()
            reset(down.transport)
            return
        meter = ConnectionMeter(self._metrics, self._labels(pod, decision))
        relay = Relay(down, up, meter.bytes, lambda r: self._done(r, meter))
        self.relays.add(relay)
        self._metrics.active_connections.inc()
        meter.opened()
        relay.start()

    def _done(self, relay: Relay, meter: ConnectionMeter) -> None:
        self.relays.discard(relay)
        self._metrics.active_connections.dec()
        meter.closed()

    def _refuse(self, pod: EnrolledPod, down: _Downstream, reason: str) -> None:
        self._metrics.refused.labels(pod.workload.namespace, pod.ref.workload, reason).inc()
        reset(down.transport)

    def _labels(self, pod: EnrolledPod, decision: Decision) -> TcpLabels:
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
            # Plain TCP until the HBONE tunnel exists; same-node needs no TLS.
            connection_security_policy="none",
        )

    async def drain(self, grace: float) -> int:
        """Stop accepting; wait up to `grace` seconds for relays to end; reset the rest.
        Returns how many had to be reset."""
        self.accepting = False
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.relays and loop.time() < deadline:
            await asyncio.wait([r.done for r in self.relays],
                               timeout=deadline - loop.time())
        leftover = list(self.relays)
        for relay in leftover:
            relay.abort()
        return len(leftover)

    def abort_pod(self, pod: EnrolledPod) -> None:
        """Reset the relays whose client is in this pod (its netns vanished)."""
        for relay in list(self.relays):
            if getattr(relay.downstream, "pod", None) is pod:
                relay.abort()


def errno_name(e: OSError) -> str | None:
    import errno

    return errno.errorcode.get(e.errno or 0)


class _Downstream(Side):
    def __init__(self, proxy: OutboundProxy, pod: EnrolledPod):
        super().__init__("downstream", start_paused=True)
        self.proxy = proxy
        self.pod = pod

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy._accepted(self.pod, self)

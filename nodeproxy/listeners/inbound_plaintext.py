"""Inbound plaintext (15006): connections into a meshed pod from outside the mesh.

The kernel hands a TCP connection arriving for a pod's IP to the pod's inbound
listener: in ebpf mode sk_lookup (bpf/inbound.c), which keeps the original destination
as the accepted socket's local address; in iptables mode a REDIRECT rule, which changes
the local port, so the destination is the socket's SO_ORIGINAL_DST when the kernel knows
one.  A connection to the inbound port itself is refused (relaying it would dial the
listener again, without end).  Peer authentication decides whether plaintext may pass
(STRICT refuses it unless the source is an exempt probe source), authorization
decides on the source address (no identity), and the proxy connects to the
application from inside the pod with the client's address as source.  Both ends are
sockets of this process: the splicer may hand the flow to the kernel.

Fair share: at accept, a connection that would take a reserved descriptor, or one from a
client address already holding ``limits.inbound.maxPlaintextPerSource`` connections, is
reset at once and counted (nodeproxy_inbound_refused_total).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

from nodeproxy.capture.original_dst import original_destination
from nodeproxy.mesh.enrolled_pod import EnrolledPod, destination_labels
from nodeproxy.mesh.holder import MeshState
from nodeproxy.tcp.descriptors import BUDGET
from nodeproxy.tcp.dial import DialAnnouncer, dial_transparent, relay_side
from nodeproxy.tcp.fairshare import DESCRIPTORS, Lease, RefusalLog, SourceShares
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.tcp.relay_sleep import RelayNaps
from nodeproxy.tcp.splicer import Splicer
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import ConnectionMeter, ProxyMetrics

log = logging.getLogger(__name__)

# create_server(sock=...) calls listen() again: without this it would shrink to 100.
LISTEN_BACKLOG = 4096


class InboundProxy:
    def __init__(self, *, port: int, connect_timeout: float, announcer: DialAnnouncer,
                 state: MeshState, tracker: ConnectionTracker,
                 splicer: Splicer, metrics: ProxyMetrics,
                 on_captured: Callable[[EnrolledPod], None] | None = None,
                 shares: SourceShares | None = None, naps: RelayNaps | None = None):
        self.port = port
        self._naps = naps  # relays that Python moves sleep while quiet (tcp/relay_sleep.py)
        self._shares = shares  # per client address
        self._refusals = RefusalLog(log)
        # Counts a connection the kernel steered here, where the kernel does not (iptables).
        self._on_captured = on_captured
        self._connect_timeout = connect_timeout
        self._announcer = announcer
        self._state = state
        self._tracker = tracker
        self._splicer = splicer
        self._metrics = metrics

    async def open_listeners(self, pod: EnrolledPod) -> dict[int, socket.socket]:
        """Listen on the inbound port inside the pod; returns the listening sockets by
        family, for the kernel's sockmap."""
        loop = asyncio.get_running_loop()
        sockets: dict[int, socket.socket] = {}
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = pod.netns.listener(family, host, self.port)
            server = await loop.create_server(
                functools.partial(self._tracker.client_side,
                                  functools.partial(self._serve, pod),
                                  functools.partial(self._admit, pod)),
                sock=sock, backlog=LISTEN_BACKLOG)
            pod.inbound_listeners.append(server)
            # uvloop's Server.sockets is a list where typeshed says tuple: read untyped
            # (the compiled build checks a declared tuple).
            listening: Any = getattr(server, "sockets")  # noqa: B009
            sockets[family] = listening[0]
        return sockets

    def _admit(self, pod: EnrolledPod, down: Side) -> Lease | None:
        """At accept: the descriptor reserve, then the client address's share."""
        assert down.transport is not None
        source = str((down.transport.get_extra_info("peername") or ("?",))[0])
        reason = None
        lease: Lease | str = Lease(None, source)
        if not BUDGET.admits_socket(down.transport.get_extra_info("socket"), headroom=1):
            reason = DESCRIPTORS
        elif self._shares is not None:
            lease = self._shares.admit_connection(source)
            if isinstance(lease, str):
                reason = "source_" + lease
        if reason is None:
            assert isinstance(lease, Lease)
            return lease
        self._metrics.inbound_refused.labels(pod.workload.namespace, pod.ref.workload,
                                             reason).inc()
        self._refusals.refused(source, reason, f"inbound connection to {pod.key}")
        reset(down.transport)
        return None

    async def _serve(self, pod: EnrolledPod, down: Side) -> None:
        assert down.transport is not None
        peer = down.transport.get_extra_info("peername")
        original = original_destination(down.transport.get_extra_info("socket"))
        if original is not None:
            dest_ip, port = original.ip, original.port
        else:
            local = down.transport.get_extra_info("sockname")
            dest_ip, port = ipaddress.ip_address(local[0]), local[1]
        source_ip = ipaddress.ip_address(peer[0])
        if port == self.port:
            log.info("inbound %s -> %s:%d refused: that is the inbound listener itself",
                     source_ip, pod.key, port)
            reset(down.transport)
            return
        if self._on_captured is not None:
            self._on_captured(pod)
        admitter = self._state.current.admitter
        admission = admitter.admit(pod.workload, None, source_ip, port)
        if not admission.allowed:
            reset(down.transport)
            return
        admitted = admitter.admitted_as(pod.workload, None, source_ip, port)
        # No source_port: the client's port is never kept here.  The captured connection
        # itself (client:port -> dest:port, accepted in this very netns) holds the tuple the
        # application's side of a kept-port dial would need, so the SYN would meet it.
        try:
            up = await dial_transparent(pod.netns, source_ip, dest_ip, port,
                                        self._connect_timeout, self._announcer, relay_side())
        except (TimeoutError, OSError) as e:
            log.info("inbound %s -> %s:%d: connect failed: %s", source_ip, pod.key, port, e)
            reset(down.transport)
            return
        meter = self._metrics.meter(destination_labels(
            pod, self._state.current.table.pods.get(source_ip), None, "none"))
        relay = Relay(down, up, meter.bytes, lambda r: self._done(r, meter))
        pods = self._tracker.add(relay, pod.key, lease=down.lease,  # shared: kept by a splice
                                 admitted=admitted)
        meter.opened()
        relay.start()
        self._splicer.offer(relay, pods, allowed=pod.workload.splice)
        if self._naps is not None and relay.splice is None:
            self._naps.offer(relay)  # a flow the splicer takes later is left to it

    def _done(self, relay: Relay, meter: ConnectionMeter) -> None:
        self._tracker.discard(relay)
        meter.closed()

"""Opening a connection to one backend by the right path, for the L4 relay and the L7
pools alike.

- a meshed pod on this node: a transparent connection into the destination pod, so the
  application sees the client pod's address (admitted here first for L4 flows);
- a meshed pod on another node, with mTLS on: an HBONE stream over a pooled mutual-TLS
  connection to that node (its proxy admits and connects, transparently);
- anything else (no mesh identity, or mTLS off): a plain connection made from inside
  the source pod's netns, marked so the capture programs never touch it.

The caller gives the protocol the connection gets (a relay side, or an HTTP codec).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.mesh.destinations import Backend, DestinationTable
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.policy.admission import AdmittedAs
from nodeproxy.policy.authorization import DestinationWorkload
from nodeproxy.stream_protocol import StreamProtocol
from nodeproxy.tcp.descriptors import OverBudget
from nodeproxy.tcp.dial import DialAnnouncer, dial_from, dial_transparent
from nodeproxy.telemetry.labels import UNKNOWN
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.tunnel.client import HbonePool, TunnelError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
P = TypeVar("P", bound=StreamProtocol)


class Refused(Exception):
    """The connection is not allowed or cannot be made; `reason` labels the metric."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Opened(Generic[P]):
    """An opened upstream: its protocol and what the metrics and the tracker read.  A
    plain class, not a dataclass: mypyc's build of a generic dataclass fails at import
    (``attribute '__dict__' of 'type' objects is not writable``)."""

    def __init__(self, protocol: P, security: str, targets: tuple[EnrolledPod, ...],
                 admitted: AdmittedAs | None = None):
        self.protocol = protocol
        self.security = security  # connection_security_policy: "mutual_tls" or "none"
        self.targets = targets  # destination pods on this node
        self.admitted = admitted  # what its admission here read (an L4 local target)


class Upstreams:
    def __init__(self, *, announcer: DialAnnouncer, metrics: ProxyMetrics,
                 state: MeshState,
                 local_pod: Callable[[str], EnrolledPod | None], pool: HbonePool | None,
                 node: str, trust_domain: str, connect_timeout: float):
        self._announcer = announcer
        self._metrics = metrics
        self._state = state
        self._local_pod = local_pod
        self._pool = pool
        self._node = node
        self._trust_domain = trust_domain
        self.connect_timeout = connect_timeout

    def has_l7_policy(self, backend: Backend, table: DestinationTable) -> bool:
        """Does an authorization policy with HTTP rules select the backend's workload?
        Then a connection to it must not be opened before its requests are seen."""
        ref = backend.workload
        workload = table.workloads.get(f"{ref.namespace}/{ref.name}") if ref else None
        if workload is None:
            return False
        authorizer = self._state.current.admitter.authorizer
        return authorizer.has_l7_rules(DestinationWorkload.of(workload))

    def local_target(self, backend: Backend) -> EnrolledPod | None:
        ref = backend.workload
        if ref is None or ref.node not in (None, self._node):
            return None
        return self._local_pod(f"{ref.namespace}/{ref.name}")

    async def open(self, pod: EnrolledPod, backend: Backend, service: str | None,
                   protocol: P, *, l7_checked: bool = False, source_port: int = 0
                   ) -> Opened[P]:
        """Connect `protocol` to the backend for `pod`.  An L4 flow (l7_checked False) is
        admitted here when its destination is on this node; an L7 flow's requests are
        authorized one by one by the HTTP layer instead.  Raises Refused.

        source_port: the client's own port where one client owns the connection (L4); the
        transparent dial keeps it if it can (nodeproxy.tcp.dial), HBONE passes it on."""
        ref = backend.workload
        source_ip = source_address(pod, backend.address)
        try:
            target = self.local_target(backend)
            if target is not None:
                admitted = None
                if not l7_checked:
                    admitter = self._state.current.admitter
                    admission = admitter.admit(target.workload, pod.principal, source_ip,
                                               backend.port)
                    if not admission.allowed:
                        raise Refused("denied", f"policy {admission.policy or '-'}: "
                                                f"{admission.reason}")
                    admitted = admitter.admitted_as(target.workload, pod.principal,
                                                    source_ip, backend.port)
                opened = await dial_transparent(target.netns, source_ip, backend.address,
                                                backend.port, self.connect_timeout,
                                                self._announcer, protocol,
                                                source_port=source_port)
                return Opened(opened, "mutual_tls", (target,), admitted)
            if ref is not None and ref.node not in (None, self._node) and self._pool:
                stream = await self._pool.open(
                    source_namespace=pod.workload.namespace,
                    source_sa=pod.workload.service_account,
                    destination=spiffe_id(self._trust_domain, ref.namespace,
                                          ref.service_account),
                    node=ref.node, ip=backend.address, port=backend.port,
                    source_ip=source_ip, l7_checked=l7_checked, source_port=source_port)
                stream.set_protocol(cast(asyncio.Protocol, protocol))  # (by its methods)
                return Opened(protocol, "mutual_tls", ())
            opened = await dial_from(pod.netns, backend.address, backend.port,
                                     self.connect_timeout, protocol)
            return Opened(opened, "none", ())
        except OverBudget as e:
            raise Refused(OverBudget.reason, str(e)) from e
        except TunnelError as e:
            self._metrics.upstream_connect_failures.labels(service or UNKNOWN, e.result).inc()
            raise Refused("tunnel_" + e.result, str(e)) from e
        except (TimeoutError, OSError) as e:
            reason = "timeout" if isinstance(e, asyncio.TimeoutError) else (
                errno.errorcode.get(e.errno or 0) or "error")
            self._metrics.upstream_connect_failures.labels(service or UNKNOWN, reason).inc()
            raise Refused("upstream_" + reason.lower(), str(e)) from e


def source_address(pod: EnrolledPod, destination: IPAddress) -> IPAddress:
    """The pod's own address of the destination's family (its first address otherwise)."""
    for ip in pod.workload.ips:
        if ip.version == destination.version:
            return ip
    return pod.workload.ips[0]

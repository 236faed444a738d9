"""Where a captured connection goes: service VIPs, known pods, or the outbound policy.

Built from the validated config plus runtime-enrolled pods into immutable
tables; a new table replaces the old one whole when either changes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from nodeproxy.config.model import NodeConfig, Workload
from nodeproxy.mesh.round_robin import PortRoundRobin

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


@dataclass(frozen=True)
class WorkloadRef:
    """What telemetry and policy need to know of a pod."""

    name: str
    namespace: str
    service_account: str
    workload: str  # canonical workload name, as Istio derives it from labels
    node: str | None

    @classmethod
    def of(cls, w: Workload) -> WorkloadRef:
        canonical = next((w.labels[k] for k in CANONICAL_NAME_LABELS if k in w.labels), w.name)
        return cls(w.name, w.namespace, w.service_account, canonical, w.node)


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int
    workload: WorkloadRef | None


class ResolutionKind(Enum):
    """Which of the four answers ``DestinationTable.resolve`` gave."""

    SERVICE = "service"          # a service VIP, balanced over its endpoints
    POD = "pod"                  # a known pod's IP, passed through
    PASSTHROUGH = "passthrough"  # unknown, allowed by ALLOW_ANY
    REFUSE = "refuse"            # unknown under REGISTRY_ONLY, or a service with no endpoint


@dataclass(frozen=True)
class Resolution:
    """Where one captured connection goes (whether it may is admission's: policy/)."""

    verdict: ResolutionKind
    backend: Backend | None
    service: str | None  # destination_service as Istio names it: <name>.<ns>.svc.<domain>
    reason: str = ""
    port: ServicePortEntry | None = None  # the service port, for a SERVICE verdict


@dataclass(frozen=True)
class ServicePortEntry:
    """One port of one service: its endpoints by family and what it speaks."""

    service: str  # "<ns>/<name>"
    fqdn: str
    port: int
    app_protocol: str | None
    backends_v4: tuple[Backend, ...]
    backends_v6: tuple[Backend, ...]

    def backends(self, version: int) -> tuple[Backend, ...]:
        """Endpoints of the client's address family, falling back to the other one."""
        same, other = ((self.backends_v4, self.backends_v6) if version == 4
                       else (self.backends_v6, self.backends_v4))
        return same or other


class DestinationTable:
    """Immutable lookup tables for one config + set of enrolled pods."""

    def __init__(self, config: NodeConfig, runtime_workloads: tuple[Workload, ...] = (),
                 balancer: PortRoundRobin | None = None):
        self.outbound_policy = config.mesh.outbound_policy
        workloads = {w.key: w for w in config.workloads}
        for w in runtime_workloads:
            workloads[w.key] = w
        self.workloads = workloads
        self.pods: dict[IPAddress, WorkloadRef] = {}
        for w in workloads.values():
            ref = WorkloadRef.of(w)
            for ip in w.ips:
                self.pods[ip] = ref
        self.services: dict[tuple[IPAddress, int], ServicePortEntry] = {}
        self.service_ports: dict[tuple[str, int], ServicePortEntry] = {}
        domain = config.mesh.trust_domain
        for svc in config.services:
            fqdn = f"{svc.name}.{svc.namespace}.svc.{domain}"
            members = [
                w for w in workloads.values()
                if svc.selector and w.namespace == svc.namespace
                and all(w.labels.get(k) == v for k, v in svc.selector.items())
            ]
            for sp in svc.ports:
                backends = [
                    Backend(ip, sp.backend_port, WorkloadRef.of(w))
                    for w in sorted(members, key=lambda w: w.key) for ip in w.ips
                ]
                backends += [
                    Backend(e.address, e.port, self.pods.get(e.address))
                    for e in svc.endpoints_for(sp)
                ]
                entry = ServicePortEntry(
                    svc.key, fqdn, sp.port, sp.app_protocol,
                    tuple(b for b in backends if b.address.version == 4),
                    tuple(b for b in backends if b.address.version == 6),
                )
                self.service_ports[(svc.key, sp.port)] = entry
                for vip in svc.vips:
                    self.services[(vip, sp.port)] = entry
        self._balancer = balancer or PortRoundRobin()

    def resolve(self, ip: IPAddress, port: int) -> Resolution:
        entry = self.services.get((ip, port))
        if entry is not None:
            # Prefer endpoints of the family the client used; fall back to the other.
            candidates = entry.backends(ip.version)
            if not candidates:
                return Resolution(ResolutionKind.REFUSE, None, entry.fqdn,
                                  "service has no endpoints", entry)
            backend = self._balancer.pick(entry.fqdn, port, candidates)
            return Resolution(ResolutionKind.SERVICE, backend, entry.fqdn, port=entry)
        pod = self.pods.get(ip)
        if pod is not None:
            return Resolution(ResolutionKind.POD, Backend(ip, port, pod), None)
        if self.outbound_policy == "REGISTRY_ONLY":
            return Resolution(ResolutionKind.REFUSE, None, None,
                              "not in the registry (REGISTRY_ONLY)")
        return Resolution(ResolutionKind.PASSTHROUGH, Backend(ip, port, None), None)

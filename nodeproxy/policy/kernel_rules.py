"""Compile the authorization denies that need no identity into connect()-time kernel rules.

The connect4/6 programs look up (source pod id, destination IP, destination port) in a BPF
hash map; a hit fails connect() with EPERM and counts against the policy index it holds.
Such an entry must be *certain*: the proxy would deny the connection anyway, whatever the
peer's identity.  So only this is compiled:

* DENY policies only (a DENY always wins; ALLOW policies could at most add an allow, which
  the kernel has no way to express, so they never compile).
* Only policies whose every rule depends on nothing but ``ipBlocks``/``notIpBlocks`` in its
  sources, ``ports``/``notPorts`` in its operations and ``source.ip``/``destination.port``
  conditions.  A policy that mentions principals or namespaces anywhere (sources or
  conditions) is left entirely to the proxy, which knows verified identities.
* Never a policy with a rule that uses L7 (HTTP hosts, methods or paths, or a header
  condition).  The proxy denies a connection by such a rule only when it cannot see the
  requests; when it can (or the source node checked them), it authorizes each request, so a
  connect()-time deny would block requests the policy allows.
* Per rule, only the ports it names explicitly in ``ports`` (minus that operation's own
  ``notPorts``) that its ``destination.port`` conditions also accept.  A rule without
  ``to``, and an operation with only ``notPorts``, match ports that cannot be enumerated:
  those are left to the proxy.
* Per local source pod, the rule's source conditions (and ``source.ip`` conditions) are
  evaluated on the pod's own IPs of the destination's address family (a connection to an
  IPv4 address leaves from the pod's IPv4 address).  The rule compiles for that pod and
  family only if every such IP matches; if one does not, or the pod has none of that
  family, nothing compiles.  This assumes a pod's connections leave from the addresses
  listed for it.
* Destinations: every IP of every workload the policy selects, on each compiled port.  And a
  service VIP:port whose backends (the ones the proxy would pick from for that VIP's family,
  the same fallback as nodeproxy.mesh.destinations) are *all* denied for that source pod
  by the entries above; a VIP that could still reach an allowed endpoint, or one without
  endpoints, is left to the proxy.  An explicit service endpoint that is no listed workload
  is never denied here, so its VIP never compiles.

Entries use plain addresses: an IPv4 destination dialled from an IPv6 socket as
``::ffff:a.b.c.d`` must be looked up by the program as the IPv4 address.  The list is
deduplicated (the first policy in file order wins a key) and sorted; ``policy_names[i]`` is
the "<ns>/<name>" of policy index i ("*/<name>" for a mesh-wide policy).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nodeproxy.config.model import NodeConfig, Service, ServicePort, Workload
from nodeproxy.policy.authorization import (
    Authorizer,
    CompiledPolicy,
    CompiledPolicyRule,
    IPAddress,
    selects,
)

DenyKey = tuple[int, IPAddress, int]  # (source pod id, destination IP, destination port)
_ANY_IP = ipaddress.IPv4Address(0)  # stands in for the source when only ports are checked


@dataclass(frozen=True)
class KernelDeny:
    """One connect()-time deny: this pod may not connect to ip:port (policy: an index)."""

    source_pod_id: int
    ip: IPAddress
    port: int
    policy: int  # index into CompiledDenies.policy_names

    @property
    def key(self) -> DenyKey:
        return (self.source_pod_id, self.ip, self.port)


class CompiledDenies(NamedTuple):
    denies: list[KernelDeny]
    policy_names: list[str]


def compile_connect_denies(
    config: NodeConfig,
    authorizer: Authorizer | None,
    local_source_pods: Sequence[tuple[int, Workload]],
    all_workloads: Sequence[Workload] | None = None,
    services: Sequence[Service] | None = None,
) -> CompiledDenies:
    """The certain, identity-free denies for the local pods (see the module docstring).

    authorizer: the running Authorizer (its compiled policies are reused), or None to compile
    config's.  all_workloads / services: every known destination (default: the config's;
    pass runtime-enrolled pods too).
    """
    authorizer = authorizer or Authorizer(config, ())
    workloads = list(config.workloads if all_workloads is None else all_workloads)
    services = config.services if services is None else services
    policies = [p for p in authorizer.policies if p.action == "DENY" and _connection_only(p)]
    pod_denies: dict[DenyKey, str] = {}
    for pod_id, source in sorted(local_source_pods, key=lambda item: item[0]):
        for policy in policies:
            for key in _policy_denies(policy, pod_id, source, workloads):
                pod_denies.setdefault(key, policy.name)
    vip_denies = _service_denies(pod_denies, local_source_pods, workloads, services)
    return _numbered({**vip_denies, **pod_denies}, [p.name for p in policies])


def _connection_only(policy: CompiledPolicy) -> bool:
    """True if every rule is decided by source IP and destination port alone: no identity,
    no HTTP."""
    return not any(rule.uses_identity or rule.uses_l7 for rule in policy.rules)


def _policy_denies(policy: CompiledPolicy, pod_id: int, source: Workload,
                   workloads: Sequence[Workload]) -> Iterator[DenyKey]:
    """(pod, ip, port) keys this policy surely denies for one source pod."""
    targets = [w for w in workloads if policy.selects(w.namespace, w.labels)]
    for rule in policy.rules:
        ports = _rule_ports(rule)
        if not ports:
            continue
        for family in (4, 6):
            if not _source_certainly_matches(rule, source, family):
                continue
            for target in targets:
                for ip in target.ips:
                    if ip.version == family:
                        yield from ((pod_id, ip, port) for port in sorted(ports))


def _rule_ports(rule: CompiledPolicyRule) -> frozenset[int]:
    """The ports a rule names explicitly (and its destination.port conditions accept); empty
    when it matches any port or only notPorts."""
    if rule.operations is None:
        return frozenset()
    ports = frozenset().union(*(o.explicit_ports() for o in rule.operations))
    port_conditions = [c for c in rule.conditions if c.kind == "destination.port"]
    return frozenset(p for p in ports if all(c.matches(None, None, _ANY_IP, p, None)
                                             for c in port_conditions))


def _source_certainly_matches(rule: CompiledPolicyRule, source: Workload, family: int) -> bool:
    """True if the rule's sources and source.ip conditions match every IP the pod has in
    this family (and it has one)."""
    ips = [ip for ip in source.ips if ip.version == family]
    if not ips:
        return False
    ip_conditions = [c for c in rule.conditions if c.kind == "source.ip"]
    return all(
        (rule.sources is None or any(s.matches_ip(ip) for s in rule.sources))
        and all(c.matches(None, None, ip, 0, None) for c in ip_conditions)
        for ip in ips
    )


def _service_denies(pod_denies: dict[DenyKey, str],
                    local_source_pods: Sequence[tuple[int, Workload]],
                    workloads: Sequence[Workload],
                    services: Sequence[Service]) -> dict[DenyKey, str]:
    """VIP:port keys whose every candidate backend is denied for the source pod."""
    out: dict[DenyKey, str] = {}
    for service in services:
        for service_port in service.ports:
            backends = _backends(service, service_port, workloads)
            for vip in service.vips:
                candidates = _family_candidates(backends, vip.version)
                if not candidates:
                    continue
                for pod_id, _ in local_source_pods:
                    keys = [(pod_id, ip, port) for ip, port in candidates]
                    if all(k in pod_denies for k in keys):
                        out.setdefault((pod_id, vip, service_port.port), pod_denies[keys[0]])
    return out


def _backends(service: Service, service_port: ServicePort,
              workloads: Sequence[Workload]) -> list[tuple[IPAddress, int]]:
    """Every (address, port) the proxy may pick for this service port."""
    backends: list[tuple[IPAddress, int]] = []
    if service.selector:
        for w in workloads:
            if selects(service.namespace, service.selector, w.namespace, w.labels):
                backends.extend((ip, service_port.backend_port) for ip in w.ips)
    backends.extend((e.address, e.port) for e in service.endpoints_for(service_port))
    return backends


def _family_candidates(backends: list[tuple[IPAddress, int]],
                       family: int) -> list[tuple[IPAddress, int]]:
    """The backends of the VIP's family, or of the other family if it has none."""
    same = [b for b in backends if b[0].version == family]
    return same or [b for b in backends if b[0].version != family]


def _numbered(denies: dict[DenyKey, str], order: list[str]) -> CompiledDenies:
    """Sorted KernelDeny entries, and the names of the policies they use, in file order."""
    used = [name for name in dict.fromkeys(order) if name in set(denies.values())]
    index = {name: i for i, name in enumerate(used)}
    entries = sorted(
        (KernelDeny(pod, ip, port, index[name]) for (pod, ip, port), name in denies.items()),
        key=lambda d: (d.source_pod_id, d.ip.version, d.ip, d.port),
    )
    return CompiledDenies(entries, used)

"""L4 authorization: Istio's AuthorizationPolicy evaluated on a connection's verified identity.

Semantics follow Istio exactly:

* Within a ``source`` or ``operation`` every field that is present must match (AND); within a
  field's list any value may match (OR).  An empty list counts as absent (proto3).
* A rule matches if any ``from`` matches and any ``to`` matches; an absent ``from``/``to``
  matches anything, so ``rules: [{}]`` matches every connection.  A policy matches if any of
  its rules does; a policy without rules matches nothing.
* Order: any matching DENY policy denies; otherwise, if any ALLOW policy selects the workload,
  the connection is allowed only if one of them matches; otherwise it is allowed.
* Scope: a policy without a namespace is mesh-wide; a namespaced one applies to workloads in
  that namespace; a selector narrows either to workloads whose labels contain it.
* Strings: exact, ``"prefix*"``, ``"*suffix"``, and ``"*"`` (any non-empty value).
  Principals are compared in Istio's form ``<trust-domain>/ns/<ns>/sa/<sa>``; a configured
  value may carry ``spiffe://`` or not.  A plaintext peer (no principal) never matches
  ``principals`` or ``namespaces`` and always passes ``notPrincipals``/``notNamespaces``.

Everything is compiled once per configuration; the policies that apply to a workload are
computed once per (namespace, labels) and cached, so ``decide`` does no parsing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from nodeproxy.config.model import (
    SPIFFE_SCHEME,
    AuthorizationPolicy,
    NodeConfig,
    Operation,
    Rule,
    Source,
    Workload,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Action = Literal["ALLOW", "DENY"]
ScopeKey = tuple[str, frozenset[tuple[str, str]]]

CACHE_LIMIT = 4096  # distinct (namespace, labels) sets remembered before the cache is reset


@dataclass(frozen=True)
class ConnectionAttributes:
    """What is known of one inbound connection when it is authorized."""

    source_principal: str | None  # "spiffe://td/ns/x/sa/y"; None: plaintext or unknown
    source_namespace: str | None
    source_ip: IPAddress
    destination_port: int


@dataclass(frozen=True)
class DestinationWorkload:
    """The workload a connection is for: what policy selection looks at."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, workload: Workload) -> DestinationWorkload:
        return cls(workload.namespace, dict(workload.labels))

    @property
    def scope_key(self) -> ScopeKey:
        return (self.namespace, frozenset(self.labels.items()))

    def __hash__(self) -> int:
        return hash(self.scope_key)


@dataclass(frozen=True)
class Decision:
    """The verdict on one connection.

    ``action`` names the kind of policy that decided: "DENY" when a DENY policy matched,
    "ALLOW" otherwise (an ALLOW policy matched, none of the ALLOW policies selecting the
    workload matched, or no ALLOW policy selects it).  ``policy`` is "<ns>/<name>" of the
    matching policy ("*/<name>" for a mesh-wide one), None when no single policy decided.
    """

    allowed: bool
    policy: str | None
    action: Action
    reason: str


# --- compiled matchers -----------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """A list of Istio string patterns compiled for matching."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool

    @classmethod
    def compile(cls, patterns: Sequence[str] | None, *, principal: bool = False
                ) -> StringMatch | None:
        """None for an absent or empty list (Istio: the field is not set)."""
        if not patterns:
            return None
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for raw in patterns:
            pattern = raw.removeprefix(SPIFFE_SCHEME) if principal else raw
            if pattern == "*":
                presence = True
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            else:
                exact.add(pattern)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence)

    def matches(self, value: str | None) -> bool:
        if not value:
            return False
        return (
            self.presence
            or value in self.exact
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )


def _networks(blocks: Sequence[IPNetwork] | None) -> tuple[IPNetwork, ...] | None:
    return tuple(blocks) if blocks else None


def _in_any(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip in network for network in networks)


def plain_ip(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is; others unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class CompiledSource:
    principals: StringMatch | None
    not_principals: StringMatch | None
    namespaces: StringMatch | None
    not_namespaces: StringMatch | None
    ip_blocks: tuple[IPNetwork, ...] | None
    not_ip_blocks: tuple[IPNetwork, ...] | None

    @classmethod
    def compile(cls, source: Source) -> CompiledSource:
        return cls(
            StringMatch.compile(source.principals, principal=True),
            StringMatch.compile(source.not_principals, principal=True),
            StringMatch.compile(source.namespaces),
            StringMatch.compile(source.not_namespaces),
            _networks(source.ip_blocks),
            _networks(source.not_ip_blocks),
        )

    @property
    def uses_identity(self) -> bool:
        """True if matching needs the peer's principal or namespace."""
        return any(m is not None for m in (self.principals, self.not_principals,
                                           self.namespaces, self.not_namespaces))

    def matches_ip(self, ip: IPAddress) -> bool:
        if self.ip_blocks is not None and not _in_any(ip, self.ip_blocks):
            return False
        return self.not_ip_blocks is None or not _in_any(ip, self.not_ip_blocks)

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress) -> bool:
        """principal in Istio's form (no spiffe://); ip already plain (see plain_ip)."""
        if self.principals is not None and not self.principals.matches(principal):
            return False
        if self.not_principals is not None and self.not_principals.matches(principal):
            return False
        if self.namespaces is not None and not self.namespaces.matches(namespace):
            return False
        if self.not_namespaces is not None and self.not_namespaces.matches(namespace):
            return False
        return self.matches_ip(ip)


def _ports(ports: Sequence[str] | None) -> frozenset[int] | None:
    return frozenset(int(p) for p in ports) if ports else None


@dataclass(frozen=True)
class CompiledOperation:
    ports: frozenset[int] | None
    not_ports: frozenset[int] | None

    @classmethod
    def compile(cls, operation: Operation) -> CompiledOperation:
        return cls(_ports(operation.ports), _ports(operation.not_ports))

    def matches(self, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return self.not_ports is None or port not in self.not_ports

    def explicit_ports(self) -> frozenset[int]:
        """The ports this operation surely matches; empty if it names none (notPorts only)."""
        if self.ports is None:
            return frozenset()
        return self.ports - (self.not_ports or frozenset())


@dataclass(frozen=True)
class CompiledRule:
    sources: tuple[CompiledSource, ...] | None  # None: any source
    operations: tuple[CompiledOperation, ...] | None  # None: any operation

    @classmethod
    def compile(cls, rule: Rule) -> CompiledRule:
        sources = (tuple(CompiledSource.compile(f.source) for f in rule.from_)
                   if rule.from_ else None)
        operations = (tuple(CompiledOperation.compile(t.operation) for t in rule.to)
                      if rule.to else None)
        return cls(sources, operations)

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress,
                port: int) -> bool:
        if self.operations is not None and not any(o.matches(port) for o in self.operations):
            return False
        return self.sources is None or any(
            s.matches(principal, namespace, ip) for s in self.sources
        )


@dataclass(frozen=True)
class CompiledPolicy:
    name: str  # "<ns>/<name>", or "*/<name>" for a mesh-wide policy
    namespace: str | None
    selector: Mapping[str, str] | None
    action: Action
    rules: tuple[CompiledRule, ...]
    spec: AuthorizationPolicy

    @classmethod
    def compile(cls, policy: AuthorizationPolicy) -> CompiledPolicy:
        return cls(policy.key, policy.namespace, policy.selector, policy.action,
                   tuple(CompiledRule.compile(r) for r in policy.rules), policy)

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return selects(self.namespace, self.selector, namespace, labels)

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress,
                port: int) -> bool:
        return any(r.matches(principal, namespace, ip, port) for r in self.rules)


def selects(policy_namespace: str | None, selector: Mapping[str, str] | None,
            namespace: str, labels: Mapping[str, str]) -> bool:
    """Whether a policy scoped to (namespace or mesh-wide, selector) applies to a workload."""
    if policy_namespace is not None and policy_namespace != namespace:
        return False
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


# --- the authorizer --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scoped:
    """The policies that apply to one (namespace, labels), in configuration order."""

    deny: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]


class Authorizer:
    """Decides inbound connections for one configuration.  Pure; cheap per call."""

    def __init__(self, config: NodeConfig | Sequence[AuthorizationPolicy],
                 workloads: Iterable[Workload] | None = None) -> None:
        """Compile the policies; precompute scopes for workloads (default: the config's)."""
        if isinstance(config, NodeConfig):
            specs: Sequence[AuthorizationPolicy] = config.authorization_policies
            workloads = config.workloads if workloads is None else workloads
        else:
            specs = config
        self.policies: tuple[CompiledPolicy, ...] = tuple(
            CompiledPolicy.compile(p) for p in specs
        )
        self._cache: dict[ScopeKey, _Scoped] = {}
        for w in workloads or ():
            self._scoped(DestinationWorkload.of(w))

    def applicable(self, dest: DestinationWorkload) -> tuple[CompiledPolicy, ...]:
        """The policies that select dest: DENY ones first, then ALLOW, each in config order."""
        scoped = self._scoped(dest)
        return scoped.deny + scoped.allow

    def decide(self, dest: DestinationWorkload, attrs: ConnectionAttributes) -> Decision:
        scoped = self._scoped(dest)
        principal = (attrs.source_principal.removeprefix(SPIFFE_SCHEME)
                     if attrs.source_principal else None)
        ip = plain_ip(attrs.source_ip)
        port = attrs.destination_port
        namespace = attrs.source_namespace
        for policy in scoped.deny:
            if policy.matches(principal, namespace, ip, port):
                return Decision(False, policy.name, "DENY",
                                f"denied by DENY policy {policy.name}")
        if not scoped.allow:
            return Decision(True, None, "ALLOW", "no ALLOW policy selects this workload")
        for policy in scoped.allow:
            if policy.matches(principal, namespace, ip, port):
                return Decision(True, policy.name, "ALLOW",
                                f"allowed by ALLOW policy {policy.name}")
        return Decision(False, None, "ALLOW", "no ALLOW policy matched")

    def _scoped(self, dest: DestinationWorkload) -> _Scoped:
        key = dest.scope_key
        scoped = self._cache.get(key)
        if scoped is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            chosen = [p for p in self.policies if p.selects(dest.namespace, dest.labels)]
            scoped = _Scoped(tuple(p for p in chosen if p.action == "DENY"),
                             tuple(p for p in chosen if p.action == "ALLOW"))
            self._cache[key] = scoped
        return scoped

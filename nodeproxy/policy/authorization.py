"""Authorization: Istio's AuthorizationPolicy evaluated on a connection's verified identity,
and on each HTTP request when the proxy sees them.

Semantics follow Istio exactly:

* Within a ``source`` or ``operation`` every field that is present must match (AND); within a
  field's list any value may match (OR).  An empty list counts as absent (proto3).
* A rule matches if any ``from`` matches, any ``to`` matches and every ``when`` condition
  matches; an absent ``from``/``to``/``when`` matches anything, so ``rules: [{}]`` matches
  every connection.  A policy matches if any of its rules does; a policy without rules
  matches nothing.
* Order: any matching DENY policy denies; otherwise, if any ALLOW policy selects the workload,
  the request is allowed only if one of them matches; otherwise it is allowed.
* Scope: a policy without a namespace is mesh-wide; a namespaced one applies to workloads in
  that namespace; a selector narrows either to workloads whose labels contain it.
* Strings: exact, ``"prefix*"``, ``"*suffix"``, and ``"*"`` (any non-empty value).
  Principals are compared in Istio's form ``<trust-domain>/ns/<ns>/sa/<sa>``; a configured
  value may carry ``spiffe://`` or not.  A plaintext peer (no principal) never matches
  ``principals`` or ``namespaces`` and always passes ``notPrincipals``/``notNamespaces``
  (the same for ``source.principal``/``source.namespace`` conditions).
* HTTP attributes (see RequestAttributes):

  - ``methods``: exact and case-sensitive, as HTTP methods are.
  - ``paths``: the request path without its query string, as the node's
    ``http.pathNormalization`` made it (nodeproxy/codec/request_target.py, the one place
    paths are normalized): the proxy matches and forwards that same path, so
    ``/a/../admin`` or ``/%61dmin`` reach neither the rule nor the backend as anything
    but ``/admin``.
  - ``hosts``: the Host header (HTTP/2 ``:authority``) exactly as sent, compared
    case-insensitively.  As in Istio the port is *not* stripped: ``"example.com"`` does
    not match ``Host: example.com:8080``; write ``["example.com", "example.com:*"]``.
  - ``request.headers[<name>]``: the header's value (the name is case-insensitive), the
    one value the upstream also gets (nodeproxy/codec/header_fields.py: a repeated
    list-valued or unknown header's lines joined with ", ", a repeated single-valued one
    refused before policy); an absent header matches no ``values`` and passes
    ``notValues``; a present but empty one matches ``"*"`` (presence) only.
    ``request.headers[host]`` reads the Host / ``:authority`` (the request's authority,
    which the codecs keep out of the fields and the upstream gets as its Host); an
    empty one is absent.

A rule *uses L7* if one of its operations sets hosts, methods or paths (or their ``not``
forms) or it has a ``request.headers`` condition.  How such a rule is judged depends on
what ``decide`` is given:

* a RequestAttributes: everything is evaluated.
* None — a connection whose requests the proxy does not see.  As Istio's ztunnel does, fail
  closed: an ALLOW rule that uses L7 does not match, and in a DENY rule the L7 parts count
  as matched (the rule matches if its other parts do).
* L7_CHECKED_UPSTREAM — an HBONE stream whose every request the node proxy at the source
  already authorized against these policies (like Istio's waypoint, it is mesh
  infrastructure).  Then in an ALLOW rule the L7 parts count as matched (each request
  carried was checked against them) and a DENY rule that uses L7 does not match (each
  request carried was checked against it).  The rest of every rule (sources, ports, other
  conditions) is still evaluated on the connection.  This is safe because only a node proxy
  can say so: the marker is a header of the HBONE CONNECT request, which only a peer holding
  a mesh certificate can send, and certificates are issued to node proxies, never to
  workloads (whose bytes travel inside the stream, where they cannot add a CONNECT
  header).  It assumes the source node runs the same policies.

Everything is compiled once per configuration; the policies that apply to a workload are
computed once per (namespace, labels) and cached, so ``decide`` does no parsing.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from nodeproxy.codec.header_fields import joined_value
from nodeproxy.codec.request_target import path_of
from nodeproxy.config.model import (
    SPIFFE_SCHEME,
    AuthorizationPolicy,
    Condition,
    NodeConfig,
    Operation,
    Rule,
    Source,
    Workload,
    condition_header,
)

if TYPE_CHECKING:
    from nodeproxy.codec.message import RequestHead

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Action = Literal["ALLOW", "DENY"]
ScopeKey = tuple[str, frozenset[tuple[str, str]]]
HeaderLookup = Callable[[str], str | None]

CACHE_LIMIT = 4096  # distinct (namespace, labels) sets remembered before the cache is reset


@dataclass(frozen=True)
class ConnectionAttributes:
    """What is known of one inbound connection when it is authorized."""

    source_principal: str | None  # "spiffe://td/ns/x/sa/y"; None: plaintext or unknown
    source_namespace: str | None
    source_ip: IPAddress
    destination_port: int


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    """One HTTP request, as the policies see it.

    path: the normalized target (request_target.py; the query string is ignored).  host:
    the Host header or HTTP/2 :authority, as sent and forwarded.  headers: a mapping
    (lowercase names are looked up directly, other spellings found by a scan) or a
    function from a lowercase name to the value.
    """

    method: str
    path: str
    host: str
    headers: Mapping[str, str] | HeaderLookup = field(default_factory=dict)

    @classmethod
    def of(cls, head: RequestHead) -> RequestAttributes:
        """From a parsed request head (nodeproxy.http), whose fields are one per name
        (header_fields.one_view); a name found twice anyway is joined as one_view does."""
        pairs = head.headers

        def lookup(name: str) -> str | None:
            return joined_value(pairs, name)

        return cls(head.method, head.path, head.authority, lookup)

    def header(self, name: str) -> str | None:
        """The value of a header, by lowercase name; None when absent.  ``host`` is the
        authority (see the module docstring), whatever the fields say."""
        if name == "host":
            return self.host or None
        headers = self.headers
        if not isinstance(headers, Mapping):
            return headers(name)
        value = headers.get(name)
        if value is None:
            for key, candidate in headers.items():
                if key.lower() == name:
                    return candidate
        return value


class L7Checked(enum.Enum):
    """See the module docstring."""

    UPSTREAM = "l7-checked-upstream"


L7_CHECKED_UPSTREAM = L7Checked.UPSTREAM
RequestInput = RequestAttributes | L7Checked | None


@dataclass(frozen=True)
class DestinationWorkload:
    """The workload a connection is for: what policy selection looks at."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, workload: Workload) -> DestinationWorkload:
        return cls(workload.namespace, dict(workload.labels))

    @cached_property
    def scope_key(self) -> ScopeKey:
        """(namespace, labels): computed once (policy decisions look it up per request)."""
        return (self.namespace, frozenset(self.labels.items()))

    def __hash__(self) -> int:
        return hash(self.scope_key)


@dataclass(frozen=True)
class Decision:
    """The verdict on one connection or request.

    ``action`` names the kind of policy that decided: "DENY" when a DENY policy matched,
    "ALLOW" otherwise (an ALLOW policy matched, none of the ALLOW policies selecting the
    workload matched, or no ALLOW policy selects it).  ``policy`` is "<ns>/<name>" of the
    matching policy ("*/<name>" for a mesh-wide one), None when no single policy decided.
    """

    allowed: bool
    policy: str | None
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class _Request:
    """A request prepared for matching: the path without its query, host lowercased."""

    method: str
    path: str
    host: str
    attributes: RequestAttributes

    @classmethod
    def of(cls, request: RequestAttributes) -> _Request:
        return cls(request.method, path_of(request.path), request.host.lower(), request)


# --- compiled matchers -----------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """A list of Istio string patterns compiled for matching."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool

    @classmethod
    def compile(cls, patterns: Sequence[str] | None, *, principal: bool = False,
                lower: bool = False) -> StringMatch | None:
        """None for an absent or empty list (Istio: the field is not set).  lower: patterns
        are lowercased, for values that are lowercased before matching (hosts)."""
        if not patterns:
            return None
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for raw in patterns:
            pattern = raw.removeprefix(SPIFFE_SCHEME) if principal else raw
            if lower:
                pattern = pattern.lower()
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


def _networks(blocks: Sequence[IPNetwork | str] | None) -> tuple[IPNetwork, ...] | None:
    return tuple(ipaddress.ip_network(b) for b in blocks) if blocks else None


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


def _exact(values: Sequence[str] | None) -> frozenset[str] | None:
    return frozenset(values) if values else None


@dataclass(frozen=True)
class CompiledOperation:
    ports: frozenset[int] | None
    not_ports: frozenset[int] | None
    hosts: StringMatch | None = None  # patterns lowercased; matched on the lowercased Host
    not_hosts: StringMatch | None = None
    methods: frozenset[str] | None = None
    not_methods: frozenset[str] | None = None
    paths: StringMatch | None = None  # matched on the normalized path
    not_paths: StringMatch | None = None

    @classmethod
    def compile(cls, operation: Operation) -> CompiledOperation:
        return cls(_ports(operation.ports), _ports(operation.not_ports),
                   StringMatch.compile(operation.hosts, lower=True),
                   StringMatch.compile(operation.not_hosts, lower=True),
                   _exact(operation.methods), _exact(operation.not_methods),
                   StringMatch.compile(operation.paths), StringMatch.compile(operation.not_paths))

    @property
    def uses_l7(self) -> bool:
        return any(m is not None for m in (self.hosts, self.not_hosts, self.methods,
                                           self.not_methods, self.paths, self.not_paths))

    def matches_port(self, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return self.not_ports is None or port not in self.not_ports

    def matches(self, port: int, request: _Request | None) -> bool:
        """request None: the HTTP fields count as matched (see CompiledPolicyRule.matches)."""
        if not self.matches_port(port):
            return False
        if request is None:
            return True
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.not_methods is not None and request.method in self.not_methods:
            return False
        if self.paths is not None and not self.paths.matches(request.path):
            return False
        if self.not_paths is not None and self.not_paths.matches(request.path):
            return False
        if self.hosts is not None and not self.hosts.matches(request.host):
            return False
        return self.not_hosts is None or not self.not_hosts.matches(request.host)

    def explicit_ports(self) -> frozenset[int]:
        """The ports this operation surely matches; empty if it names none (notPorts only)."""
        if self.ports is None:
            return frozenset()
        return self.ports - (self.not_ports or frozenset())


ConditionKind = Literal["header", "source.ip", "source.namespace", "source.principal",
                        "destination.port"]


@dataclass(frozen=True)
class NetworkMatch:
    """source.ip condition values: addresses and CIDR blocks."""

    networks: tuple[IPNetwork, ...]

    def matches(self, ip: IPAddress) -> bool:
        return _in_any(ip, self.networks)


@dataclass(frozen=True)
class PortMatch:
    """destination.port condition values."""

    ports: frozenset[int]

    def matches(self, port: int) -> bool:
        return port in self.ports


ValueMatch = StringMatch | NetworkMatch | PortMatch


def _condition_match(kind: ConditionKind, raw: Sequence[str] | None) -> ValueMatch | None:
    if not raw:
        return None
    if kind == "source.ip":
        return NetworkMatch(tuple(ipaddress.ip_network(v) for v in raw))
    if kind == "destination.port":
        return PortMatch(frozenset(int(v) for v in raw))
    return StringMatch.compile(raw, principal=kind == "source.principal")


@dataclass(frozen=True)
class CompiledCondition:
    """One ``when`` condition: the attribute its key names must match one of values (when
    set) and none of not_values (when set)."""

    kind: ConditionKind
    header: str | None  # lowercase name, for kind "header"
    values: ValueMatch | None
    not_values: ValueMatch | None

    @classmethod
    def compile(cls, condition: Condition) -> CompiledCondition:
        header = condition_header(condition.key)
        kind = "header" if header is not None else _CONDITION_KINDS[condition.key]
        return cls(kind, header, _condition_match(kind, condition.values),
                   _condition_match(kind, condition.not_values))

    @property
    def uses_l7(self) -> bool:
        return self.kind == "header"

    @property
    def uses_identity(self) -> bool:
        return self.kind in ("source.principal", "source.namespace")

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress, port: int,
                request: _Request | None) -> bool:
        """request None: a header condition counts as matched (see CompiledPolicyRule.matches)."""
        kind = self.kind
        value: str | IPAddress | int | None
        if kind == "header":
            if request is None:
                return True
            assert self.header is not None
            value = request.attributes.header(self.header)
            if value == "":  # present but empty: only "*" (presence) can match it
                return self._empty_header_matches()
        elif kind == "source.ip":
            value = ip
        elif kind == "destination.port":
            value = port
        else:
            value = principal if kind == "source.principal" else namespace
        if self.values is not None and not self.values.matches(value):
            return False
        return self.not_values is None or not self.not_values.matches(value)

    def _empty_header_matches(self) -> bool:
        def present(match: ValueMatch | None) -> bool:
            return isinstance(match, StringMatch) and match.presence

        if self.values is not None and not present(self.values):
            return False
        return not present(self.not_values)


_CONDITION_KINDS: dict[str, ConditionKind] = {
    "source.ip": "source.ip", "source.namespace": "source.namespace",
    "source.principal": "source.principal", "destination.port": "destination.port",
}


@dataclass(frozen=True)
class CompiledPolicyRule:
    sources: tuple[CompiledSource, ...] | None  # None: any source
    operations: tuple[CompiledOperation, ...] | None  # None: any operation
    conditions: tuple[CompiledCondition, ...] = ()  # all must match

    @classmethod
    def compile(cls, rule: Rule) -> CompiledPolicyRule:
        sources = (tuple(CompiledSource.compile(f.source) for f in rule.from_)
                   if rule.from_ else None)
        operations = (tuple(CompiledOperation.compile(t.operation) for t in rule.to)
                      if rule.to else None)
        conditions = tuple(CompiledCondition.compile(c) for c in rule.when or ())
        return cls(sources, operations, conditions)

    @property
    def uses_l7(self) -> bool:
        """True if an operation sets an HTTP field or a condition reads a header."""
        return (any(o.uses_l7 for o in self.operations or ())
                or any(c.uses_l7 for c in self.conditions))

    @property
    def uses_identity(self) -> bool:
        """True if matching needs the peer's principal or namespace."""
        return (any(s.uses_identity for s in self.sources or ())
                or any(c.uses_identity for c in self.conditions))

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress,
                port: int, request: _Request | None) -> bool:
        """With request None the HTTP parts (operation hosts/methods/paths, header
        conditions) count as matched and the rest is evaluated; whether that is the right
        question for a rule that uses L7 is the caller's decision (see Authorizer.decide)."""
        if self.operations is not None and not any(
                o.matches(port, request) for o in self.operations):
            return False
        if self.sources is not None and not any(
                s.matches(principal, namespace, ip) for s in self.sources):
            return False
        return all(c.matches(principal, namespace, ip, port, request) for c in self.conditions)


# How a policy's rules are consulted: with the request (FULL), for a connection whose requests
# are not seen (UNSEEN), or for a stream whose requests were checked at the source (UPSTREAM).
_FULL, _UNSEEN, _UPSTREAM = 0, 1, 2


@dataclass(frozen=True)
class CompiledPolicy:
    name: str  # "<ns>/<name>", or "*/<name>" for a mesh-wide policy
    namespace: str | None
    selector: Mapping[str, str] | None
    action: Action
    rules: tuple[CompiledPolicyRule, ...]
    spec: AuthorizationPolicy
    # The rules to evaluate, per mode (_FULL, _UNSEEN, _UPSTREAM); see the module docstring.
    views: tuple[tuple[CompiledPolicyRule, ...], ...]

    @classmethod
    def compile(cls, policy: AuthorizationPolicy) -> CompiledPolicy:
        rules = tuple(CompiledPolicyRule.compile(r) for r in policy.rules)
        without_l7 = tuple(r for r in rules if not r.uses_l7)
        if policy.action == "ALLOW":
            views = (rules, without_l7, rules)
        else:
            views = (rules, rules, without_l7)
        return cls(policy.key, policy.namespace, policy.selector, policy.action, rules, policy,
                   views)

    @property
    def uses_l7(self) -> bool:
        return any(r.uses_l7 for r in self.rules)

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return selects(self.namespace, self.selector, namespace, labels)

    @cached_property
    def allowed(self) -> Decision:
        """The verdict when this (ALLOW) policy matches: one object, not one per request."""
        return Decision(True, self.name, "ALLOW", f"allowed by ALLOW policy {self.name}")

    def matching_rule(self, principal: str | None, namespace: str | None, ip: IPAddress,
                      port: int, request: _Request | None, mode: int) -> CompiledPolicyRule | None:
        """The first rule that matches in this mode (request: set in _FULL mode only)."""
        for rule in self.views[mode]:
            if rule.matches(principal, namespace, ip, port, request):
                return rule
        return None

    def matches(self, principal: str | None, namespace: str | None, ip: IPAddress,
                port: int, request: RequestInput = None) -> bool:
        """As decide judges this policy (principal in Istio's form, ip plain)."""
        prepared, mode = _mode(request)
        return self.matching_rule(principal, namespace, ip, port, prepared, mode) is not None


def _mode(request: RequestInput) -> tuple[_Request | None, int]:
    if request is None:
        return None, _UNSEEN
    if request is L7_CHECKED_UPSTREAM:
        return None, _UPSTREAM
    assert isinstance(request, RequestAttributes)
    return _Request.of(request), _FULL


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
    uses_l7: bool  # some rule of these policies needs the HTTP request
    headers: tuple[str, ...] = ()  # the request headers their conditions read (lowercase)


class Authorizer:
    """Decides inbound connections and requests for one configuration.  Pure; cheap per call."""

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

    def headers_read(self, dest: DestinationWorkload) -> tuple[str, ...]:
        """The request headers (lowercase names) the policies that select dest read: with
        the connection's attributes and the request's method, path and host, all a request
        decision on dest depends on."""
        return self._scoped(dest).headers

    def has_l7_rules(self, dest: DestinationWorkload) -> bool:
        """Whether a policy that selects dest has a rule that uses L7: only then do its
        connections' requests need authorizing one by one."""
        return self._scoped(dest).uses_l7

    def decide(self, dest: DestinationWorkload, attrs: ConnectionAttributes,
               request: RequestInput = None) -> Decision:
        """The verdict on a connection (request None), on one HTTP request carried by it, or
        on an HBONE stream whose requests were authorized at the source
        (L7_CHECKED_UPSTREAM); see the module docstring."""
        scoped = self._scoped(dest)
        principal = (attrs.source_principal.removeprefix(SPIFFE_SCHEME)
                     if attrs.source_principal else None)
        ip = plain_ip(attrs.source_ip)
        port = attrs.destination_port
        namespace = attrs.source_namespace
        prepared, mode = _mode(request) if scoped.uses_l7 else (None, _FULL)
        for policy in scoped.deny:
            rule = policy.matching_rule(principal, namespace, ip, port, prepared, mode)
            if rule is not None:
                reason = f"denied by DENY policy {policy.name}"
                if mode == _UNSEEN and rule.uses_l7:
                    reason += " (a rule on HTTP requests, applied to the whole connection)"
                return Decision(False, policy.name, "DENY", reason)
        if not scoped.allow:
            return Decision(True, None, "ALLOW", "no ALLOW policy selects this workload")
        for policy in scoped.allow:
            if policy.matching_rule(principal, namespace, ip, port, prepared, mode) is not None:
                return policy.allowed
        if mode == _UNSEEN and any(p.uses_l7 for p in scoped.allow):
            return Decision(False, None, "ALLOW", "no ALLOW policy matched (rules on HTTP "
                                                  "requests match no connection as a whole)")
        return Decision(False, None, "ALLOW", "no ALLOW policy matched")

    def _scoped(self, dest: DestinationWorkload) -> _Scoped:
        key = dest.scope_key
        scoped = self._cache.get(key)
        if scoped is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            chosen = [p for p in self.policies if p.selects(dest.namespace, dest.labels)]
            scoped = _Scoped(tuple(p for p in chosen if p.action == "DENY"),
                             tuple(p for p in chosen if p.action == "ALLOW"),
                             any(p.uses_l7 for p in chosen),
                             tuple(sorted({c.header for p in chosen for r in p.rules
                                           for c in r.conditions if c.header is not None})))
            self._cache[key] = scoped
        return scoped

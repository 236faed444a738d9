"""HTTPRoute tables: which rule of which route a request to a service port matches.

Compiled once per configuration from the validated model.  Precedence among the rules
attached to one service port follows Gateway API: an Exact path beats a prefix, a longer
prefix beats a shorter one, then a method match, then more header matches, then more
query-parameter matches, then configuration order.  Regular-expression paths rank after
Exact and before every prefix (Gateway API leaves their rank to implementations).
Within a rule any of its matches may match; a rule without matches matches every
request.  A service port
with no route gets one default rule sending every request to the service itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from nodeproxy.codec.message import Headers, RequestHead
from nodeproxy.config.model import (
    HeaderModifier,
    HttpRoute,
    NodeConfig,
    RetryPolicy,
    RouteMatch,
    RouteRule,
    Timeouts,
)
from nodeproxy.http.fault import Fault
from nodeproxy.http.rate_limit import Limiter, Limiters


@dataclass(frozen=True)
class WeightedBackend:
    service: str  # "<ns>/<name>"
    port: int | None  # None: the port the request arrived on
    weight: int


@dataclass(frozen=True)
class Mirror:
    """A shadow service a rule copies a share of its requests to (mirror.py sends them)."""

    service: str  # "<ns>/<name>"
    port: int | None  # None: the port the request arrived on
    percentage: float  # 0..100


@dataclass(frozen=True)
class CompiledRule:
    route: str  # "<ns>/<name>" of the HTTPRoute, "" for a service's default rule
    backends: tuple[WeightedBackend, ...]
    request_headers: HeaderModifier | None
    response_headers: HeaderModifier | None
    timeouts: Timeouts
    retry: RetryPolicy
    mirrors: tuple[Mirror, ...] = ()  # empty: the request path checks only this
    rate_limit: Limiter | None = None  # None: the request path checks only this
    fault: Fault | None = None  # None: the request path checks only this
    total_weight: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_weight", sum(b.weight for b in self.backends))

    def backend(self, draw: float) -> WeightedBackend:
        """The backend for a uniform draw in [0, 1): each gets its weight's share."""
        backends = self.backends
        if len(backends) == 1 and backends[0].weight > 0:
            return backends[0]  # nearly every rule
        point = draw * self.total_weight
        for backend in self.backends:
            if point < backend.weight:
                return backend
            point -= backend.weight
        return next(b for b in reversed(self.backends) if b.weight)


def _value_matcher(kind: str, value: str):  # type: ignore[no-untyped-def]
    if kind == "RegularExpression":
        pattern = re.compile(value)
        return lambda v: v is not None and pattern.fullmatch(v) is not None
    return lambda v: v == value


@dataclass(frozen=True)
class _Match:
    rule: CompiledRule
    hostnames: tuple[str, ...]
    path_kind: str | None
    path_value: str
    method: str | None
    headers: tuple[tuple[str, object], ...]
    query: tuple[tuple[str, object], ...]
    order: int
    regex: re.Pattern[str] | None = None

    @property
    def rank(self) -> tuple[int, int, int, int, int, int]:
        kind = {"Exact": 3, "RegularExpression": 2, "PathPrefix": 1}.get(self.path_kind or "", 1)
        length = len(self.path_value) if self.path_kind != "RegularExpression" else 0
        return (-kind, -length, -(self.method is not None), -len(self.headers),
                -len(self.query), self.order)

    def matches(self, head: RequestHead, path: str, query: Sequence[tuple[str, str]]) -> bool:
        if self.hostnames and not _host_matches(self.hostnames, head.authority):
            return False
        if self.path_kind == "Exact" and path != self.path_value:
            return False
        if self.path_kind == "PathPrefix" and not _prefix_matches(self.path_value, path):
            return False
        if self.regex is not None and not self.regex.fullmatch(path):
            return False
        if self.method is not None and head.method != self.method:
            return False
        for name, test in self.headers:
            if not test(head.header(name)):  # type: ignore[operator]
                return False
        for name, test in self.query:
            if not test(next((v for k, v in query if k == name), None)):  # type: ignore[operator]
                return False
        return True


def _prefix_matches(prefix: str, path: str) -> bool:
    """Gateway API PathPrefix: element-wise, so /api matches /api and /api/x, not /apix."""
    if prefix == "/" or path == prefix:
        return True
    base = prefix.rstrip("/")
    return path.startswith(base + "/") or path == base


def _host_matches(hostnames: tuple[str, ...], authority: str) -> bool:
    host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    host = host.lower()
    for name in hostnames:
        if name.startswith("*.") and host.endswith(name[1:]):
            return True
        if host == name:
            return True
    return False


def _compile_rule(route: HttpRoute | None, rule: RouteRule, service: str,
                  limiters: Limiters | None = None, key: str = "") -> CompiledRule:
    namespace = route.namespace if route else service.split("/", 1)[0]
    backends = tuple(
        WeightedBackend(f"{ref.namespace or namespace}/{ref.name}", ref.port, ref.weight)
        for ref in rule.backend_refs) or (WeightedBackend(service, None, 1),)
    mirrors = tuple(
        Mirror(f"{m.backend_ref.namespace or namespace}/{m.backend_ref.name}",
               m.backend_ref.port, m.percentage)
        for m in rule.mirrors if m.percentage > 0)
    limiter = None
    if rule.rate_limit is not None:
        limiter = (limiters or Limiters()).get(key, rule.rate_limit)
    return CompiledRule(route.key if route else "", backends, rule.request_headers,
                        rule.response_headers, rule.timeouts, rule.retry, mirrors,
                        limiter, Fault(rule.fault) if rule.fault is not None else None)


def _compile_match(rule: CompiledRule, route: HttpRoute, match: RouteMatch | None,
                   order: int) -> _Match:
    path = match.path if match else None
    compiled = _Match(
        rule=rule,
        hostnames=tuple(h.lower() for h in route.hostnames),
        path_kind=path.type if path else None,
        path_value=path.value if path else "/",
        method=match.method if match else None,
        headers=tuple((h.name, _value_matcher(h.type, h.value)) for h in match.headers)
        if match else (),
        query=tuple((q.name, _value_matcher(q.type, q.value)) for q in match.query_params)
        if match else (),
        order=order,
        regex=re.compile(path.value) if path and path.type == "RegularExpression" else None,
    )
    return compiled


class RouteTable:
    """The rules of one service port, in precedence order."""

    def __init__(self, matches: list[_Match], default: CompiledRule | None):
        self._matches = sorted(matches, key=lambda m: m.rank)
        self.default = default

    def match(self, head: RequestHead) -> CompiledRule | None:
        if self.default is not None:
            return self.default
        path, _, raw_query = head.path.partition("?")
        query = parse_qsl(raw_query, keep_blank_values=True) if raw_query else ()
        for candidate in self._matches:
            if candidate.matches(head, path, query):
                return candidate.rule
        return None


class Routes:
    """Every service port's RouteTable, for one configuration.  Rate-limited rules take
    their buckets from limiters (a rule on several ports shares one)."""

    def __init__(self, config: NodeConfig, limiters: Limiters | None = None):
        limiters = limiters or Limiters()
        attached: dict[tuple[str, int], list[_Match]] = {}
        ports: dict[str, list[int]] = {s.key: [p.port for p in s.ports] for s in config.services}
        order = 0
        for route in config.http_routes:
            service = f"{route.namespace}/{route.service}"
            for port in ports.get(service, []):
                if route.port is not None and route.port != port:
                    continue
                bucket = attached.setdefault((service, port), [])
                for index, rule in enumerate(route.rules):
                    compiled = _compile_rule(route, rule, service, limiters,
                                             f"route/{route.key}/rules[{index}]")
                    matches: list[RouteMatch | None] = [*rule.matches] if rule.matches \
                        else [None]
                    for match in matches:
                        bucket.append(_compile_match(compiled, route, match, order))
                        order += 1
        self._tables: dict[tuple[str, int], RouteTable] = {}
        for service, service_ports in ports.items():
            for port in service_ports:
                table = attached.get((service, port))
                self._tables[(service, port)] = RouteTable(table, None) if table else \
                    RouteTable([], _compile_rule(None, RouteRule(), service))

    def table(self, service: str, port: int) -> RouteTable:
        return self._tables[(service, port)]


def apply_modifier(headers: Headers, modifier: HeaderModifier | None) -> Headers:
    """Gateway API header filters: set replaces, add appends, remove deletes."""
    if modifier is None:
        return headers
    known = _MODIFIERS.get(id(modifier))
    if known is None or known[0] is not modifier:
        known = _compile_modifier(modifier)
    _, drop, appended = known
    result = [(n, v) for n, v in headers if n not in drop]
    result.extend(appended)
    return result


# Each modifier's names to drop and fields to append, made once per modifier (a rule's
# modifiers apply to every request it matches); the modifier is kept beside them, so an
# id is never taken for another's.
_MODIFIERS: dict[int, tuple[HeaderModifier, frozenset[str], tuple[tuple[str, str], ...]]] = {}
_MODIFIERS_LIMIT = 4096


def _compile_modifier(modifier: HeaderModifier
                      ) -> tuple[HeaderModifier, frozenset[str], tuple[tuple[str, str], ...]]:
    if len(_MODIFIERS) >= _MODIFIERS_LIMIT:
        _MODIFIERS.clear()
    compiled = _MODIFIERS[id(modifier)] = (
        modifier, frozenset({h.name for h in modifier.set} | set(modifier.remove)),
        tuple((h.name, h.value) for h in (*modifier.set, *modifier.add)))
    return compiled

"""The one decision point for connections into a local pod, and for the HTTP requests they
carry: peer authentication, then authorization, on the verified identity.  Every decision
is counted by policy; every denial is logged with source identity, destination and policy.

Inbound plaintext (15006), HBONE streams (15008) and same-node mesh traffic all
ask here before the proxy connects to the application; nothing else decides.  When a
destination has policies on HTTP (Authorizer.has_l7_rules), the proxy that sees the
requests asks admit_request for each of them.

A connection admitted here carries what the decision read (AdmittedAs); when the mesh
state changes, the new Admitter judges it again (still_allows, which counts and logs
nothing) and the daemon resets those no longer allowed, as ztunnel's connection manager
closes connections a policy update denies.  A request whose connection then became a
byte relay (an HTTP upgrade: WebSocket) carries what its request's decision read
(AdmittedRequest) and is judged again the same way.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.codec.header_fields import joined_value
from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import NodeConfig, Workload
from nodeproxy.identity.spiffe import IdentityError, parse_spiffe_id
from nodeproxy.log_limit import LogLimiter
from nodeproxy.owned_cache import OwnedCache
from nodeproxy.policy.authorization import (
    L7_CHECKED_UPSTREAM,
    Authorizer,
    ConnectionAttributes,
    Decision,
    DestinationWorkload,
    RequestAttributes,
    RequestInput,
)
from nodeproxy.policy.peer_authentication import PeerAuthenticator

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Request denials: at most one warning per (destination, policy, source) in this many
# seconds; the others go to debug and are counted in the next warning.
REQUEST_WARNING_INTERVAL = 10.0
# Request decisions remembered per admitter (one configuration): at most this many (the
# source identity holding the most forgets its own past it: owned_cache.py), and
# only for requests whose path, host and policy-read header values together fit in
# DECISION_KEY_CHARS (a hostile pod's long paths are decided, not kept).
DECISION_CACHE_LIMIT = 4096
DECISION_KEY_CHARS = 1024
_WARNING_KEYS_LIMIT = 1024
PLAINTEXT_REFUSED = "plaintext refused (STRICT)"
# Distinct AdmittedAs records interned per admitter (one per source, destination and port
# in use); past it the table starts again.
_ADMITTED_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class AdmittedAs:
    """What a connection into a local pod was admitted as: every input of its decision."""

    destination: str  # the local pod's namespace/name
    source_principal: str | None  # verified SPIFFE ID; None for plaintext
    source_ip: IPAddress
    port: int
    l7_checked: bool  # admitted on the promise that its HTTP requests are judged


@dataclass(frozen=True, eq=False, slots=True)  # one per upgraded connection: by identity
class AdmittedRequest:
    """What an HTTP request that turned its connection into a byte relay (an upgrade, e.g.
    WebSocket) was admitted as: the connection's inputs and the request as the policies
    read it.  The relay goes on only while the mesh state in force would admit the same
    request again."""

    destination: str  # the destination workload's namespace/name
    source_principal: str | None
    source_ip: IPAddress
    port: int
    request: RequestAttributes

    @classmethod
    def of(cls, destination: str, source_principal: str | None, source_ip: IPAddress,
           port: int, head: RequestHead) -> AdmittedRequest:
        """From the parsed head admit_request judged, read as it reads one (a name given
        twice joined: joined_value); copied, so what the head becomes afterwards changes
        nothing."""
        pairs = head.headers
        return cls(destination, source_principal, source_ip, port, RequestAttributes(
            head.method, head.path, head.authority,
            {name: joined_value(pairs, name) or "" for name, _ in pairs}))


@dataclass(frozen=True)
class Admission:
    allowed: bool
    policy: str  # deciding policy name, "" when none
    reason: str


DecisionLabels = tuple[str, str, str]  # policy, action, result


class DecisionCounts(Collector):
    """``nodeproxy_authorization_decisions_total`` as plain counts per (policy, action,
    result), exposed at scrape: a decision is made per connection and, where policies
    read HTTP, per request, and prometheus_client's ``Counter`` takes a lock on every
    ``inc``.  The event loop counts and the admin server's scrape (the same loop) reads:
    no lock needed."""

    def __init__(self) -> None:
        self.counts: dict[DecisionLabels, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "nodeproxy_authorization_decisions",
            "Authorization decisions on connections into local pods and on their HTTP "
            "requests, by policy and result", labels=("policy", "action", "result"))
        for labels, count in list(self.counts.items()):
            family.add_metric(labels, count)
        yield family


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = DecisionCounts()
        registry.register(self.decisions)
        self.plaintext_refused = Counter(
            "nodeproxy_peer_authentication_refused",
            "Plaintext connections refused by STRICT peer authentication",
            ("destination_workload_namespace", "destination_workload"), registry=registry)

    def count_decision(self, policy: str, action: str, result: str) -> None:
        self.count((policy, action, result))

    def count(self, labels: DecisionLabels) -> None:
        counts = self.decisions.counts
        counts[labels] = counts.get(labels, 0) + 1


def _labels(decision: Decision) -> DecisionLabels:
    return (decision.policy or "", decision.action,
            "allowed" if decision.allowed else "denied")


@functools.lru_cache(maxsize=4096)
def _source_namespace(principal: str) -> str | None:
    try:
        return parse_spiffe_id(principal).namespace
    except IdentityError:
        return None


_Remembered = tuple[Decision, Admission, DecisionLabels]


class Admitter:
    """Built from one config; replaced whole when the config changes."""

    def __init__(self, config: NodeConfig, metrics: AdmissionMetrics):
        self._authorizer = Authorizer(config)
        self._peer_auth = PeerAuthenticator(config)
        self._probe_sources = tuple(config.inbound.all_probe_sources())
        self._metrics = metrics
        self._request_denials = LogLimiter(log, REQUEST_WARNING_INTERVAL)
        # Each workload's policy view, by id: made once, not on every request (the
        # workload is kept beside it, so an id is never taken for another's).
        self._targets: dict[int, tuple[Workload, DestinationWorkload]] = {}
        # Request decisions by everything they depend on (_decide_request); this admitter's
        # policies only, so a new configuration starts with none.
        # By source identity (the address for plaintext): a peer that floods it with
        # distinct requests forgets only its own decisions (owned_cache.py).  Not by the
        # address alone: a peer node claims any source address in its CONNECT's
        # Forwarded header, and spread over thousands of groups of one it made a
        # neighbour's the largest group, dropped again and again.
        self._decisions: OwnedCache[_Remembered] = OwnedCache(DECISION_CACHE_LIMIT)
        self._admitted: dict[AdmittedAs, AdmittedAs] = {}

    def _target(self, dest: Workload) -> DestinationWorkload:
        known = self._targets.get(id(dest))
        if known is not None and known[0] is dest:
            return known[1]
        if len(self._targets) > _WARNING_KEYS_LIMIT:
            self._targets.clear()
        target = DestinationWorkload.of(dest)
        self._targets[id(dest)] = (dest, target)
        return target

    @property
    def authorizer(self) -> Authorizer:
        return self._authorizer

    def admit(self, dest: Workload, source_principal: str | None, source_ip: IPAddress,
              port: int, *, l7_checked: bool = False) -> Admission:
        """May this connection reach `dest` on `port`?  source_principal is the verified
        SPIFFE ID (mTLS or same-node netns identity), None for plaintext.

        l7_checked: the connection is an HBONE stream whose every HTTP request the source
        node's proxy authorized (nodeproxy.policy.authorization, L7_CHECKED_UPSTREAM).
        Otherwise rules on HTTP are judged for the whole connection, failing closed."""
        target = self._target(dest)
        refused = self._peer_refused(dest, target, source_principal, source_ip, port)
        if refused is not None:
            return refused
        decision = self._decide(target, source_principal, source_ip, port,
                                L7_CHECKED_UPSTREAM if l7_checked else None)
        if not decision.allowed:
            log.warning("denied %s (%s) -> %s:%d%s by policy %s: %s",
                        source_principal or "plaintext", source_ip, dest.key, port,
                        " (requests checked at the source)" if l7_checked else "",
                        decision.policy or "-", decision.reason)
        return Admission(decision.allowed, decision.policy or "", decision.reason)

    def admitted_as(self, dest: Workload, source_principal: str | None,
                    source_ip: IPAddress, port: int, *,
                    l7_checked: bool = False) -> AdmittedAs:
        """The record of a connection ``admit`` let in, for still_allows later (one object
        for all the connections with the same inputs)."""
        record = AdmittedAs(dest.key, source_principal, source_ip, port, l7_checked)
        interned = self._admitted.get(record)
        if interned is None:
            if len(self._admitted) >= _ADMITTED_LIMIT:
                self._admitted.clear()
            interned = self._admitted[record] = record
        return interned

    def still_allows(self, admitted: AdmittedAs | AdmittedRequest, dest: Workload
                     ) -> Admission:
        """Would this configuration admit a connection admitted as ``admitted`` (by any
        admitter) into ``dest``, the destination as this configuration knows it?  The same
        peer authentication and authorization as admit (admit_request for an
        AdmittedRequest).  Pure: counts and logs nothing."""
        target = self._target(dest)
        if self._plaintext_refused(target, admitted.source_principal, admitted.source_ip,
                                   admitted.port):
            return Admission(False, "", PLAINTEXT_REFUSED)
        request: RequestInput
        if isinstance(admitted, AdmittedRequest):
            request = admitted.request
        else:
            request = L7_CHECKED_UPSTREAM if admitted.l7_checked else None
        decision = self._judge(target, admitted.source_principal, admitted.source_ip,
                               admitted.port, request)
        return Admission(decision.allowed, decision.policy or "", decision.reason)

    def needs_requests(self, dest: Workload, source_principal: str,
                       source_ip: IPAddress, port: int) -> bool:
        """Would this mesh connection be refused as a whole only because its HTTP requests
        are not seen (rules on HTTP failing closed), while judging each request could allow
        some?  Then the destination parses it and judges every request
        (listeners/inbound_hbone_l7.py).
        Pure: counts and logs nothing."""
        target = self._target(dest)
        if not self._authorizer.has_l7_rules(target):
            return False
        attributes = ConnectionAttributes(
            source_principal=source_principal,
            source_namespace=_source_namespace(source_principal),
            source_ip=source_ip, destination_port=port)
        return (not self._authorizer.decide(target, attributes, None).allowed
                and self._authorizer.decide(target, attributes, L7_CHECKED_UPSTREAM).allowed)

    def admit_request(self, dest: Workload, source_principal: str | None,
                      source_ip: IPAddress, port: int,
                      request: RequestAttributes | RequestHead) -> Admission:
        """May this HTTP request, on a connection from source_principal/source_ip to `dest`
        on `port`, reach the application?  Counted as connections are; denials are logged
        as warnings at most every REQUEST_WARNING_INTERVAL per destination and policy.
        A parsed request head (one field per name) is judged as RequestAttributes.of(head)
        is, without making that object when the decision is remembered."""
        return self.judge_request(dest, source_principal, source_ip, port, request)[0]

    def judge_request(self, dest: Workload, source_principal: str | None,
                      source_ip: IPAddress, port: int,
                      request: RequestAttributes | RequestHead
                      ) -> tuple[Admission, DecisionLabels | None]:
        """admit_request, and the labels it was counted under (None: refused by peer
        authentication, not by a decision): a caller that remembers an allowed request's
        verdict itself (http/authorize.py) counts its repeats in request_counts."""
        target = self._target(dest)
        if source_principal is None:  # only plaintext can be refused by peer authentication
            refused = self._peer_refused(dest, target, source_principal, source_ip, port)
            if refused is not None:
                return refused, None
        decision, admission, labels = self._decide_request(target, source_principal,
                                                           source_ip, port, request)
        if not admission.allowed:
            policy = decision.policy or "-"
            # One warning per source too: a hostile pod's denials must not hold back
            # another's (by identity, the address for plaintext: a peer node's claimed
            # addresses make no new kinds).
            self._request_denials.warn(
                (dest.key, policy, source_principal or source_ip),
                "denied request %s (%s) -> %s:%d %s %s by policy %s: %s",
                source_principal or "plaintext", source_ip, dest.key, port,
                printable(request.method), printable(request.path), policy, decision.reason)
        return admission, labels

    @property
    def request_counts(self) -> dict[DecisionLabels, int]:
        """The decision counts (``nodeproxy_authorization_decisions_total``) by labels, for
        the callers of judge_request to add to: the event loop's, no lock."""
        return self._metrics.decisions.counts

    def _peer_refused(self, dest: Workload, target: DestinationWorkload,
                      source_principal: str | None, source_ip: IPAddress,
                      port: int) -> Admission | None:
        if self._plaintext_refused(target, source_principal, source_ip, port):
            self._metrics.plaintext_refused.labels(dest.namespace, dest.name).inc()
            log.warning("denied plaintext %s -> %s:%d: peer authentication STRICT",
                        source_ip, dest.key, port)
            return Admission(False, "", PLAINTEXT_REFUSED)
        return None

    def _plaintext_refused(self, target: DestinationWorkload, source_principal: str | None,
                           source_ip: IPAddress, port: int) -> bool:
        """Peer authentication: plaintext (no principal) where STRICT refuses it."""
        return source_principal is None and not self._peer_auth.accepts_plaintext(
            target, port, source_ip, self._probe_sources)

    def _decide_request(self, target: DestinationWorkload, source_principal: str | None,
                        source_ip: IPAddress, port: int,
                        request: RequestAttributes | RequestHead) -> _Remembered:
        """_decide for one HTTP request, remembered: the verdict is a pure function of the
        destination's policies (its scope key), the connection's identity, address and
        port, the request's method, path and host and the values of the headers those
        policies read, so the same inputs are looked up, not judged again (with the
        Admission answered and the counter's labels: nothing made per request).  Counted
        per request all the same."""
        headers = self._authorizer.headers_read(target)
        if isinstance(request, RequestHead):
            pairs = request.headers
            key: tuple[object, ...] = (
                target.scope_key, source_principal, source_ip, port, request.method,
                request.path, request.authority,
                *[joined_value(pairs, name) for name in headers])
        else:
            key = (target.scope_key, source_principal, source_ip, port, request.method,
                   request.path, request.host, *[request.header(name) for name in headers])
        # Grouped by the verified identity when there is one: a peer node names any
        # source address it likes (HBONE's Forwarded), not any identity.
        owner: object = source_ip if source_principal is None else source_principal
        remembered = self._decisions.get(owner, key)
        if remembered is None:
            attributes = request if isinstance(request, RequestAttributes) \
                else RequestAttributes.of(request)
            decision = self._decide(target, source_principal, source_ip, port, attributes)
            remembered = (decision, Admission(decision.allowed, decision.policy or "",
                                              decision.reason), _labels(decision))
            if len(attributes.path) + len(attributes.host) + sum(
                    len(v) for v in key[7:] if isinstance(v, str)) <= DECISION_KEY_CHARS:
                self._decisions.put(owner, key, remembered)
            return remembered
        self._metrics.count(remembered[2])
        return remembered

    def _count(self, decision: Decision) -> None:
        self._metrics.count(_labels(decision))

    def _decide(self, target: DestinationWorkload, source_principal: str | None,
                source_ip: IPAddress, port: int, request: RequestInput) -> Decision:
        decision = self._judge(target, source_principal, source_ip, port, request)
        self._count(decision)
        return decision

    def _judge(self, target: DestinationWorkload, source_principal: str | None,
               source_ip: IPAddress, port: int, request: RequestInput) -> Decision:
        namespace = _source_namespace(source_principal) if source_principal else None
        return self._authorizer.decide(target, ConnectionAttributes(
            source_principal=source_principal, source_namespace=namespace,
            source_ip=source_ip, destination_port=port), request)


def printable(text: str, limit: int = 200) -> str:
    """A request field as it may go into a log line: bounded, control characters escaped."""
    shown = text[:limit] + ("..." if len(text) > limit else "")
    return shown.encode("unicode_escape").decode("ascii") if not shown.isprintable() else shown

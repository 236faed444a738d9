"""Fuzz target: the AuthorizationPolicy compiler and its decisions
(nodeproxy.policy.authorization, policies validated by nodeproxy.config.model).

One input is a JSON document: ``policies`` (Istio AuthorizationPolicy specs, camelCase as
in the node YAML), ``workload`` (namespace and labels of the destination),
``connections`` (source principal, namespace, IP, port) and ``requests`` (method, path,
host, headers).  Seeds are policies from the docs and tests (DENY /admin, ALLOW
/public/*, header conditions, ipBlocks, ports).  An input that is not such JSON is read
as a recipe instead: atheris' FuzzedDataProvider draws the same structure from the
bytes, so every mutation still reaches the compiler.

Invariants:
- each policy either validates or is refused by validation (pydantic's
  ValidationError), never anything else; the valid ones always compile;
- ``decide`` never raises, for every connection, with no request, with
  L7_CHECKED_UPSTREAM and with each request, and its Decision is consistent: a DENY
  action denies and names a DENY policy that selects the workload; an allow naming a
  policy names an ALLOW one;
- one request, one meaning: a request target the codecs accept
  (nodeproxy.codec.request_target.check_target) is normalized under every
  ``pathNormalization`` mode and escaped-slash action; the normalized target passes the
  codecs' check again, normalizing it again changes neither it nor the decision, and
  (modes MERGE_SLASHES and DECODE_AND_MERGE_SLASHES, escaped slashes not kept) a backend
  that decodes once, merges slashes and resolves dot segments, as nginx does, reads the
  very path the policies judged;
- a catch-all DENY policy (``rules: [{}]``) added to the set denies everything.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from nodeproxy.codec.request_target import (
    Refusal,
    TargetPolicy,
    check_target,
    normalize,
    remove_dot_segments,
)
from nodeproxy.config.model import AuthorizationPolicy
from nodeproxy.policy.authorization import (
    L7_CHECKED_UPSTREAM,
    Authorizer,
    ConnectionAttributes,
    Decision,
    DestinationWorkload,
    RequestAttributes,
)

MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
ACTIONS = ("KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD")

# What the recipe reading draws its strings from, beside raw ones.
WORDS = ["/admin", "/admin/*", "/public/*", "*", "/", "*.svc", "GET", "POST", "get",
         "10.0.0.0/8", "10.244.1.10", "::1/128", "fd00::/8", "8080", "80", "0", "65536",
         "spiffe://cluster.local/ns/shop/sa/web", "cluster.local/ns/shop/sa/*", "shop",
         "request.headers[x-token]", "request.headers[X-Token]", "source.ip",
         "source.namespace", "source.principal", "destination.port", "web.shop.svc",
         "web.shop.svc:*", "/public/..%2fadmin", "/%61dmin", "/a/../admin", "*admin",
         "a*b", "", " ", "\x00", "é", "%", "%2F", "%2e%2e", "..", "//admin"]
SOURCE_FIELDS = ["principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
                 "notIpBlocks"]
OPERATION_FIELDS = ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods",
                    "paths", "notPaths"]


class _Recipe:
    """Draws a document of the JSON input's shape from raw bytes."""

    def __init__(self, data: bytes) -> None:
        import atheris  # only this reading needs it

        self.fdp = atheris.FuzzedDataProvider(data)

    def word(self) -> str:
        if self.fdp.ConsumeBool():
            return self.fdp.PickValueInList(WORDS)
        return self.fdp.ConsumeUnicodeNoSurrogates(self.fdp.ConsumeIntInRange(0, 12))

    def words(self) -> list[str]:
        return [self.word() for _ in range(self.fdp.ConsumeIntInRange(0, 3))]

    def fields(self, names: list[str]) -> dict[str, Any]:
        return {self.fdp.PickValueInList(names): self.words()
                for _ in range(self.fdp.ConsumeIntInRange(0, 2))}

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {}
        if self.fdp.ConsumeBool():
            rule["from"] = [{"source": self.fields(SOURCE_FIELDS)}]
        if self.fdp.ConsumeBool():
            rule["to"] = [{"operation": self.fields(OPERATION_FIELDS)}]
        if self.fdp.ConsumeBool():
            key = "values" if self.fdp.ConsumeBool() else "notValues"
            rule["when"] = [{"key": self.word(), key: self.words()}]
        return rule

    def policy(self, i: int) -> dict[str, Any]:
        policy: dict[str, Any] = {
            "name": f"p{i}", "action": self.fdp.PickValueInList(["ALLOW", "DENY", "AUDIT"]),
            "rules": [self.rule() for _ in range(self.fdp.ConsumeIntInRange(0, 2))]}
        if self.fdp.ConsumeBool():
            policy["namespace"] = self.fdp.PickValueInList(["shop", "other", "Shop"])
        if self.fdp.ConsumeBool():
            policy["selector"] = {"app": self.fdp.PickValueInList(["web", "db"])}
        return policy

    def document(self) -> dict[str, Any]:
        return {
            "policies": [self.policy(i) for i in range(self.fdp.ConsumeIntInRange(1, 3))],
            "workload": {"namespace": "shop", "labels": {"app": "web"}},
            "connections": [{
                "principal": self.fdp.PickValueInList(
                    [None, "spiffe://cluster.local/ns/shop/sa/web", self.word()]),
                "namespace": self.fdp.PickValueInList([None, "shop", "other"]),
                "ip": self.fdp.PickValueInList(["10.244.1.10", "::ffff:10.0.0.1", "fd00::5"]),
                "port": self.fdp.ConsumeIntInRange(1, 65535)}],
            "requests": [{"method": self.word(), "path": self.word() + self.word(),
                          "host": self.word(), "headers": {"x-token": self.word()}}
                         for _ in range(self.fdp.ConsumeIntInRange(0, 3))],
        }


def _document(data: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return _Recipe(data).document()
    return doc if isinstance(doc, dict) else None


def _policies(raw: Any) -> list[AuthorizationPolicy]:
    valid = []
    for spec in raw if isinstance(raw, list) else []:
        try:
            valid.append(AuthorizationPolicy.model_validate(spec))
        except ValidationError:
            continue  # refused by validation: what `nodeproxy validate` reports
    return valid


def _connections(raw: Any) -> list[ConnectionAttributes]:
    out = []
    for c in raw if isinstance(raw, list) else []:
        try:
            ip = ipaddress.ip_address(c["ip"])
            port = int(c["port"])
        except (TypeError, KeyError, ValueError):
            continue
        principal, namespace = c.get("principal"), c.get("namespace")
        if not 0 < port < 65536 or not isinstance(principal, str | None) or \
                not isinstance(namespace, str | None):
            continue
        out.append(ConnectionAttributes(principal, namespace, ip, port))
    return out


def _requests(raw: Any) -> list[RequestAttributes]:
    out = []
    for r in raw if isinstance(raw, list) else []:
        if not isinstance(r, dict):
            continue
        method, path, host = r.get("method"), r.get("path"), r.get("host")
        headers = r.get("headers") or {}
        if not all(isinstance(v, str) for v in (method, path, host)) or not isinstance(
                headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            continue
        out.append(RequestAttributes(method, path, host, headers))
    return out


def _consistent(decision: Decision, authorizer: Authorizer, dest: DestinationWorkload) -> None:
    assert isinstance(decision, Decision) and isinstance(decision.allowed, bool)
    actions = {p.name: p.action for p in authorizer.applicable(dest)}
    if decision.action == "DENY":
        assert not decision.allowed, "a DENY decision that allows"
        assert actions.get(decision.policy) == "DENY", f"denied by {decision.policy!r}"
    elif decision.policy is not None:
        assert actions.get(decision.policy) == "ALLOW", f"decided by {decision.policy!r}"
        assert decision.allowed, "an ALLOW policy matched, yet denied"


def check(data: bytes) -> None:
    doc = _document(data)
    if doc is None:
        return
    policies = _policies(doc.get("policies"))
    workload = doc.get("workload") if isinstance(doc.get("workload"), dict) else {}
    namespace = workload.get("namespace") if isinstance(workload.get("namespace"), str) else "shop"
    labels = workload.get("labels") if isinstance(workload.get("labels"), dict) else {}
    labels = {k: v for k, v in labels.items() if isinstance(v, str)}
    dest = DestinationWorkload(namespace, labels)
    authorizer = Authorizer(policies)
    deny_all = Authorizer([*policies, AuthorizationPolicy.model_validate(
        {"name": "deny-all", "action": "DENY", "rules": [{}]})])
    requests = _requests(doc.get("requests"))
    for attrs in _connections(doc.get("connections")):
        for request in (None, L7_CHECKED_UPSTREAM, *requests):
            decision = authorizer.decide(dest, attrs, request)
            _consistent(decision, authorizer, dest)
            assert not deny_all.decide(dest, attrs, request).allowed, \
                "a catch-all DENY policy did not deny"
            if isinstance(request, RequestAttributes):
                _one_meaning(authorizer, dest, attrs, request)


def backend_view(path: str) -> str:
    """The path a backend such as nginx serves: escapes decoded once, slashes merged, dot
    segments resolved."""
    path = re.sub(r"/{2,}", "/", unquote(path, errors="surrogateescape"))
    return remove_dot_segments(path) if path.startswith("/") else path


def _one_meaning(authorizer: Authorizer, dest: DestinationWorkload,
                 attrs: ConnectionAttributes, request: RequestAttributes) -> None:
    try:
        check_target(request.method, request.path)
    except Refusal:
        return  # the codecs refuse it: nothing is decided
    for mode in MODES:
        for action in ACTIONS:
            policy = TargetPolicy(mode, action)  # type: ignore[arg-type]
            try:
                first = normalize(request.path, policy)
            except Refusal:
                continue
            check_target(request.method, first.target)  # what goes upstream is valid
            second = normalize(first.target, policy)
            assert (second.target, second.path) == (first.target, first.path), \
                f"{mode}/{action}: {request.path!r} normalizes to {first} then {second}"
            decided = [authorizer.decide(dest, attrs, RequestAttributes(
                request.method, n.target, request.host, request.headers)).allowed
                for n in (first, second)]
            assert decided[0] == decided[1], f"{mode}/{action}: {request.path!r}"
            if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES") and \
                    action != "KEEP_UNCHANGED":
                judged = unquote(first.path, errors="surrogateescape")
                assert backend_view(first.path) == judged, (
                    f"{mode}/{action}: policies judged {first.path!r}, a backend reads "
                    f"{backend_view(first.path)!r}")

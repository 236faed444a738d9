"""Hostile request targets and headers against real nginx behind L7 policies (issue 13,
items 2-4): the checked path is the forwarded path, HTTP/2 pseudo-headers are validated,
and a repeated header has one meaning for policy and backend.

Every variant goes from the attacker pod to all four guarded backends (tests/integration/
hostile.py: DENY ``/admin``, ``/admin/*``, ``x-role: blocked``; ALLOW only ``/public/*``
and ``/member/*`` with ``x-role: member``; same node and across nodes), over four client
/ upstream pairs: HTTP/1.1 as exact bytes to the HTTP/1.1 service, HTTP/2 (the ``h2``
library with its own checks off) to the HTTP/2 service, and each to the other's service
(the proxy translating).  The judge is nginx's own access log: ``violations(target)``
lists every request nginx acted on that the policy forbids, as nginx understood it.
Each request carries a ``probe=<n>`` query parameter, so a violation names its variant.

The default settings (``pathNormalization: MERGE_SLASHES``, escaped slashes refused) are
tested first; ``test_decode_and_merge_slashes`` and ``test_unescape_and_redirect`` then
reload the nodes with the other safe settings and run the escaped-slash variants again.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from nodeproxy_dev.testbed.nginx import GUARDED_BODIES
from tests.integration import hostile
from tests.integration.hostile import HostileMesh, Target, backend_log, violations
from tests.integration.observe import metric_sum

pytestmark = pytest.mark.privileged

PROTOCOL_ERROR = 0x1
OMIT = "<omit>"  # a pseudo-header value: leave the field out
REFUSED = "refused"  # 400 (HTTP/1.1), RST_STREAM PROTOCOL_ERROR or 400 (HTTP/2), or GOAWAY
DENIED = "denied"  # 403 from the proxy
SERVED = "served"  # 200 from nginx
REDIRECTED = "redirected"  # 307 from the proxy (UNESCAPE_AND_REDIRECT)
ANY = "any"  # the answer depends on the variant; only the judge's verdict counts


# One more DENY on the deny variant's backends: by host, what name-based virtual hosting
# acts on (nginx logs $host: lowercase, without port and trailing dot).
EVIL_HOST = "evil.test"
# And the same by a condition on the Host header (request.headers[host]: the authority).
EVIL_HOST_HEADER = "evil-header.test"
HOST_POLICY = {"name": "deny-evil-host", "namespace": "default",
               "selector": {"app": "deny-web"}, "action": "DENY",
               "rules": [{"to": [{"operation": {"hosts": [EVIL_HOST, f"{EVIL_HOST}:*"]}}]},
                         {"when": [{"key": "request.headers[host]",
                                    "values": [EVIL_HOST_HEADER, f"{EVIL_HOST_HEADER}:*"]}]}]}


@dataclass(frozen=True)
class Variant:
    """One hostile (or legitimate) request.  ``expect`` maps a policy variant ("deny",
    "allow") to the answer the attacker must get; ``protocols``: "h1", "h2" or both."""

    name: str
    path: str
    expect: dict[str, str]
    headers: tuple[tuple[str, str], ...] = ()
    protocols: tuple[str, ...] = ("h1", "h2")
    method: str = "GET"
    pseudo: tuple[tuple[str, str], ...] = ()  # HTTP/2: pseudo-header values replaced
    extra_pseudo: tuple[tuple[str, str], ...] = ()  # HTTP/2: more pseudo-header fields
    served_as: str | None = None  # nginx's logged request_uri (the forwarded target)


def both(answer: str) -> dict[str, str]:
    return {"deny": answer, "allow": answer}


def deny_only(answer: str, allow_answer: str) -> dict[str, str]:
    return {"deny": answer, "allow": allow_answer}


# Paths built to make a proxy and nginx disagree (nginx merges slashes, then resolves
# dot segments, and decodes every escape, %2F included, before it picks a location).
PATH_VARIANTS = [
    Variant("admin", "/admin", both(DENIED)),
    Variant("admin-sub", "/admin/x", both(DENIED)),
    Variant("dotdot", "/public/../admin", both(DENIED)),
    Variant("slash-dotdot", "/public//../admin", both(DENIED)),
    Variant("slash-dotdot-slash", "/public//..//admin/x", both(DENIED)),
    Variant("two-up", "/public/x//../../admin", both(DENIED)),
    Variant("leading-double-slash", "//admin", both(DENIED)),
    Variant("triple-slash", "///admin/x", both(DENIED)),
    Variant("dot", "/./admin", both(DENIED)),
    Variant("above-root", "/../admin", both(DENIED)),
    Variant("above-root-2", "/public/../../../admin/x", both(DENIED)),
    Variant("pct-dotdot", "/public/%2e%2e/admin", both(DENIED)),
    Variant("pct-dotdot-upper", "/public/%2E%2E/admin", both(DENIED)),
    Variant("half-pct-dotdot", "/public/.%2e/admin", both(DENIED)),
    Variant("half-pct-dotdot-2", "/public/%2e./admin", both(DENIED)),
    Variant("pct-letters", "/%61dmin", both(DENIED)),
    Variant("pct-all-letters", "/%61%64%6d%69%6e/x", both(DENIED)),
    Variant("pct-slash", "/public/..%2fadmin", both(REFUSED)),
    Variant("pct-slash-upper", "/public/..%2Fadmin", both(REFUSED)),
    Variant("pct-dotdot-slash", "/public/%2e%2e%2fadmin", both(REFUSED)),
    Variant("pct-slash-leading", "/%2fadmin", both(REFUSED)),
    Variant("pct-slash-inside", "/admin%2fx", both(REFUSED)),
    Variant("pct-slash-before-dots", "/public/%2f../admin", both(REFUSED)),
    Variant("pct-backslash", "/public/..%5cadmin", both(REFUSED)),
    Variant("pct-backslash-upper", "/public/..%5Cadmin", both(REFUSED)),
    Variant("backslash", "/public\\..\\admin", both(DENIED)),
    Variant("backslash-dotdot", "/public/..\\admin", both(DENIED)),
    Variant("nul", "/admin%00", both(REFUSED)),
    Variant("nul-segment", "/public/%00/../admin", both(REFUSED)),
    # one decoding pass: nginx too decodes once, so these stay under /public/
    Variant("double-encoded-dots", "/public/%252e%252e/admin", both(ANY)),
    Variant("double-encoded-slash", "/public/..%252fadmin", both(ANY)),
    Variant("overlong-utf8-dots", "/public/%c0%ae%c0%ae/admin", both(ANY)),
    Variant("overlong-utf8-slash", "/public/..%c0%afadmin", both(ANY)),
    # the application's own grammar: nginx takes these literally
    Variant("path-param", "/admin;x=1", both(ANY)),
    Variant("path-param-dotdot", "/public/..;/admin", both(ANY)),
    Variant("trailing-dot", "/admin.", both(ANY)),
    Variant("upper-case", "/ADMIN", both(ANY)),
    Variant("admin-dot-segment", "/admin/.", both(DENIED)),
    Variant("admin-dotdot-segment", "/admin/..", both(ANY)),
    Variant("query-dots", "/public/?/../admin", both(SERVED)),
    Variant("query-escaped", "/public/x?y=%2F..%2Fadmin", both(SERVED)),
    Variant("fragment", "/admin#x", both(REFUSED)),
    Variant("fragment-dots", "/public/#/../admin", both(REFUSED)),
    Variant("escape-malformed", "/admin%zz", both(REFUSED)),
    Variant("escape-truncated", "/public/%2", both(REFUSED)),
    Variant("absolute-form", "http://evil/admin", both(REFUSED)),
    Variant("absolute-form-dots", "http://x/public/../admin", both(REFUSED)),
    Variant("absolute-form-https", "https://x/admin", both(REFUSED)),
    Variant("no-leading-slash", "admin", both(REFUSED)),
    Variant("asterisk", "*", both(REFUSED)),
    Variant("space", "/public/ /../admin", both(REFUSED)),
    Variant("tab", "/public/\t/../admin", both(REFUSED)),
    Variant("non-ascii", "/public/\xe9/../../admin", both(REFUSED)),
]

# Repeated and odd header fields; the deny variant refuses x-role "blocked", the allow
# variant lets /member/* through only for x-role "member".
HEADER_VARIANTS = [
    Variant("role-blocked", "/public/a", deny_only(DENIED, SERVED),
            headers=(("x-role", "blocked"),)),
    Variant("role-blocked-then-ok", "/public/a", deny_only(SERVED, SERVED),
            headers=(("x-role", "blocked"), ("x-role", "ok"))),
    Variant("role-ok-then-blocked", "/public/a", deny_only(SERVED, SERVED),
            headers=(("x-role", "ok"), ("x-role", "blocked"))),
    Variant("role-blocked-twice", "/public/a", deny_only(SERVED, SERVED),
            headers=(("x-role", "blocked"), ("x-role", "blocked"))),
    Variant("role-member", "/member/a", deny_only(SERVED, SERVED),
            headers=(("x-role", "member"),)),
    Variant("role-admin-then-member", "/member/a", deny_only(SERVED, DENIED),
            headers=(("x-role", "admin"), ("x-role", "member"))),
    Variant("role-member-then-admin", "/member/a", deny_only(SERVED, DENIED),
            headers=(("x-role", "member"), ("x-role", "admin"))),
    Variant("role-empty-then-member", "/member/a", deny_only(SERVED, DENIED),
            headers=(("x-role", ""), ("x-role", "member"))),
    Variant("role-member-comma", "/member/a", deny_only(SERVED, DENIED),
            headers=(("x-role", "member,admin"),)),
    Variant("role-upper-name", "/public/a", deny_only(DENIED, SERVED),
            headers=(("X-ROLE", "blocked"),), protocols=("h1",)),
    Variant("role-padded", "/public/a", deny_only(DENIED, SERVED),
            headers=(("x-role", "  blocked  "),), protocols=("h1",)),
    Variant("role-no-member", "/member/a", deny_only(SERVED, DENIED)),
    Variant("authorization-twice", "/public/a", both(REFUSED),
            headers=(("authorization", "Bearer a"), ("authorization", "Bearer b"))),
    Variant("content-type-twice", "/public/a", both(REFUSED),
            headers=(("content-type", "text/plain"), ("content-type", "text/html"))),
    Variant("x-request-id-twice", "/public/a", both(REFUSED),
            headers=(("x-request-id", "a"), ("x-request-id", "b"))),
    Variant("host-evil", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST),)),
    Variant("host-evil-upper", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", "EVIL.Test"),)),
    Variant("host-evil-port", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST + ":8080"),)),
    Variant("host-evil-dot", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST + "."),)),
    Variant("host-evil-dot-port", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST + ".:80"),)),
    Variant("host-evil-dots", "/public/a", deny_only(ANY, ANY),
            headers=(("@host", EVIL_HOST + ".."),)),
    Variant("h2-host-without-authority", "/public/a", deny_only(DENIED, SERVED),
            protocols=("h2",), pseudo=((":authority", OMIT),),
            headers=(("host", EVIL_HOST + "."),)),
    Variant("host-header-evil", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST_HEADER),)),
    Variant("host-header-evil-port", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST_HEADER + ":8080"),)),
    Variant("host-header-evil-dot", "/public/a", deny_only(DENIED, SERVED),
            headers=(("@host", EVIL_HOST_HEADER + "."),)),
    Variant("host-twice", "/admin", both(REFUSED), headers=(("host", "other"),),
            protocols=("h1",)),
    Variant("host-userinfo", "/admin", both(REFUSED), protocols=("h1",),
            headers=(("@host", "x@evil"),)),
]

# HTTP/2 only: pseudo-headers RFC 9113 8.3 forbids.
PSEUDO_VARIANTS = [
    Variant("h2-method-with-space", "/public/a", both(REFUSED), protocols=("h2",),
            pseudo=((":method", "GET /admin"),)),
    Variant("h2-method-with-path", "/public/a", both(REFUSED), protocols=("h2",),
            pseudo=((":method", "GET /admin HTTP/1.1\r\nx:"),)),
    Variant("h2-path-request-line", "/public/a HTTP/1.1\r\nx: y", both(REFUSED),
            protocols=("h2",)),
    Variant("h2-path-space-version", "/admin HTTP/1.0", both(REFUSED), protocols=("h2",)),
    Variant("h2-scheme", "/admin", both(REFUSED), protocols=("h2",),
            pseudo=((":scheme", "ftp"),)),
    Variant("h2-scheme-url", "/public/a", both(REFUSED), protocols=("h2",),
            pseudo=((":scheme", "http://x/admin"),)),
    Variant("h2-authority-userinfo", "/admin", both(REFUSED), protocols=("h2",),
            pseudo=((":authority", "x@evil"),)),
    Variant("h2-authority-path", "/public/a", both(REFUSED), protocols=("h2",),
            pseudo=((":authority", "x/admin"),)),
    Variant("h2-authority-vs-host", "/admin", both(REFUSED), protocols=("h2",),
            headers=(("host", "other"),)),
    Variant("h2-path-twice", "/public/a", both(REFUSED), protocols=("h2",),
            extra_pseudo=((":path", "/admin"),)),
    Variant("h2-pseudo-after-regular", "/public/a", both(REFUSED), protocols=("h2",),
            headers=((":path", "/admin"),)),
    Variant("h2-unknown-pseudo", "/public/a", both(REFUSED), protocols=("h2",),
            extra_pseudo=((":real-path", "/admin"),)),
    Variant("h2-uppercase-name", "/public/a", both(REFUSED), protocols=("h2",),
            headers=(("X-Role", "blocked"),)),
    Variant("h2-connection-header", "/admin", both(REFUSED), protocols=("h2",),
            headers=(("connection", "close"),)),
    Variant("h2-empty-path", "", both(REFUSED), protocols=("h2",)),
]

# Legitimate requests: they must keep working, and nginx must log the normalized target.
LEGIT_VARIANTS = [
    Variant("public", "/public/", both(SERVED), served_as="/public/"),
    Variant("public-dots", "/public/./a/../b", both(SERVED), served_as="/public/b"),
    Variant("public-slashes", "/public//x///y", both(SERVED), served_as="/public/x/y"),
    Variant("public-escapes", "/public/%7euser/%41", both(SERVED),
            served_as="/public/~user/A"),
    Variant("public-via-other", "/other/../public/z", both(SERVED), served_as="/public/z"),
    Variant("public-query", "/public/q?x=/../admin&y=%2F", both(SERVED),
            served_as="/public/q?x=/../admin&y=%2F"),
    Variant("member", "/member/m", deny_only(SERVED, SERVED), served_as="/member/m",
            headers=(("x-role", "member"),)),
    Variant("public-list-header", "/public/l", both(SERVED), served_as="/public/l",
            headers=(("accept", "text/plain"), ("accept", "text/html"))),
]

ALL_VARIANTS = [*PATH_VARIANTS, *HEADER_VARIANTS, *PSEUDO_VARIANTS, *LEGIT_VARIANTS]
# (client protocol, service kind): the proxy speaks the service's protocol upstream
PAIRS = [("h1", "h1"), ("h2", "h2"), ("h2", "h1"), ("h1", "h2")]
_probe = itertools.count(1)


# These tests send hundreds of requests, each on a new connection, from the attacker pod
# at the machine's speed: its new-connection rate cap (a defence of its own, proven in
# test_hostile_limits.py) would refuse some of them, and what is judged here is what a
# request means, not how many a pod may open.
UNCAPPED = {"perPod": {"connectionsPerSecond": 1_000_000, "connectionBurst": 1_000_000}}


@pytest.fixture(scope="module")
def mesh() -> Iterator[HostileMesh]:
    yield from hostile.hostile_mesh({"authorizationPolicies": [HOST_POLICY],
                                     "limits": UNCAPPED})


def host_violations(target: Target) -> list[dict[str, Any]]:
    if target.variant != "deny":
        return []
    return [e for d in (target.h1_dir, target.h2_dir) for e in backend_log(d)
            if e.get("host") in (EVIL_HOST, EVIL_HOST_HEADER)]


def with_probe(path: str, probe: int) -> str:
    if path in ("", "*") or "#" in path or "\r" in path or " HTTP/" in path:
        return path
    return f"{path}{'&' if '?' in path else '?'}probe={probe}"


def h1_bytes(v: Variant, path: str, authority: str) -> bytes:
    host = authority
    extra = []
    for name, value in v.headers:
        if name == "@host":
            host = value
        else:
            extra.append(f"{name}: {value}\r\n")
    head = f"{v.method} {path} HTTP/1.1\r\nHost: {host}\r\n{''.join(extra)}\r\n"
    return head.encode("latin-1")


def h2_fields(v: Variant, path: str, authority: str) -> list[tuple[str, str]]:
    """The header block as sent: the four pseudo-headers (``pseudo`` replaces their
    values), ``extra_pseudo`` after them, then the regular fields."""
    hosts = [value for name, value in v.headers if name == "@host"]
    pseudo = {":method": v.method, ":scheme": "http",
              ":authority": hosts[0] if hosts else authority, ":path": path,
              **dict(v.pseudo)}
    regular = [(n, val) for n, val in v.headers if n != "@host"]
    return [*((n, val) for n, val in pseudo.items() if val != OMIT), *v.extra_pseudo,
            *regular]


@dataclass
class Sent:
    variant: Variant
    target: Target
    client: str
    service: str
    probe: int
    result: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.variant.name} {self.client}->{self.service} {self.target.name}"

    def outcome(self) -> tuple[str, str]:
        """(kind of answer, what came back) for the assertion message."""
        r = self.result
        if self.client == "h1":
            received: bytes = bytes.fromhex(r["received_hex"])
            status = received[9:12].decode("latin-1") if received.startswith(b"HTTP/") \
                else ""
            body = received.partition(b"\r\n\r\n")[2]
            kind = {"400": REFUSED, "403": DENIED, "200": SERVED,
                    "307": REDIRECTED}.get(status, status)
            if not received and (r["closed_by_peer"] or r["reset"]):
                kind = REFUSED  # closed without an answer: nothing was served
            return kind, received[:200].decode("latin-1")
        body = bytes.fromhex(r["body_hex"])
        if r["reset"] == PROTOCOL_ERROR or r["goaway"] == PROTOCOL_ERROR:
            return REFUSED, f"reset={r['reset']} goaway={r['goaway']}"
        kind = {400: REFUSED, 403: DENIED, 200: SERVED,
                307: REDIRECTED}.get(r["status"], str(r["status"]))
        return kind, f"{r['status']} {body[:100]!r} {r['error'] or ''}"

    @property
    def body(self) -> bytes:
        if self.client == "h1":
            return bytes.fromhex(self.result["received_hex"]).partition(b"\r\n\r\n")[2]
        return bytes.fromhex(self.result["body_hex"])


def send(mesh: HostileMesh, variants: Sequence[Variant], pairs: Sequence[tuple[str, str]]
         ) -> list[Sent]:
    """Every variant to every target over every pair, in one batch from the attacker pod."""
    plan: list[tuple[Variant, Target, str, str, int]] = []
    requests: list[dict[str, Any]] = []
    for v, target, (client, service) in itertools.product(
            variants, mesh.targets.values(), pairs):
        if client not in v.protocols:
            continue
        probe = next(_probe)
        name = target.h1_service if service == "h1" else target.h2_service
        vip = mesh.vip(name)
        path = with_probe(v.path, probe)
        authority = f"{name}.default.svc.cluster.local"
        if client == "h1":
            requests.append({"kind": "h1", "host": vip, "port": 80,
                             "data_hex": h1_bytes(v, path, authority).hex()})
        else:
            requests.append({"kind": "h2", "host": vip, "port": 80,
                             "headers": h2_fields(v, path, authority)})
        plan.append((v, target, client, service, probe))
    batch = os.path.join(mesh.cluster.dir, f"batch-{plan[0][4]}.json")
    with open(batch, "w") as f:
        json.dump(requests, f)
    out = mesh.cluster.run_in_pod(
        hostile.ATTACKER, [sys.executable, "-m", "nodeproxy_dev.testbed.raw_batch", batch,
                           "--seconds", "5"], timeout=600, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return [Sent(v, t, c, s, p, r) for (v, t, c, s, p), r in zip(plan, results, strict=True)]


def logged(target: Target) -> dict[int, dict[str, Any]]:
    """nginx's log entries of a target, by probe number."""
    entries: dict[int, dict[str, Any]] = {}
    for directory in (target.h1_dir, target.h2_dir):
        for entry in backend_log(directory):
            uri = str(entry.get("request_uri", ""))
            if "probe=" in uri:
                entries[int(uri.rsplit("probe=", 1)[1].split("&")[0])] = entry
    return entries


def check(mesh: HostileMesh, sent: list[Sent]) -> None:
    """The judge first (nothing forbidden reached nginx), then each answer."""
    by_probe = {s.probe: s for s in sent}
    for target in mesh.targets.values():
        bad = violations(target) + host_violations(target)
        named = [(by_probe[p].label if p in by_probe else "?", e)
                 for p, e in logged(target).items() if e in bad]
        assert bad == [], f"nginx acted on requests the policy forbids: {named or bad}"
    wrong = []
    for s in sent:
        expected = s.variant.expect[s.target.variant]
        kind, seen = s.outcome()
        if expected != ANY and kind != expected:
            wrong.append(f"{s.label}: expected {expected}, got {kind}: {seen}")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize(("client", "service"), PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_hostile_paths_never_reach_a_forbidden_location(mesh: HostileMesh, client: str,
                                                        service: str) -> None:
    check(mesh, send(mesh, PATH_VARIANTS, [(client, service)]))


@pytest.mark.parametrize(("client", "service"), PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_repeated_headers_have_one_meaning(mesh: HostileMesh, client: str,
                                           service: str) -> None:
    sent = send(mesh, HEADER_VARIANTS, [(client, service)])
    check(mesh, sent)
    # What the policy judged is what nginx got: the joined value, once.
    for s in sent:
        entry = logged(s.target).get(s.probe)
        if s.variant.name == "role-blocked-then-ok" and entry is not None:
            assert entry["x_role"] == "blocked, ok", (s.label, entry)


@pytest.mark.parametrize("service", ["h2", "h1"])
def test_malformed_http2_pseudo_headers_are_refused(mesh: HostileMesh, service: str) -> None:
    sent = send(mesh, PSEUDO_VARIANTS, [("h2", service)])
    check(mesh, sent)
    for s in sent:
        assert logged(s.target).get(s.probe) is None, s.label


@pytest.mark.parametrize(("client", "service"), PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_legitimate_requests_reach_nginx_normalized(mesh: HostileMesh, client: str,
                                                    service: str) -> None:
    sent = send(mesh, LEGIT_VARIANTS, [(client, service)])
    check(mesh, sent)
    for s in sent:
        expected = s.variant.expect[s.target.variant]
        if expected != SERVED:
            continue
        entry = logged(s.target).get(s.probe)
        assert entry is not None, f"{s.label}: nginx never saw it"
        assert entry["request_uri"] == with_probe(s.variant.served_as or "", s.probe), \
            (s.label, entry)
        area = "member" if s.variant.path.startswith("/member") else "public"
        assert s.body.startswith(GUARDED_BODIES[area].encode()), (s.label, s.body[:100])


def test_refusals_are_counted_by_reason(mesh: HostileMesh) -> None:
    before = mesh.cluster.metrics("node0")
    chosen = {"pct-slash", "nul", "absolute-form", "fragment"}
    sent = send(mesh, [v for v in PATH_VARIANTS if v.name in chosen]
                + [v for v in PSEUDO_VARIANTS if v.name == "h2-scheme"]
                + [v for v in HEADER_VARIANTS if v.name == "authorization-twice"],
                [("h1", "h1"), ("h2", "h2")])
    check(mesh, sent)
    after = mesh.cluster.metrics("node0")

    def delta(protocol: str, reason: str) -> float:
        labels = {"protocol": protocol, "reason": reason}
        return metric_sum(after, "nodeproxy_http_bad_requests_total", **labels) - \
            metric_sum(before, "nodeproxy_http_bad_requests_total", **labels)

    targets = len(mesh.targets)
    for protocol in ("http/1.1", "http/2"):
        assert delta(protocol, "escaped_slash") == targets
        assert delta(protocol, "nul") == targets
        assert delta(protocol, "absolute_form") == targets
        assert delta(protocol, "fragment") == targets
        assert delta(protocol, "repeated_authorization") == targets
    assert delta("http/2", "bad_scheme") == targets


def reconfigure(mesh: HostileMesh, settings: dict[str, Any]) -> None:
    """Reload both nodes with the fixture's configuration and these `http` settings."""
    c = mesh.cluster
    c.write_configs(overrides={
        "http": {"accessLog": {"path": os.path.join(c.dir, "access.log")}, **settings},
        "limits": UNCAPPED, "authorizationPolicies": [*hostile.POLICIES, HOST_POLICY]})
    c.reload_daemons()


ESCAPED_SLASH_VARIANTS = [v for v in PATH_VARIANTS if v.name.startswith(
    ("pct-slash", "pct-backslash", "pct-dotdot-slash"))]


def test_decode_and_merge_slashes(mesh: HostileMesh) -> None:
    """The other safe setting: escaped slashes decoded, then judged and forwarded."""
    reconfigure(mesh, {"pathNormalization": "DECODE_AND_MERGE_SLASHES"})
    try:
        escaped = [Variant(v.name, v.path, both(DENIED)) for v in ESCAPED_SLASH_VARIANTS]
        legit = Variant("public-escaped-slash", "/public/a%2Fb", both(SERVED),
                        served_as="/public/a/b")
        sent = send(mesh, [*escaped, legit], PAIRS)
        check(mesh, sent)
        for s in sent:
            if s.variant is legit:
                entry = logged(s.target).get(s.probe)
                assert entry is not None and \
                    entry["request_uri"] == with_probe("/public/a/b", s.probe), s.label
    finally:
        reconfigure(mesh, {})


def test_unescape_and_redirect(mesh: HostileMesh) -> None:
    """307 to the decoded path; nothing reaches nginx until the client asks again."""
    reconfigure(mesh, {"escapedSlashesAction": "UNESCAPE_AND_REDIRECT"})
    try:
        variants = [Variant(v.name, v.path, both(REDIRECTED)) for v in ESCAPED_SLASH_VARIANTS]
        legit = Variant("public-escaped-slash", "/public/a%2Fb", both(REDIRECTED))
        sent = send(mesh, [*variants, legit], [("h1", "h1"), ("h2", "h2")])
        check(mesh, sent)
        for s in sent:
            assert logged(s.target).get(s.probe) is None, s.label
            if s.variant is legit and s.client == "h1":
                head = bytes.fromhex(s.result["received_hex"]).partition(b"\r\n\r\n")[0]
                assert f"location: /public/a/b?probe={s.probe}".encode() in head, head
    finally:
        reconfigure(mesh, {})

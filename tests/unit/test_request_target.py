"""One request, one meaning: target validation and normalization (request_target.py),
one value per header name (header_fields.py), and their settings in the node YAML.

The normalization tables are hand-written: every Istio mode and every Envoy escaped-slash
action against inputs built to make a proxy and a backend disagree."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nodeproxy.codec.header_fields import SINGLETONS, joined_value, one_view
from nodeproxy.codec.request_target import (
    ESCAPED_SLASH_ACTIONS,
    MODES,
    Refusal,
    TargetPolicy,
    check_authority,
    check_method,
    check_target,
    normalize,
    normalize_authority,
    path_of,
)
from nodeproxy.config.model import HttpSettings

NONE, BASE, MERGE, DECODE = MODES

# input -> the forwarded target under NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES
# (no escaped slash in these: every action gives the same)
BY_MODE: dict[str, tuple[str, str, str, str]] = {
    "/": ("/", "/", "/", "/"),
    "/a/b": ("/a/b", "/a/b", "/a/b", "/a/b"),
    "/a//b": ("/a//b", "/a//b", "/a/b", "/a/b"),
    "//admin": ("//admin", "//admin", "/admin", "/admin"),
    "/a///b//": ("/a///b//", "/a///b//", "/a/b/", "/a/b/"),
    "/./a/./b": ("/./a/./b", "/a/b", "/a/b", "/a/b"),
    "/../../etc/passwd": ("/../../etc/passwd", "/etc/passwd", "/etc/passwd", "/etc/passwd"),
    "/a/b/../../../c": ("/a/b/../../../c", "/c", "/c", "/c"),
    "/admin/..": ("/admin/..", "/", "/", "/"),
    "/admin/.": ("/admin/.", "/admin/", "/admin/", "/admin/"),
    # merged before dots are resolved, as nginx reads it; BASE resolves RFC 3986's way
    "/public//../admin": ("/public//../admin", "/public/admin", "/admin", "/admin"),
    "/%2e%2e/admin": ("/%2e%2e/admin", "/admin", "/admin", "/admin"),
    "/public/%2E%2E/admin": ("/public/%2E%2E/admin", "/admin", "/admin", "/admin"),
    "/public/.%2e/admin": ("/public/.%2e/admin", "/admin", "/admin", "/admin"),
    "/%61dmin": ("/%61dmin", "/admin", "/admin", "/admin"),
    "/%7euser/%41": ("/%7euser/%41", "/~user/A", "/~user/A", "/~user/A"),
    # backslash is a slash from BASE on (Envoy's normalize_path does the same)
    "/public\\..\\admin": ("/public\\..\\admin", "/admin", "/admin", "/admin"),
    "/public/..\\admin": ("/public/..\\admin", "/admin", "/admin", "/admin"),
    # one decoding pass only: %25 stays, so %252e is never a dot
    "/a%25": ("/a%25", "/a%25", "/a%25", "/a%25"),
    "/%252e%252e/admin": ("/%252e%252e/admin",) + ("/%252e%252e/admin",) * 3,
    "/%252F": ("/%252F",) * 4,
    # other escapes are kept, upper-cased: an overlong UTF-8 dot is not a dot
    "/%c0%ae%c0%ae/admin": ("/%c0%ae%c0%ae/admin",) + ("/%C0%AE%C0%AE/admin",) * 3,
    "/%e2%80%a5/admin": ("/%e2%80%a5/admin",) + ("/%E2%80%A5/admin",) * 3,
    # path parameters and trailing dots are the application's business
    "/admin;x=1": ("/admin;x=1",) * 4,
    "/public/..;/admin": ("/public/..;/admin",) * 4,
    "/admin.": ("/admin.",) * 4,
    "/admin..": ("/admin..",) * 4,
    # the query string is passed on untouched and never normalized
    "/a/..?x=/../admin": ("/a/..?x=/../admin",) + ("/?x=/../admin",) * 3,
    "/p?x=%2F&y=%00": ("/p?x=%2F&y=%00",) * 4,
    "/p?": ("/p?",) * 4,
    "*": ("*",) * 4,
}


@pytest.mark.parametrize("action", ESCAPED_SLASH_ACTIONS)
@pytest.mark.parametrize("target", sorted(BY_MODE))
def test_normalization_by_mode(target: str, action: str) -> None:
    for mode, expected in zip(MODES, BY_MODE[target], strict=True):
        result = normalize(target, TargetPolicy(mode, action))  # type: ignore[arg-type]
        assert (result.target, result.redirect) == (expected, False), (mode, action)
        assert result.path == path_of(expected)


# Escaped slashes: the action decides first, then the mode.  "!": refused (400).
# Columns: actions KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_REDIRECT, UNESCAPE_AND_FORWARD
ESCAPED: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "/public/..%2fadmin": {
        NONE: ("/public/..%2fadmin", "!", "/public/../admin", "/public/../admin"),
        BASE: ("/public/..%2Fadmin", "!", "/admin", "/admin"),
        MERGE: ("/public/..%2Fadmin", "!", "/admin", "/admin"),
        DECODE: ("/public/..%2Fadmin", "!", "/admin", "/admin"),
    },
    "/public/..%5Cadmin": {
        NONE: ("/public/..%5Cadmin", "!", "/public/..\\admin", "/public/..\\admin"),
        BASE: ("/public/..%5Cadmin", "!", "/admin", "/admin"),
        MERGE: ("/public/..%5Cadmin", "!", "/admin", "/admin"),
        DECODE: ("/public/..%5Cadmin", "!", "/admin", "/admin"),
    },
    "/a%2Fb": {mode: ("/a%2Fb", "!", "/a/b", "/a/b") for mode in MODES},
    "/a%2f%2fb%5c%5Cc": {
        NONE: ("/a%2f%2fb%5c%5Cc", "!", "/a//b\\\\c", "/a//b\\\\c"),
        BASE: ("/a%2F%2Fb%5C%5Cc", "!", "/a//b//c", "/a//b//c"),
        MERGE: ("/a%2F%2Fb%5C%5Cc", "!", "/a/b/c", "/a/b/c"),
        DECODE: ("/a%2F%2Fb%5C%5Cc", "!", "/a/b/c", "/a/b/c"),
    },
    "/public/%2e%2e%2fadmin?q=1": {
        NONE: ("/public/%2e%2e%2fadmin?q=1", "!", "/public/%2e%2e/admin?q=1",
               "/public/%2e%2e/admin?q=1"),
        BASE: ("/public/..%2Fadmin?q=1", "!", "/admin?q=1", "/admin?q=1"),
        MERGE: ("/public/..%2Fadmin?q=1", "!", "/admin?q=1", "/admin?q=1"),
        DECODE: ("/public/..%2Fadmin?q=1", "!", "/admin?q=1", "/admin?q=1"),
    },
}


@pytest.mark.parametrize("target", sorted(ESCAPED))
def test_escaped_slashes_by_mode_and_action(target: str) -> None:
    for mode in MODES:
        for action, expected in zip(ESCAPED_SLASH_ACTIONS, ESCAPED[target][mode], strict=True):
            policy = TargetPolicy(mode, action)  # type: ignore[arg-type]
            if expected == "!":
                with pytest.raises(Refusal) as refused:
                    normalize(target, policy)
                assert refused.value.reason == "escaped_slash"
                continue
            result = normalize(target, policy)
            assert result.target == expected, (mode, action)
            assert result.redirect == (action == "UNESCAPE_AND_REDIRECT"), (mode, action)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("action", ESCAPED_SLASH_ACTIONS)
@pytest.mark.parametrize("target", ["/%00", "/a%00b", "/public/%00/../admin"])
def test_nul_is_refused_in_every_mode(target: str, mode: str, action: str) -> None:
    with pytest.raises(Refusal) as refused:
        normalize(target, TargetPolicy(mode, action))  # type: ignore[arg-type]
    assert refused.value.reason == "nul"


def test_normalizing_twice_changes_nothing() -> None:
    """What is forwarded is a fixed point: a second proxy (or a retry) sees the same."""
    for target in [*BY_MODE, *ESCAPED]:
        for mode in MODES:
            for action in ("KEEP_UNCHANGED", "UNESCAPE_AND_FORWARD"):
                policy = TargetPolicy(mode, action)  # type: ignore[arg-type]
                once = normalize(target, policy).target
                if mode != "NONE":
                    assert normalize(once, policy).target == once, (target, mode, action)


def test_the_default_is_merge_slashes_and_reject() -> None:
    assert TargetPolicy.of(HttpSettings()) == TargetPolicy("MERGE_SLASHES", "REJECT_REQUEST")
    assert TargetPolicy() == TargetPolicy.of(HttpSettings())


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "target", "reason"), [
    ("GET", "http://x/admin", "absolute_form"),
    ("GET", "https://x", "absolute_form"),
    ("GET", "HTTP://x/admin", "absolute_form"),
    ("GET", "x/admin", "bad_target"),
    ("GET", "admin", "bad_target"),
    ("GET", ".", "bad_target"),
    ("GET", "", "empty_target"),
    ("GET", "*", "asterisk_form"),
    ("DELETE", "*", "asterisk_form"),
    ("GET", "/a b", "bad_target_char"),
    ("GET", "/a\tb", "bad_target_char"),
    ("GET", "/a\r\nX: y", "bad_target_char"),
    ("GET", "/a\x00", "bad_target_char"),
    ("GET", "/a\x7f", "bad_target_char"),
    ("GET", "/caf\xe9", "bad_target_char"),
    ("GET", "/a#frag", "fragment"),
    ("GET", "/a?b#frag", "fragment"),
    ("GET", "/a%zz", "bad_escape"),
    ("GET", "/a%2", "bad_escape"),
    ("GET", "/a%", "bad_escape"),
    ("GET", "/a?x=%g1", "bad_escape"),
    ("CONNECT", "x:443", "connect"),
])
def test_malformed_targets_are_refused(method: str, target: str, reason: str) -> None:
    with pytest.raises(Refusal) as refused:
        check_target(method, target)
    assert refused.value.reason == reason


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/"), ("GET", "//x"), ("OPTIONS", "*"), ("OPTIONS", "/x"),
    ("GET", "/a;b=c/%2F?x=y&z=/../"), ("GET", "/~!$&'()*+,;=:@-._"), ("GET", "/a\\b"),
    ("GET", "/a|b{c}^`\"<>"),
])
def test_origin_form_targets_pass(method: str, target: str) -> None:
    check_target(method, target)


@pytest.mark.parametrize("method", ["GET", "PATCH", "M-SEARCH", "X_CUSTOM!"])
def test_token_methods_pass(method: str) -> None:
    check_method(method)


@pytest.mark.parametrize("method", ["", "GET /admin", "GET\t", "G(ET)", "GÉT", "GET\r\n"])
def test_methods_that_are_not_tokens_are_refused(method: str) -> None:
    with pytest.raises(Refusal) as refused:
        check_method(method)
    assert refused.value.reason == "bad_method"


@pytest.mark.parametrize("authority", [
    "", "web", "web.shop.svc.cluster.local", "web:8080", "10.0.0.1:80", "[fd00::1]:80",
    "[fd00::1]", "xn--bcher-kva.example"])
def test_authorities_pass(authority: str) -> None:
    check_authority(authority)


@pytest.mark.parametrize("authority", [
    "user@web", "user:pw@web:80", "web/admin", "web?x", "web#x", "web 80", "web:80:90",
    "[fd00::1", "web\r\nx: y", "web:8o"])
def test_malformed_authorities_are_refused(authority: str) -> None:
    with pytest.raises(Refusal) as refused:
        check_authority(authority)
    assert refused.value.reason == "bad_authority"


# --- header fields ---------------------------------------------------------------------------

def test_unrepeated_headers_are_returned_as_they_are() -> None:
    headers = [("a", "1"), ("b", "2")]
    assert one_view(headers) is headers


def test_list_valued_and_unknown_headers_are_joined_in_order() -> None:
    headers = [("accept", "a/b"), ("x-role", "member"), ("x-forwarded-for", "1.1.1.1"),
               ("accept", "c/d"), ("x-role", "blocked"), ("x-forwarded-for", "2.2.2.2"),
               ("cookie", "a=1"), ("cookie", "b=2"), ("x-empty", ""), ("x-empty", "")]
    assert one_view(headers) == [
        ("accept", "a/b, c/d"), ("x-role", "member, blocked"),
        ("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("cookie", "a=1; b=2"), ("x-empty", ", ")]


def test_the_value_policies_read_is_the_value_one_view_forwards() -> None:
    """joined_value (what authorization reads of a head) equals the one line one_view
    keeps for that name, for every name of heads with lists, cookies and repeats; absent
    names read None."""
    import random
    rng = random.Random(7)
    names = ["accept", "cookie", "x-tenant", "x-Tenant", "via", "te"]
    for _ in range(500):
        head = [(rng.choice(names), rng.choice(["a", "b", "", " c", "a, b"]))
                for _ in range(rng.randrange(0, 6))]
        viewed = dict(one_view(head))
        for name in {*names, "absent"}:
            assert joined_value(head, name) == viewed.get(name), (head, name)


@pytest.mark.parametrize("name", sorted(SINGLETONS))
def test_repeated_singletons_are_refused(name: str) -> None:
    with pytest.raises(Refusal) as refused:
        one_view([(name, "a"), ("other", "x"), (name, "a")])
    assert refused.value.reason == "repeated_" + name.replace("-", "_")


def test_content_length_lines_must_agree() -> None:
    assert one_view([("content-length", "5"), ("content-length", "5")]) == \
        [("content-length", "5")]
    with pytest.raises(Refusal) as refused:
        one_view([("content-length", "5"), ("content-length", "6")])
    assert refused.value.reason == "content_length_mismatch"


def test_refusal_reasons_are_a_closed_set() -> None:
    """The reason is a metric label: it never quotes the request."""
    with pytest.raises(Refusal) as refused:
        check_target("GET", "/" + "%zz" * 100)
    assert refused.value.reason == "bad_escape"
    with pytest.raises(Refusal) as refused:
        one_view([("authorization", "x" * 100), ("authorization", "y")])
    assert refused.value.reason == "repeated_authorization"


# --- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "in_effect"), [
    ("NONE", "KEEP_UNCHANGED"), ("BASE", "REJECT_REQUEST"),
    ("MERGE_SLASHES", "REJECT_REQUEST"), ("DECODE_AND_MERGE_SLASHES", "UNESCAPE_AND_FORWARD")])
def test_the_escaped_slash_action_follows_the_mode_unless_set(mode: str, in_effect: str) -> None:
    settings = HttpSettings.model_validate({"pathNormalization": mode})
    assert settings.escaped_slashes_in_effect == in_effect
    explicit = HttpSettings.model_validate(
        {"pathNormalization": mode, "escapedSlashesAction": "UNESCAPE_AND_REDIRECT"})
    assert TargetPolicy.of(explicit) == TargetPolicy(mode, "UNESCAPE_AND_REDIRECT")  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ["KEEP_UNCHANGED", "REJECT_REQUEST"])
def test_decode_mode_refuses_an_action_that_contradicts_it(action: str) -> None:
    with pytest.raises(ValidationError, match="contradicts"):
        HttpSettings.model_validate(
            {"pathNormalization": "DECODE_AND_MERGE_SLASHES", "escapedSlashesAction": action})


@pytest.mark.parametrize("value", [{"pathNormalization": "merge_slashes"},
                                   {"pathNormalization": "ALL"},
                                   {"escapedSlashesAction": "KEEP"}])
def test_unknown_values_are_refused(value: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        HttpSettings.model_validate(value)


@pytest.mark.parametrize(("authority", "normalized"), [
    ("web", "web"), ("web.", "web"), ("web.:80", "web:80"), ("Web.Shop.:8080", "Web.Shop:8080"),
    ("web..", "web"), ("10.0.0.1.:80", "10.0.0.1:80"), ("[fd00::1]", "[fd00::1]"),
    ("[fd00::1]:80", "[fd00::1]:80"), (".", "."), ("", ""), (":80", ":80")])
def test_authority_loses_its_trailing_dot(authority: str, normalized: str) -> None:
    assert normalize_authority(authority) == normalized


# --- routing and policy see the same request ------------------------------------------------

def test_routes_and_policies_see_the_same_header_value_and_path() -> None:
    """What _one_meaning does to a head (one_view, normalize) is all either ever sees:
    a route on x-role "ok" and a DENY on x-role "blocked" agree on "blocked, ok"."""
    from nodeproxy.codec.message import RequestHead
    from nodeproxy.config.loader import parse_config
    from nodeproxy.http.routes import Routes
    from nodeproxy.policy.authorization import RequestAttributes
    from tests.unit.test_config import HEAD
    from tests.unit.test_http_routes import SERVICES

    text = HEAD + SERVICES + """\
httpRoutes:
  - name: r
    service: web
    rules:
      - matches: [{path: {value: /admin}, headers: [{name: x-role, value: "blocked, ok"}]}]
        backendRefs: [{name: v2}]
      - matches: [{path: {value: /admin}, headers: [{name: x-role, value: ok}]}]
        backendRefs: [{name: plain}]
"""
    table = Routes(parse_config(text, "node.yaml").config).table("default/web", 80)
    head = RequestHead("GET", "/public//../admin?x=1", "web",
                       [("x-role", "blocked"), ("x-role", "ok")])
    head.headers = one_view(head.headers)
    head.path = normalize(head.path, TargetPolicy()).target
    rule = table.match(head)
    assert rule is not None and rule.backends[0].service == "default/v2"
    attributes = RequestAttributes(head.method, head.path, head.authority, dict(head.headers))
    assert attributes.header("x-role") == "blocked, ok" == head.header("x-role")
    assert path_of(attributes.path) == "/admin"

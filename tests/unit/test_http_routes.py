"""Route tables: Gateway API precedence and matching, weighted choice, header filters,
and protocol detection from first bytes."""

from __future__ import annotations

import pytest

from nodeproxy.codec.detect import H2_PREFACE, PortMode, Sniffed, port_mode, sniff
from nodeproxy.codec.message import RequestHead
from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import HeaderModifier
from nodeproxy.http.routes import Routes, apply_modifier
from tests.unit.test_config import HEAD

SERVICES = """\
services:
  - {name: web, vips: [10.96.0.10], ports: [{port: 80, appProtocol: http}],
     endpoints: [{address: 10.0.0.1, port: 8080}]}
  - {name: v2, vips: [10.96.0.11], ports: [{port: 80}],
     endpoints: [{address: 10.0.0.2, port: 8080}]}
  - {name: plain, vips: [10.96.0.12], ports: [{port: 80}, {port: 81}],
     endpoints: [{address: 10.0.0.3, port: 8080}]}
"""


def routes(rules: str, extra: str = "") -> Routes:
    text = HEAD + SERVICES + "httpRoutes:\n  - name: r\n    service: web\n" + extra + \
        "    rules:\n" + rules
    return Routes(parse_config(text, "node.yaml").config)


def target(table: Routes, path: str, method: str = "GET", headers=(), host: str = "web"
           ) -> str | None:
    rule = table.table("default/web", 80).match(RequestHead(method, path, host,
                                                             list(headers)))
    if rule is None:
        return None
    return rule.backends[0].service if len(rule.backends) == 1 else "split"


RULES = """\
      - matches: [{path: {type: PathPrefix, value: /api}}]
        backendRefs: [{name: v2}]
      - matches: [{path: {type: PathPrefix, value: /api/v1}}]
        backendRefs: [{name: plain}]
      - matches: [{path: {type: Exact, value: /api/v1/exact}}]
        backendRefs: [{name: web}]
      - matches: [{path: {type: RegularExpression, value: "/api/v1/re/[0-9]+"}}]
        backendRefs: [{name: web}]
      - matches: [{path: {value: /m}, method: POST}]
        backendRefs: [{name: v2}]
      - matches: [{path: {value: /m}}]
        backendRefs: [{name: plain}]
      - matches: [{path: {value: /h}, headers: [{name: x-a, value: "1"}]}]
        backendRefs: [{name: v2}]
      - matches: [{path: {value: /h}, headers: [{name: x-a, value: "1"},
                                                {name: x-b, type: RegularExpression,
                                                 value: "b+"}]}]
        backendRefs: [{name: plain}]
      - matches: [{path: {value: /q}, queryParams: [{name: v, value: "2"}]}]
        backendRefs: [{name: v2}]
"""


@pytest.mark.parametrize("path,method,headers,expected", [
    ("/api/x", "GET", (), "default/v2"),
    ("/api/v1/x", "GET", (), "default/plain"),          # the longer prefix wins
    ("/api/v1/exact", "GET", (), "default/web"),        # Exact beats every prefix
    ("/api/v1/re/42", "GET", (), "default/web"),        # a regex beats prefixes
    ("/api/v1/re/x", "GET", (), "default/plain"),
    ("/apix", "GET", (), None),                          # prefixes match whole segments
    ("/api", "GET", (), "default/v2"),
    ("/m", "POST", (), "default/v2"),                    # a method match ranks higher
    ("/m", "GET", (), "default/plain"),
    ("/h", "GET", (("x-a", "1"),), "default/v2"),
    ("/h", "GET", (("x-a", "1"), ("x-b", "bbb")), "default/plain"),  # more headers win
    ("/h", "GET", (("x-a", "2"),), None),
    ("/q?v=2&w=1", "GET", (), "default/v2"),
    ("/q?v=3", "GET", (), None),
    ("/nowhere", "GET", (), None),                       # no rule matches: 404 NR
])
def test_precedence_and_matching(path, method, headers, expected):
    assert target(routes(RULES), path, method, headers) == expected


def test_hostnames_narrow_a_route():
    table = routes("      - backendRefs: [{name: v2}]\n",
                   "    hostnames: [web.example, '*.wild.example']\n")
    assert target(table, "/", host="web.example:80") == "default/v2"
    assert target(table, "/", host="a.wild.example") == "default/v2"
    assert target(table, "/", host="other.example") is None


def test_a_service_without_routes_has_a_default_rule():
    table = routes("      - backendRefs: [{name: v2}]\n")
    rule = table.table("default/plain", 81).match(RequestHead("GET", "/x", "plain"))
    assert rule is not None and rule.route == ""
    assert [b.service for b in rule.backends] == ["default/plain"]
    assert rule.timeouts.request_seconds == 15.0 and rule.retry.attempts == 2


def test_a_route_for_one_port_leaves_the_other_alone():
    text = HEAD + SERVICES + """\
httpRoutes:
  - {name: r, service: plain, port: 81, rules: [{matches: [{path: {value: /only}}]}]}
"""
    table = Routes(parse_config(text, "node.yaml").config)
    assert table.table("default/plain", 81).match(RequestHead("GET", "/x", "p")) is None
    assert table.table("default/plain", 80).match(RequestHead("GET", "/x", "p")) is not None


def test_weighted_choice_follows_the_weights():
    table = routes("      - backendRefs: [{name: web, weight: 90}, {name: v2, weight: 10},"
                   " {name: plain, weight: 0}]\n")
    rule = table.table("default/web", 80).match(RequestHead("GET", "/", "web"))
    assert rule is not None
    picks = [rule.backend(i / 1000).service for i in range(1000)]
    assert picks.count("default/web") == 900 and picks.count("default/v2") == 100
    assert "default/plain" not in picks


def test_header_modifier():
    modifier = HeaderModifier.model_validate({
        "set": [{"name": "x-a", "value": "new"}], "add": [{"name": "x-b", "value": "2"}],
        "remove": ["x-c"]})
    headers = [("x-a", "old"), ("x-b", "1"), ("x-c", "gone"), ("x-d", "kept")]
    assert apply_modifier(headers, modifier) == [
        ("x-b", "1"), ("x-d", "kept"), ("x-a", "new"), ("x-b", "2")]
    assert apply_modifier(headers, None) is headers
    # Made once per modifier: applied again, the same; the input is never changed.
    assert apply_modifier(headers, modifier) == [
        ("x-b", "1"), ("x-d", "kept"), ("x-a", "new"), ("x-b", "2")]
    assert headers == [("x-a", "old"), ("x-b", "1"), ("x-c", "gone"), ("x-d", "kept")]
    # Another modifier (a reload's) is its own, even were it given the same id.
    for _ in range(3):
        other = HeaderModifier.model_validate({"remove": ["x-d"]})
        assert apply_modifier(headers, other) == [("x-a", "old"), ("x-b", "1"),
                                                  ("x-c", "gone")]
        del other


@pytest.mark.parametrize("first,expected", [
    (b"", None), (b"G", None), (b"GE", None), (b"GET ", Sniffed.HTTP1),
    (b"GET / HTTP/1.1\r\n", Sniffed.HTTP1), (b"OPTIONS * HTTP/1.1", Sniffed.HTTP1),
    (b"P", None), (b"PO", None), (b"POST /", Sniffed.HTTP1), (b"PRI * HTTP/2.0", None),
    (H2_PREFACE, Sniffed.HTTP2), (H2_PREFACE + b"\x00\x00", Sniffed.HTTP2),
    (b"\x16\x03\x01\x02\x00", Sniffed.OPAQUE), (b"SSH-2.0-OpenSSH", Sniffed.OPAQUE),
    (b"GETX", Sniffed.OPAQUE), (b"get / HTTP/1.1", Sniffed.OPAQUE),
])
def test_sniff(first, expected):
    assert sniff(first) is expected


def test_port_mode():
    opaque = frozenset({3306})
    assert port_mode("tcp", 80, opaque) is PortMode.OPAQUE
    assert port_mode("http", 3306, opaque) is PortMode.HTTP
    assert port_mode("grpc", 80, opaque) is PortMode.HTTP2
    assert port_mode(None, 3306, opaque) is PortMode.OPAQUE
    assert port_mode(None, 80, opaque) is PortMode.DETECT

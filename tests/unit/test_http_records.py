"""The per-request records (RequestHead, ResponseHead, UpstreamResponse, Outcome) and
Endpoint write their own __init__ (compiled in a compiled build, nodeproxy/native.py):
they must behave as the dataclasses they replace, both ways."""

from __future__ import annotations

import dataclasses
import ipaddress

from nodeproxy.codec.message import Body, RequestHead, ResponseHead, UpstreamResponse
from nodeproxy.http.context import Outcome
from nodeproxy.http.pool import Endpoint
from nodeproxy.mesh.destinations import Backend


def test_a_request_head_takes_the_fields_as_before() -> None:
    head = RequestHead("GET", "/a", "web", [("x", "1")], scheme="https", version="2")
    assert (head.method, head.path, head.authority, head.headers, head.scheme,
            head.version) == ("GET", "/a", "web", [("x", "1")], "https", "2")
    assert head == RequestHead(method="GET", path="/a", authority="web",
                               headers=[("x", "1")], scheme="https", version="2")
    assert head != RequestHead("GET", "/a", "web", [("x", "2")], scheme="https", version="2")
    assert "authority='web'" in repr(head)
    assert dataclasses.replace(head, path="/b").path == "/b"


def test_defaults_are_fresh_per_record() -> None:
    """A header appended to one request (x-request-id) never shows in another."""
    a, b = RequestHead("GET", "/", "web"), RequestHead("GET", "/", "web")
    a.headers.append(("x-request-id", "1"))
    assert b.headers == [] and (a.scheme, a.version) == ("http", "1.1")
    r1, r2 = ResponseHead(200), ResponseHead(200)
    r1.headers.append(("a", "b"))
    assert r2.headers == [] and r1 != r2
    o1, o2 = Outcome(), Outcome(service="s")
    o1.flags.append("UF")
    o1.tried.add("10.0.0.1:80")
    assert (o2.flags, o2.tried, o2.service, o2.status, o2.grpc_status) == ([], set(), "s", 0, "")
    assert Outcome(flags=["OM"]).flag_text == "OM" and Outcome().flag_text == "-"


def test_an_upstream_response_keeps_what_it_was_given() -> None:
    head, body = ResponseHead(204, [("a", "b")]), Body.empty()
    response = UpstreamResponse(head, body)
    assert response.head is head and response.body is body


def test_an_endpoint_key_is_address_and_port() -> None:
    v4 = Endpoint(Backend(ipaddress.ip_address("10.0.0.7"), 8080, None))
    v6 = Endpoint(Backend(ipaddress.ip_address("fd00::7"), 80, None))
    assert (v4.key, v6.key) == ("10.0.0.7:8080", "[fd00::7]:80")
    assert v4.stats is not v6.stats  # each endpoint its own statistics
    assert Endpoint(v4.backend, v4.stats).stats is v4.stats

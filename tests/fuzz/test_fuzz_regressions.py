"""Every finding of the fuzz targets, kept: the input that broke an invariant, and the
behaviour it must get now.  Each also passes its target's whole check."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import Any
from unittest import mock

import h2.config
import h2.connection
import h2.errors
import pytest
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from nodeproxy.cni import netconf, plugin
from nodeproxy.cni.spec import CniError
from nodeproxy.codec.h1 import H1Exchange, H1Server
from nodeproxy.codec.h2 import H2Server
from nodeproxy.codec.message import RequestHead, ResponseHead
from nodeproxy.codec.request_target import Refusal, TargetPolicy, check_target, normalize
from nodeproxy.config.loader import ConfigError, parse_config
from nodeproxy.config.model import AuthorizationPolicy
from nodeproxy.policy.authorization import (
    Authorizer,
    ConnectionAttributes,
    DestinationWorkload,
    RequestAttributes,
)
from nodeproxy.tunnel.session import H2Session
from tests.fuzz import (
    fuzz_authorization,
    fuzz_cni_netconf,
    fuzz_config_loader,
    fuzz_h1_server,
    fuzz_h2_server,
    fuzz_hbone_server,
    harness,
)


@pytest.fixture(autouse=True)
def _close_loop() -> Any:
    yield
    harness.close_loop()


# --- HTTP/1.1 ----------------------------------------------------------------------------


def h1_exchange(data: bytes) -> tuple[list[RequestHead], bytes, bool]:
    """Feed a client's bytes to an H1Server: the heads its handler got, what it wrote,
    whether it closed the connection."""
    heads: list[RequestHead] = []

    async def handler(exchange: H1Exchange) -> None:
        heads.append(exchange.request)
        await exchange.respond(ResponseHead(200, [("content-length", "0")]), end=True)

    async def main() -> None:
        server = H1Server(handler, max_header_bytes=8192, idle_timeout=3600)
        server.connection_made(transport)
        server.data_received(data)
        await harness.settle()
        server.connection_lost(None)

    transport = harness.MemoryTransport()
    harness.run(main)
    return heads, bytes(transport.written), transport.closed


@pytest.mark.parametrize("data", [
    # Found by fuzz_h1_server (seed two-hosts): the last Host won, no refusal.
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    # Found by fuzz_h1_server (a mutation): a Host value with a space was passed on.
    b"GET / HTTP/1.1\r\nHost: aHost:t: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n",
])
def test_h1_a_second_host_or_a_host_with_whitespace_is_refused(data: bytes) -> None:
    heads, written, closed = h1_exchange(data)
    assert heads == []  # never reaches the proxy's handler
    assert written.startswith(b"HTTP/1.1 400 ") and b"connection: close" in written
    assert closed
    fuzz_h1_server.check(data)


def test_h1_fields_named_by_connection_are_not_passed_on() -> None:
    """Found by fuzz_h1_server (seed repeated-headers): RFC 9110 7.6.1."""
    data = (b"GET /public HTTP/1.1\r\nHost: a\r\nX-Token: one\r\nX-Token: two\r\n"
            b"X-Kept: 1\r\nConnection: keep-alive, X-Token\r\n\r\n")
    heads, written, _ = h1_exchange(data)
    assert [h.headers for h in heads] == [[("x-kept", "1")]]
    assert written.startswith(b"HTTP/1.1 200 ")
    fuzz_h1_server.check(data)


# --- HTTP/2 ------------------------------------------------------------------------------


def h2_request(fields: list[tuple[str, str]]) -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False))
    client.initiate_connection()
    client.send_headers(1, fields, end_stream=True)
    return client.data_to_send()


def h2_exchange(data: bytes) -> tuple[list[RequestHead], list[Any]]:
    heads: list[RequestHead] = []

    async def handler(exchange: Any) -> None:
        heads.append(exchange.request)
        await exchange.respond(ResponseHead(200, []), end=True)

    async def main() -> None:
        server = H2Server(handler)
        server.connection_made(transport)
        server.data_received(data)
        await harness.settle()
        server.connection_lost(None)

    transport = harness.MemoryTransport()
    harness.run(main)
    return heads, fuzz_h2_server.written_frames(bytes(transport.written))


BASE = [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/")]


def _with(**pseudo: str) -> list[tuple[str, str]]:
    return [(n, pseudo.get(n[1:], v)) for n, v in BASE]


@pytest.mark.parametrize("fields", [
    # Found by fuzz_h2_server (a mutation of seed tricky_path): :path without a slash.
    _with(path="2l10l00000opr1Imin;x"),
    _with(path="http://x/admin"),  # absolute form (issue 13, item 3)
    _with(path="/a b"),
    _with(path="*"),  # only OPTIONS may ask for "*"
    _with(method="GET /admin"),
    _with(scheme="ftp"),
    _with(authority="web evil"),
    [*BASE, ("host", "other")],  # a Host that disagrees with :authority
    # Found by fuzz_h2_server (a 5-minute run): a control character in a field value
    # (h2 refuses only CR, LF and NUL) was passed on, towards HTTP/1.1 upstreams too.
    [*BASE, ("expect", "\x01Akcgnue")],
    [*BASE, ("x-role", "admin\x7f")],
    [*BASE, ("x(y)", "1")],  # a field name that is no token
])
def test_h2_malformed_pseudo_headers_reset_the_stream(fields: list[tuple[str, str]]) -> None:
    data = h2_request(fields)
    heads, frames = h2_exchange(data)
    assert heads == []  # the handler (the proxy) never sees it
    # RFC 9113 8.1.1: a stream error PROTOCOL_ERROR (h2 itself ends the whole connection
    # for a few cases, such as Host against :authority: that refuses it too).
    refusals = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
    refusals += [(1, f.error_code) for f in frames if isinstance(f, GoAwayFrame)]
    assert refusals == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    fuzz_h2_server.check(data)


def test_h2_the_fuzzers_control_character_input() -> None:
    data = base64.b64decode(
        "UFJJICogSFRUUC8yLjANCg0KU00NCg0KAAAqBAAAAAAAAAEAABAAAAIAAAABAAQAAP//AAUAAEAAAAgA"
        "AAAAAAMAAABkAAYAAQAAAAAtAQQAAAABQoPXw3+GQY3wWNdE5610dyXHgPA/RIVi2ug45HqFnEsgpZNj"
        "iP//sQ9STVWlAAADAAEAAAABYWJj")
    heads, frames = h2_exchange(data)
    assert heads == []
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] \
        == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    fuzz_h2_server.check(data)


def test_h2_a_well_formed_request_still_passes() -> None:
    heads, frames = h2_exchange(h2_request([*BASE[:3], (":path", "/a?b=c"), ("host", "web"),
                                            ("x-tab", "a\tb")]))
    assert [(h.method, h.path, h.authority) for h in heads] == [("GET", "/a?b=c", "web")]
    assert heads[0].headers == [("x-tab", "a\tb")]
    assert not any(isinstance(f, RstStreamFrame) for f in frames)
    heads, _ = h2_exchange(h2_request([*_with(method="OPTIONS", path="*")]))
    assert [h.path for h in heads] == ["*"]


def test_hbone_finds_kept() -> None:
    """Three fuzz_hbone_server reports were the target's own mistakes (a stream the peer
    reset needs no answer; the peer may enlarge its HPACK table; after the peer's GOAWAY
    h2 answers nothing, the connection just ends): the inputs stay."""
    for encoded in (
        "UFJJICogSFRUUC8yLjANCg0KU00NCg0KAAAqBAAAAAAAAAEAABAAAAIAAAABAAQAAP//AAUAAEAAAAgAAAAA"
        "AAMAAABkAAYAAQAAAAAXAQQAAAABQoe9q06cF7f/QYwIFxNNLiXEC48B4H8AAAQDAAAAAAEAAAAACAAIBgAA"
        "AAAAYWIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABjZGVmZ2gAAAQIAAAAAAAAAAPoAAAIBwAAAAAAAAAA"
        "AAAAAAA=",
        "UFJJICogSFRUUC8yLjANCg0KU00NCg0KAAAqBAAAAAAAAAEAABAIAAIAAAABAAQAAP//AAUAAEAAAAgAAAAA"
        "AAMAAABkAAYAAQAAAAAsAQQAAAABQoe9q06cF7f/QYwIFxNNLiXEC48B4H9Ah5T2eB2SFk+LlPZAEC4mmlwr"
        "hB8AAB0AAAAAAAFHRVQgLyBIVFRQLzEuMQ0KSG9zdDogd2ViDQoNCg==",
        "UFJJICogSFRUUC8yLjANCg0KU00NCg0KAAAqBAAAAAAAAAEAABAAAAIAAAABAAQAAP//AAUAAEAAAAgA"
        "AAAAAAMAAABkAAYA//8AAAAXAQQAAAABQoe9q06cF7f/QYwXLk0TCCXEC48B4H8AAAQoAAAAAAEAAAAI"
        "AAAIBgAAAAAAYWJjZGVmZ2gAAAQKAAAAAAAAAQPoAAAIBwAAAAAAAAAAAExMTExMTExMjExMaWlpaWlp"
        "aWlpaWlpAAAAAA==",
    ):
        fuzz_hbone_server.check(base64.b64decode(encoded))


def test_hbone_a_header_value_that_is_not_utf8_ends_the_connection_cleanly() -> None:
    """Found by fuzz_hbone_server (a 4-minute run): h2 decodes field values as UTF-8 for
    the HBONE session and raised UnicodeDecodeError out of data_received (asyncio then
    dropped the TLS connection without a GOAWAY)."""
    data = base64.b64decode(
        "UFJJICogSFRUUC8yLjANCg0KU00NCg0KAAAqBAAAAAAAAAEAABAAAAIAAAABAAQAAP//AAUAAEAAAAgA"
        "AAAAAAMAAABkAAYAAQAAAABDAQQAAAABQoe9q06cF7f/QYwIFxNNLiXEC48B4H9Ah5T2eB2S0k+LlPZA"
        "EC4mmlwrhB9Ak/K1R5C12H8+lqHVh2pnPYb2WT+BDwAAIgEEAAAAA8FBjf/csgAXLggf/P//TP9/AY+U"
        "9kH8/+5ZKQuXAg/+fz8=")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.244.2.20:80"),
                            (b"x-bad", b"\xff\xfe")], end_stream=False)
    for stream in (data, client.data_to_send()):
        transport = harness.MemoryTransport()

        async def main(stream: bytes = stream, transport: Any = transport) -> None:
            session = H2Session(client_side=False, on_request=lambda *_: None)
            transport.set_protocol(session)
            session.connection_made(transport)
            session.data_received(stream)  # must not raise
            session.connection_lost(None)

        harness.run(main)
        goaways = [f for f in fuzz_h2_server.written_frames(bytes(transport.written))
                   if isinstance(f, GoAwayFrame)]
        assert [f.error_code for f in goaways] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
        assert transport.closed
    fuzz_hbone_server.check(data)


# --- node YAML ---------------------------------------------------------------------------


def test_config_a_control_character_is_a_config_error_at_its_line() -> None:
    """Found by fuzz_config_loader: PyYAML's ReaderError escaped the loader."""
    text = ("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\nnode:\n"
            "  name: node\x04-a\n")
    with pytest.raises(ConfigError) as e:
        parse_config(text, "node.yaml")
    assert e.value.problems == [
        "node.yaml:4: YAML syntax error: unacceptable character #x0004 "
        "(special characters are not allowed)"]
    fuzz_config_loader.check(text.encode())


@pytest.mark.parametrize("text", ["a: " + "[" * 1000, "- " * 2000 + "x", "{" * 1000])
def test_config_deep_nesting_is_a_config_error(text: str) -> None:
    """Found while seeding fuzz_config_loader: RecursionError escaped the loader."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "node.yaml")
    assert e.value.problems == ["node.yaml:1: YAML nested too deeply to read"]
    fuzz_config_loader.check(text.encode())


# --- CNI -----------------------------------------------------------------------------------


def cni_add(stdin: bytes) -> tuple[int, Any]:
    env = {**fuzz_cni_netconf.ENV, "CNI_COMMAND": "ADD"}
    daemon = fuzz_cni_netconf._Daemon(up=True)
    with mock.patch.object(plugin.control_client, "request", daemon.request), \
            mock.patch.object(plugin, "_setup_logging", lambda log_file: None):
        result = plugin.run(env, stdin)
    assert daemon.posted == []  # refused before the daemon is asked
    return result


@pytest.mark.parametrize("stdin,code", [
    # prevResult.ips not a list: TypeError ('int' object is not iterable).
    (b'{"cniVersion":"1.0.0","name":"k8s","prevResult":{"ips":5}}', 7),
    # A NUL byte in a path: ValueError (embedded null byte) from os.listdir.
    (b'{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"10.0.0.1/24"}]},'
     b'"cgroupRoot":"/sys/fs/cgroup\\u0000x"}', 7),
    # JSON nested deeper than the interpreter's stack: RecursionError.
    (b'{"cniVersion":"1.0.0","prevResult":' + b"[" * 100_000, 6),
])
def test_cni_malformed_input_is_the_documented_error(stdin: bytes, code: int) -> None:
    """Found while seeding fuzz_cni_netconf: each crashed the plugin with a traceback
    instead of the spec's error JSON."""
    status, out = cni_add(stdin)
    assert status == 1 and out["code"] == code, out
    json.dumps(out)
    fuzz_cni_netconf.check(stdin)


@pytest.mark.parametrize("key", ["controlSocket", "cgroupRoot", "logFile"])
def test_cni_a_path_with_a_nul_byte_is_refused_when_parsed(key: str) -> None:
    with pytest.raises(CniError) as e:
        netconf.parse({"cniVersion": "1.0.0", key: "/run/x\x00y"})
    assert e.value.code == 7 and key in e.value.msg


# --- AuthorizationPolicy ---------------------------------------------------------------------


def test_policy_path_is_not_decoded_twice() -> None:
    """Found by fuzz_authorization's one-request-one-meaning invariant (seed
    double-decoding.json), before request_target.py: a bare % let "%32%65" decode into a
    new escape, so the path a DENY /admin rule saw (/%2e%2e/admin) became /admin on a
    second decoding.  Now the codecs refuse a malformed escape before anything decides."""
    path = "/%%32%65%%32%65/admin"
    with pytest.raises(Refusal) as e:
        check_target("GET", path)
    assert e.value.reason == "bad_escape"
    heads, written, _ = h1_exchange(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
    assert heads == [] and written.startswith(b"HTTP/1.1 400 ")
    # What a decoding backend would turn into /admin is judged as /admin already.
    deny = AuthorizationPolicy.model_validate({
        "name": "deny-admin", "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]})
    authorizer = Authorizer([deny])
    dest = DestinationWorkload("shop", {})
    attrs = ConnectionAttributes(None, None, ipaddress.ip_address("10.0.0.1"), 80)
    target = normalize("/x/%2e%2e/admin", TargetPolicy()).target
    assert not authorizer.decide(dest, attrs, RequestAttributes("GET", target, "w", {})).allowed
    seed = Path(fuzz_authorization.__file__).parent / "corpus" / "fuzz_authorization"
    fuzz_authorization.check((seed / "double-decoding.json").read_bytes())

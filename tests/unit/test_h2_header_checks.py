"""codec/h2_header_checks.py against h2's own validate_headers: the same verdict (accept,
or ProtocolError) on every header block a hostile peer might send, for each kind of
block (request, response, either's trailers); then end to end, a request h2 would
refuse is refused by the proxy's connection with PROTOCOL_ERROR."""

from __future__ import annotations

import itertools
import random

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.utilities
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.h2_header_checks import check_received

NAMES = [b":method", b":scheme", b":path", b":authority", b":status", b":protocol",
         b":bogus", b":", b"host", b"te", b"connection", b"keep-alive", b"proxy-connection",
         b"transfer-encoding", b"upgrade", b"x-a", b"X-Up", b"x-A", b"", b"a b", b"a:b",
         b"cookie", b"content-length", b"\x7fx", b"x\x00", b"\xc3\xa9", b"x\tb", b"~!#",
         b"@", b"[", b"`{|}"]
VALUES = [b"GET", b"CONNECT", b"http", b"/", b"", b" x", b"x ", b"\tx", b"x\t", b"a\x00b",
          b"a\nb", b"a\rb", b"trailers", b"TRAILERS", b"gzip", b"a", b"b", b"\xc3\xa9",
          b"websocket", b"200", b"a b", b"\x7f", b"a\x01b", b" "]
KINDS = {"request": (True, False), "response": (False, False),
         "request-trailer": (True, True), "response-trailer": (False, True)}
VALID = {
    "request": [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                (b":authority", b"a")],
    "response": [(b":status", b"200")],
    "request-trailer": [(b"x-a", b"1")],
    "response-trailer": [(b"grpc-status", b"0")],
}


def _h2_verdict(headers, request: bool, trailer: bool) -> bool:
    flags = h2.utilities.HeaderValidationFlags(
        is_client=not request, is_trailer=trailer,
        is_response_header=not request and not trailer, is_push_promise=False)
    try:
        list(h2.utilities.validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


def _our_verdict(headers, request: bool, trailer: bool) -> bool:
    try:
        check_received(headers, request=request, trailer=trailer)
    except h2.exceptions.ProtocolError:
        return False
    return True


def _blocks(kind: str, seed: int, count: int):
    rng = random.Random(seed)
    base = VALID[kind]
    for _ in range(count):
        block = list(base)
        for _ in range(rng.randint(0, 4)):  # mutate: insert, replace, drop, move
            op = rng.randrange(4)
            field = (rng.choice(NAMES), rng.choice(VALUES))
            if op == 0 or not block:
                block.insert(rng.randint(0, len(block)), field)
            elif op == 1:
                block[rng.randrange(len(block))] = field
            elif op == 2:
                block.pop(rng.randrange(len(block)))
            else:
                block.insert(rng.randint(0, len(block)), block.pop(rng.randrange(len(block))))
        yield block


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_verdict_as_h2_on_mutated_blocks(kind: str) -> None:
    request, trailer = KINDS[kind]
    accepted = refused = 0
    for block in _blocks(kind, seed=sum(kind.encode()), count=6000):
        ours = _our_verdict(block, request, trailer)
        assert ours == _h2_verdict(block, request, trailer), (kind, block)
        accepted += ours
        refused += not ours
    assert accepted > 300 and refused > 300, (accepted, refused)  # both sides exercised


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_verdict_as_h2_for_every_single_field_added(kind: str) -> None:
    request, trailer = KINDS[kind]
    for name, value in itertools.product(NAMES, VALUES):
        for at in (0, len(VALID[kind])):
            block = list(VALID[kind])
            block.insert(at, (name, value))
            assert _our_verdict(block, request, trailer) == \
                _h2_verdict(block, request, trailer), (kind, block)


@pytest.mark.parametrize("block", [
    [(b":method", b"CONNECT"), (b":authority", b"a:443")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a"),
     (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")],
    [(b":method", b"GET"), (b":protocol", b"websocket"), (b":authority", b"a"),
     (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"a")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"a"),
     (b"host", b"a")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"),
     (b"host", b"b")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")],
    [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"), (b":authority", b"a")],
], ids=["connect", "connect-with-path", "extended-connect", "extended-connect-no-path",
        "protocol-without-connect", "host-only", "two-hosts", "host-mismatch",
        "no-authority", "empty-path", "options-star"])
def test_the_same_verdict_as_h2_on_the_request_rules(block) -> None:
    assert _our_verdict(block, True, False) == _h2_verdict(block, True, False)


@pytest.mark.parametrize("field", [(b"X-Up", b"1"), (b"connection", b"close"),
                                   (b"te", b"gzip"), (b"x-a", b"a\nb"), (b"x-a", b" pad"),
                                   (b"a:b", b"1")])
def test_a_request_h2_refuses_gets_protocol_error_from_the_proxys_connection(field) -> None:
    """End to end through ProxyH2Connection (h2's checks off, ours on): GOAWAY
    PROTOCOL_ERROR, no request event."""
    server = ProxyH2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None), 64 * 1024)
    assert server.config.validate_inbound_headers is False  # ours run instead
    server.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    block = client.encoder.encode(VALID["request"] + [field])
    with pytest.raises(h2.exceptions.ProtocolError) as raised:
        server.receive_data(h2_frames.header(len(block), h2_frames.HEADERS,
                                             h2_frames.END_HEADERS | h2_frames.END_STREAM, 1)
                            + block)
    assert raised.value.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    goaway = server.data_to_send()
    assert goaway[3] == 0x7 and goaway[-4:] == b"\x00\x00\x00\x01"  # GOAWAY, PROTOCOL_ERROR


def test_a_tunnel_connection_with_decoded_headers_keeps_h2s_checks() -> None:
    """With header_encoding set (the tunnel), h2 decodes before our checks could run:
    h2 checks, as before."""
    conn = ProxyH2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8"), 64 * 1024)
    assert conn.config.validate_inbound_headers is True

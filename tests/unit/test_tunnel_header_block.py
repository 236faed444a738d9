"""The header blocks the tunnel encodes itself (tunnel/header_block.py) and h2's states
after them (codec/h2_connection.py, send_encoded_headers): what a peer's HPACK decoder and
h2 read from them, and that neither side's dynamic table moves."""

from __future__ import annotations

import ipaddress

import h2.config
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hpack.hpack import encode_integer

from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.tunnel import header_block
from nodeproxy.tunnel.headers import (
    L7_AUTHORIZED,
    SOURCE_PORT,
    parse_authority,
    parse_forwarded,
    parse_source_port,
)

V4 = ipaddress.ip_address("10.20.1.5")
V6 = ipaddress.ip_address("fd00::1:5")
SOURCE4 = ipaddress.ip_address("10.20.0.7")
SOURCE6 = ipaddress.ip_address("fd00::7")


def decode(block: bytes) -> list[tuple[str, str]]:
    decoder = hpack.Decoder()
    headers = decoder.decode(block, raw=False)
    assert not decoder.header_table.dynamic_entries, "the block changed the peer's table"
    return headers


@pytest.mark.parametrize("value", [0, 1, 14, 15, 16, 127, 128, 300, 16_383, 2**20 + 7])
@pytest.mark.parametrize("prefix", [4, 7])
def test_integers_are_hpack_integers(value: int, prefix: int) -> None:
    assert header_block.integer(value, prefix) == bytes(encode_integer(value, prefix))


@pytest.mark.parametrize(("ip", "source"), [(V4, SOURCE4), (V6, SOURCE6)])
@pytest.mark.parametrize("l7", [False, True])
@pytest.mark.parametrize("port", [0, 1, 40_000, 65_535])
def test_a_connect_block_decodes_to_the_request_the_destination_parses(ip, source, l7,
                                                                        port) -> None:
    block, target = header_block.connect_block(ip, 7000, source, l7)
    headers = decode(block + header_block.source_port_field(port))
    fields = dict(headers)
    assert headers[0] == (":method", "CONNECT") and headers[1][0] == ":authority"
    assert parse_authority(fields[":authority"]) == (ip, 7000)
    assert target == fields[":authority"].encode()
    assert parse_forwarded(fields["forwarded"]) == source
    assert (fields.get(L7_AUTHORIZED) == "1") is l7
    assert parse_source_port(fields.get(SOURCE_PORT)) == port
    assert (SOURCE_PORT in fields) is bool(port)
    assert len(headers) == 3 + l7 + bool(port)


@pytest.mark.parametrize("status", [200, 204, 400, 403, 404, 405, 421, 500, 503])
def test_a_status_block_decodes_to_its_status(status: int) -> None:
    assert decode(header_block.status_block(status)) == [(":status", str(status))]


def _pair() -> tuple[ProxyH2Connection, ProxyH2Connection]:
    client = ProxyH2Connection(h2.config.H2Configuration(client_side=True), 60 * 1024)
    server = ProxyH2Connection(h2.config.H2Configuration(client_side=False), 60 * 1024)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def test_h2_on_both_sides_keeps_the_stream_states_and_its_own_tables() -> None:
    client, server = _pair()
    for round_ in range(3):  # the same bytes on one connection, again and again
        stream_id = client.get_next_available_stream_id()
        block, target = header_block.connect_block(V4, 7000, SOURCE4, False)
        client.send_encoded_headers(stream_id, block + header_block.source_port_field(40_000),
                                    method=b"CONNECT", authority=target)
        events = server.receive_data(client.data_to_send())
        request = [e for e in events if isinstance(e, h2.events.RequestReceived)]
        assert len(request) == 1 and request[0].stream_id == stream_id
        assert (b":authority", b"10.20.1.5:7000") in request[0].headers
        assert client.streams[stream_id].request_method == b"CONNECT"
        server.send_encoded_headers(stream_id, header_block.status_block(200))
        events = client.receive_data(server.data_to_send())
        response = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert response and response[0].headers == [(b":status", b"200")], round_
        # Both ways open: bytes, then both ends, as h2 judges them.
        client.send_data(stream_id, b"x", end_stream=True)
        events = server.receive_data(client.data_to_send())
        assert any(isinstance(e, h2.events.StreamEnded) for e in events)
        server.end_stream(stream_id)
        events = client.receive_data(server.data_to_send())
        assert any(isinstance(e, h2.events.StreamEnded) for e in events)
        assert client.streams[stream_id].closed and server.streams[stream_id].closed
    # h2's own header blocks still decode after ours: the tables stayed in step.
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.9:80")])
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.RequestReceived) for e in events)
    assert server.decoder.header_table.dynamic_entries == \
        client.encoder.header_table.dynamic_entries


def test_an_encoded_request_keeps_the_peers_stream_limit() -> None:
    client, server = _pair()
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    block, target = header_block.connect_block(V4, 7000, SOURCE4, False)
    client.send_encoded_headers(1, block, method=b"CONNECT", authority=target)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_encoded_headers(3, block, method=b"CONNECT", authority=target)


def test_a_response_on_a_reset_stream_is_refused_as_h2_refuses_it() -> None:
    client, server = _pair()
    block, target = header_block.connect_block(V4, 7000, SOURCE4, False)
    client.send_encoded_headers(1, block, method=b"CONNECT", authority=target)
    server.receive_data(client.data_to_send())
    client.reset_stream(1)
    server.receive_data(client.data_to_send())
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.send_encoded_headers(1, header_block.status_block(200))
    assert not server.data_to_send()


def test_a_block_over_the_frame_size_is_refused_not_split() -> None:
    client, _ = _pair()
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        client.send_encoded_headers(1, b"\x00" * (client.max_outbound_frame_size + 1))
    assert 1 not in client.streams


def test_the_source_port_field_is_the_literal_for_every_port() -> None:
    field, literal = header_block.source_port_field, header_block.literal
    for port in range(1, 65536):
        assert field(port) == literal(SOURCE_PORT, str(port)), port
    assert field(0) == b""
    assert field(1_000_000) == literal(SOURCE_PORT, "1000000")

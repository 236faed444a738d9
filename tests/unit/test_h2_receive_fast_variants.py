"""Adversarial variants of the receive shortcuts (codec/h2_connection.py receive_end_stream,
receive_known_response) the first tests did not play: each case runs on two identical
connections, one offered the shortcut first, the other given the frame through h2's
parser; whatever the shortcut accepts must be what h2 accepted, with the same states, and
where h2 refuses the shortcut must decline so h2 refuses it the same way.

The bugs these catch: a shortcut that skips a check h2's HPACK decoder makes at the end of
every block (a table size this side lowered and the peer never acknowledged, a header-list
limit below the block's size), that trusts a stream after an informational response or
after GOAWAY, or that reads a window or a settings change h2 would not."""

from __future__ import annotations

from collections.abc import Callable

import h2.connection
import h2.errors
import h2.settings
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from tests.unit.test_h2_receive_fast import (
    CONNECT,
    OK_BLOCK,
    _headers_frame,
    _pair,
    _state,
    _through_h2,
)

Setup = Callable[[h2.connection.H2Connection, h2.connection.H2Connection], None]


def _exchange(a: h2.connection.H2Connection, b: h2.connection.H2Connection) -> None:
    """Deliver what each side has queued, both ways, until nothing is left."""
    for _ in range(4):
        b.receive_data(a.data_to_send())
        a.receive_data(b.data_to_send())


def _twins(client_proxy: bool, setup: Setup) -> list[tuple[h2.connection.H2Connection,
                                                          h2.connection.H2Connection]]:
    twins = []
    for _ in range(2):
        client, server = _pair(client_proxy=client_proxy)
        setup(client, server)
        twins.append((client, server))
    return twins


def _known_response_verdicts(setup: Setup) -> tuple[tuple, tuple]:
    """(fast, slow): what the shortcut made of ":status: 200" (or what h2 did once it
    declined) and what h2 alone made of the same frame."""
    (fast, _), (slow, _) = _twins(True, setup)
    event = fast.receive_known_response(1, OK_BLOCK)
    if event is None:
        fast_result = _through_h2(fast, _headers_frame())
    else:
        fast_result = ("events", [type(event).__name__], bytes(fast.data_to_send()))
    slow_result = _through_h2(slow, _headers_frame())
    return (fast_result, _state(fast, 1)), (slow_result, _state(slow, 1))


def _table_size_lowered(client, server) -> None:
    """The client lowers its HPACK table to 0; the (hostile) server acknowledges the
    SETTINGS but never sends the table size update RFC 7541 §4.2 requires."""
    client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    _exchange(client, server)
    client.send_headers(1, CONNECT)
    client.data_to_send()


def _header_list_limit_tiny(client, server) -> None:
    client.decoder.max_header_list_size = client._header_limit = 41  # ":status: 200" is 42
    client.send_headers(1, CONNECT)
    client.data_to_send()


def _informational_first(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "100")])
    client.receive_data(server.data_to_send())


def _after_graceful_goaway(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=1)
    client.receive_data(server.data_to_send())


def _after_goaway_excluding_it(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
    client.receive_data(server.data_to_send())


def _streams_limit_lowered_below_open(client, server) -> None:
    client.send_headers(1, CONNECT)
    client.send_headers(3, CONNECT)
    server.receive_data(client.data_to_send())
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1,
                            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    _exchange(client, server)


@pytest.mark.parametrize("setup", [_table_size_lowered, _header_list_limit_tiny])
def test_a_known_block_hpack_would_refuse_is_refused(setup: Setup) -> None:
    """h2 refuses both (COMPRESSION_ERROR, ENHANCE_YOUR_CALM); the shortcut took them as a
    200 before its decoder checks, opening a tunnel h2 would have closed."""
    fast, slow = _known_response_verdicts(setup)
    assert slow[0][0] == "error", slow
    assert fast == slow


@pytest.mark.parametrize("setup", [_informational_first, _after_graceful_goaway,
                                   _after_goaway_excluding_it,
                                   _streams_limit_lowered_below_open])
def test_a_known_block_in_a_state_h2_accepts_is_h2s_response(setup: Setup) -> None:
    fast, slow = _known_response_verdicts(setup)
    assert slow[0] == ("events", ["ResponseReceived"], b""), slow
    assert fast == slow


def _end_stream_verdicts(client_proxy: bool, setup: Setup, stream_id: int = 1
                         ) -> tuple[tuple, tuple]:
    pick = 0 if client_proxy else 1
    twins = _twins(client_proxy, setup)
    fast, slow = twins[0][pick], twins[1][pick]
    if fast.receive_end_stream(stream_id):
        fast_result = ("events", ["DataReceived", "StreamEnded"], bytes(fast.data_to_send()))
    else:
        fast_result = _through_h2(fast, h2_frames.empty_data(stream_id, True))
    slow_result = _through_h2(slow, h2_frames.empty_data(stream_id, True))
    return (fast_result, _state(fast, stream_id)), (slow_result, _state(slow, stream_id))


def _server_open(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())


def _server_window_closed(client, server) -> None:
    """The server's receive windows are spent to 0 (a DATA frame of the whole initial
    window, never acknowledged): an empty END_STREAM still fits."""
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    _exchange(client, server)
    client.send_headers(1, CONNECT)
    client.send_data(1, b"x" * 10)
    server.receive_data(client.data_to_send())


def _server_sent_goaway(client, server) -> None:
    _server_open(client, server)
    server.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=1)
    client.receive_data(server.data_to_send())


def _client_informational_only(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "100")])
    client.receive_data(server.data_to_send())


def _client_responded(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())


def _client_reset_it(client, server) -> None:
    _client_responded(client, server)
    client.reset_stream(1)
    client.data_to_send()


@pytest.mark.parametrize(("client_proxy", "setup", "accepted"), [
    (False, _server_window_closed, True),
    (False, _server_sent_goaway, True),
    (True, _client_responded, True),
    (True, _client_informational_only, False),
    (True, _client_reset_it, False),
])
def test_end_stream_variants_get_h2s_answer(client_proxy: bool, setup: Setup,
                                            accepted: bool) -> None:
    fast, slow = _end_stream_verdicts(client_proxy, setup)
    assert (slow[0][0] == "events" and "StreamEnded" in slow[0][1]) is accepted, slow
    assert fast == slow


@pytest.mark.parametrize("stream_id", [0, 2, 3, 0x7FFFFFFF])
def test_end_stream_on_a_stream_the_peer_never_opened_is_h2s(stream_id: int) -> None:
    """Stream 0, an even (server-initiated) id, an id above the highest seen: the
    shortcut declines (it knows no such stream) and h2's refusal is unchanged."""
    twins = _twins(False, _server_open)
    fast, slow = twins[0][1], twins[1][1]
    assert isinstance(fast, ProxyH2Connection)
    assert fast.receive_end_stream(stream_id) is False
    assert _through_h2(fast, h2_frames.empty_data(stream_id, True)) == \
        _through_h2(slow, h2_frames.empty_data(stream_id, True))

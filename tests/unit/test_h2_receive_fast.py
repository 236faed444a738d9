"""The receive shortcuts of the proxy's h2 connection (codec/h2_connection.py) that the
HBONE tunnel uses per stream: END_STREAM without payload (receive_end_stream) and a
client's known ":status: 200" response (receive_known_response).  Each case is played on
two identical connections: one takes the shortcut, the other gets the same frame through
h2's parser.  Where the shortcut acts, the events, the stream and connection states and
what each connection sends next must be the same; where the outcome is not fixed (a
closed, reset or half-closed stream, a second response, a content-length, an unknown
block) the shortcut must decline, so h2 answers as it always did."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.codec.h2_connection import ProxyH2Connection

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
OK_BLOCK = b"\x88"  # RFC 7541 Appendix A: index 8 is ":status: 200"


def _pair(client_proxy: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """(client, server) after the preface and SETTINGS, as the tunnel configures them;
    the ProxyH2Connection is the client or the server."""
    def make(client_side: bool) -> h2.connection.H2Connection:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        if client_side == client_proxy:
            return ProxyH2Connection(config, 64 * 1024)
        return h2.connection.H2Connection(config)
    client, server = make(True), make(False)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client, server


def _state(conn: h2.connection.H2Connection, stream_id: int) -> tuple:
    stream = conn.streams.get(stream_id)
    machine = None if stream is None else stream.state_machine
    return (conn.state_machine.state,
            None if machine is None else (machine.state, machine.headers_received,
                                          machine.stream_closed_by),
            sorted(i for i, s in conn.streams.items() if s.open))  # no culling here


def _through_h2(conn: h2.connection.H2Connection, frame: bytes) -> tuple:
    try:
        events = conn.receive_data(frame)
    except h2.exceptions.ProtocolError as e:
        return ("error", type(e).__name__, int(e.error_code), bytes(conn.data_to_send()))
    return ("events", [type(e).__name__ for e in events], bytes(conn.data_to_send()))


# -- END_STREAM -------------------------------------------------------------------


def _server_twins(setup) -> list[tuple[h2.connection.H2Connection, ProxyH2Connection]]:
    twins = []
    for _ in range(2):
        client, server = _pair(client_proxy=False)
        setup(client, server)
        server.receive_data(client.data_to_send())
        server.data_to_send()
        twins.append((client, server))
    return twins


def _open(client, server, headers=CONNECT) -> None:
    client.send_headers(1, headers)


def _open_half_closed_local(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")], end_stream=True)
    client.receive_data(server.data_to_send())


def test_end_stream_on_an_open_stream_moves_h2s_states_as_h2_would() -> None:
    for setup in (_open, _open_half_closed_local):
        (_, fast), (_, slow) = _server_twins(setup)
        assert fast.receive_end_stream(1) is True
        result = _through_h2(slow, h2_frames.empty_data(1, True))
        assert result == ("events", ["DataReceived", "StreamEnded"], b"")
        assert _state(fast, 1) == _state(slow, 1), setup
        assert fast.data_to_send() == b""
        # What each sends next is the same: a response, or a refusal for a closed stream.
        for conn in (fast, slow):
            try:
                conn.send_headers(1, [(":status", "200")])
            except h2.exceptions.ProtocolError as e:
                conn.error = type(e).__name__
        assert getattr(fast, "error", None) == getattr(slow, "error", None)
        assert fast.data_to_send() == slow.data_to_send()


def _content_length(client, server) -> None:
    client.send_headers(1, CONNECT + [("content-length", "5")])


def _ended(client, server) -> None:
    client.send_headers(1, CONNECT, end_stream=True)


def _reset_by_peer(client, server) -> None:
    client.send_headers(1, CONNECT)
    client.reset_stream(1)


def _reset_by_us(client, server) -> None:
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.reset_stream(1)
    client.receive_data(server.data_to_send())


def _never_opened(client, server) -> None:
    pass


@pytest.mark.parametrize("setup", [_content_length, _ended, _reset_by_peer, _reset_by_us,
                                   _never_opened])
def test_end_stream_where_the_outcome_is_not_fixed_is_left_to_h2(setup) -> None:
    """A declared content-length (h2: a body-length error), END_STREAM twice, a reset
    stream, a stream never opened: the shortcut declines and changes nothing."""
    (_, fast), (_, slow) = _server_twins(setup)
    before = _state(fast, 1)
    assert fast.receive_end_stream(1) is False
    assert _state(fast, 1) == before == _state(slow, 1)
    assert _through_h2(fast, h2_frames.empty_data(1, True)) == \
        _through_h2(slow, h2_frames.empty_data(1, True))


def test_end_stream_while_a_header_block_is_open_is_left_to_h2() -> None:
    (client, fast), _ = _server_twins(_open)
    client.send_headers(3, CONNECT)
    block = client.data_to_send()
    fast.receive_data(block[:9 + 1])  # a HEADERS frame partly received
    assert fast.receive_end_stream(1) is False


def test_end_stream_after_an_error_goaway_is_left_to_h2() -> None:
    (_, fast), (_, slow) = _server_twins(_open)
    for conn in (fast, slow):
        conn.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        conn.data_to_send()
    assert fast.receive_end_stream(1) is False
    assert _through_h2(fast, h2_frames.empty_data(1, True)) == \
        _through_h2(slow, h2_frames.empty_data(1, True))


# -- the known response ---------------------------------------------------------------


def _client_twins(setup) -> list[tuple[ProxyH2Connection, h2.connection.H2Connection]]:
    twins = []
    for _ in range(2):
        client, server = _pair(client_proxy=True)
        client.send_headers(1, CONNECT)
        server.receive_data(client.data_to_send())
        setup(client, server)
        client.receive_data(server.data_to_send())
        client.data_to_send()
        twins.append((client, server))
    return twins


def _headers_frame(block: bytes = OK_BLOCK, flags: int = h2_frames.END_HEADERS,
                   stream_id: int = 1) -> bytes:
    return h2_frames.header(len(block), h2_frames.HEADERS, flags, stream_id) + block


def _nothing(client, server) -> None:
    pass


def _client_ended(client, server) -> None:
    client.end_stream(1)


@pytest.mark.parametrize("setup", [_nothing, _client_ended])
def test_a_known_response_is_h2s_response_event_and_states(setup) -> None:
    (fast, _), (slow, _) = _client_twins(setup)
    event = fast.receive_known_response(1, OK_BLOCK)
    events = slow.receive_data(_headers_frame())
    assert type(event) is h2.events.ResponseReceived
    assert [type(e) for e in events] == [h2.events.ResponseReceived]
    assert event.stream_id == events[0].stream_id == 1
    assert event.headers == events[0].headers == [(":status", "200")]
    assert event.stream_ended is None and event.priority_updated is None
    assert _state(fast, 1) == _state(slow, 1)
    assert fast.data_to_send() == slow.data_to_send() == b""
    # the same verdict on what comes next: a second 200 is trailers without END_STREAM
    assert fast.receive_known_response(1, OK_BLOCK) is None
    assert _through_h2(fast, _headers_frame()) == _through_h2(slow, _headers_frame())


def _responded(client, server) -> None:
    server.send_headers(1, [(":status", "200")])


def _reset(client, server) -> None:
    server.reset_stream(1)


@pytest.mark.parametrize("setup", [_responded, _reset])
def test_a_known_block_where_the_outcome_is_not_fixed_is_left_to_h2(setup) -> None:
    (fast, _), (slow, _) = _client_twins(setup)
    before = _state(fast, 1)
    assert fast.receive_known_response(1, OK_BLOCK) is None
    assert _state(fast, 1) == before == _state(slow, 1)
    assert _through_h2(fast, _headers_frame()) == _through_h2(slow, _headers_frame())


def test_only_the_known_block_on_a_known_stream_on_a_client_is_taken() -> None:
    (fast, _), _ = _client_twins(_nothing)
    before = _state(fast, 1)
    for block in (b"\x89", b"\x88\x88", b"\x08\x03200", b"", b"\xbe"):
        assert fast.receive_known_response(1, block) is None, block
    assert fast.receive_known_response(3, OK_BLOCK) is None
    assert _state(fast, 1) == before
    server_proxy = ProxyH2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8"), 64 * 1024)
    server_proxy.initiate_connection()
    assert server_proxy.receive_known_response(1, OK_BLOCK) is None


# -- the stream count ------------------------------------------------------------------


# :method CONNECT and :authority, literals without indexing (tunnel/header_block.py)
_CONNECT_BLOCK = b"\x02\x07CONNECT\x01\x0b10.0.0.1:80"


def _limited_pair(limit: int) -> tuple[ProxyH2Connection, h2.connection.H2Connection]:
    client, server = _pair(client_proxy=True)
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def _ended_both_ways(client: ProxyH2Connection, server: h2.connection.H2Connection,
                     stream_id: int) -> None:
    client.end_stream(stream_id)
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, [(":status", "200")], end_stream=True)
    client.receive_data(server.data_to_send())
    assert client.streams[stream_id].closed


def test_the_peers_stream_limit_still_holds_and_a_forgotten_stream_frees_its_place() -> None:
    """send_encoded_headers counts open streams only when the dict could be at the limit;
    forget_closed drops a closed stream as h2's count would (its closing remembered)."""
    client, server = _limited_pair(2)
    block = _CONNECT_BLOCK
    client.send_encoded_headers(1, block)
    client.send_encoded_headers(3, block)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_encoded_headers(5, block)
    _ended_both_ways(client, server, 1)
    client.forget_closed(1)
    client.forget_closed(3)  # open: kept
    assert 1 not in client.streams and 3 in client.streams
    assert client._stream_closed_by(1) == h2.stream.StreamClosedBy.RECV_END_STREAM
    client.send_encoded_headers(5, block)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_encoded_headers(7, block)


def test_frames_on_a_forgotten_stream_get_the_answer_of_one_h2_culled() -> None:
    answers = []
    for forget in (True, False):
        client, server = _limited_pair(10)
        client.send_encoded_headers(1, _CONNECT_BLOCK)
        _ended_both_ways(client, server, 1)
        if forget:
            client.forget_closed(1)
        else:
            assert client.open_outbound_streams == 0  # h2's own count culls it
        assert 1 not in client.streams
        answers.append([_through_h2(client, frame) for frame in (
            h2_frames.empty_data(1, False), h2_frames.window_update(1, 5),
            h2_frames.empty_data(1, True))])
    assert answers[0] == answers[1], answers


def test_a_stream_closed_and_never_forgotten_is_counted_out_by_h2() -> None:
    client, server = _limited_pair(1)
    block = _CONNECT_BLOCK
    client.send_encoded_headers(1, block)
    client.reset_stream(1)  # closed, left in the dict
    client.send_encoded_headers(3, block)  # the exact count culls it
    assert 1 not in client.streams

"""The destination's CONNECT request without h2's frame parser and HPACK decoder
(codec/h2_connection.py receive_known_request), against a hostile peer node.

Each case is played on two identical server connections (the tunnel's configuration,
a FrameGuard with a fake clock): one is given each HEADERS frame as the tunnel's session
gives it (the shortcut first, h2's parser if it declines), the other only through h2's
parser.  They must give the same events (type, stream, headers), the same stream and
connection states, the same HPACK decoder table, the same guard counts and the same
bytes to send, frame after frame, including h2's refusals (a GOAWAY and its code).
Where the shortcut must decline it must change nothing at all, so h2 answers as it
always did."""

from __future__ import annotations

import ipaddress

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.codec.h2 import MAX_HEADER_BYTES
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.h2_guard import Abuse, FrameGuard
from nodeproxy.config.model import Http2Limits
from nodeproxy.tunnel.header_block import connect_block, literal, source_port_field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TARGET = "10.0.0.1:80"


def _block(port: int = 40000, marker: bool = False) -> bytes:
    block, _ = connect_block(ipaddress.ip_address("10.0.0.1"), 80,
                             ipaddress.ip_address("10.0.1.1"), marker)
    return block + source_port_field(port)


class _Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _server(limits: Http2Limits | None = None, guard: bool = True) -> ProxyH2Connection:
    """A server as the tunnel makes it (header_encoding utf-8, MAX_HEADER_BYTES, a guard),
    after the client's preface and an empty SETTINGS."""
    conn = ProxyH2Connection(h2.config.H2Configuration(client_side=False,
                                                       header_encoding="utf-8"),
                             MAX_HEADER_BYTES)
    if guard:
        clock = _Clock()
        conn.guard = FrameGuard(limits or Http2Limits(), clock=clock,
                                is_open=lambda sid: sid in conn.streams
                                and not conn.streams[sid].closed)
    # the tunnel's settings (tunnel/session.py connection_made), acknowledged by the peer
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    conn.initiate_connection()
    conn.receive_data(PREFACE + h2_frames.header(0, 0x4, 0, 0) + h2_frames.header(0, 0x4, 0x1, 0))
    conn.data_to_send()
    return conn


def _headers(block: bytes, stream_id: int, flags: int = h2_frames.END_HEADERS) -> bytes:
    return h2_frames.header(len(block), h2_frames.HEADERS, flags, stream_id) + block


def _outcome(result) -> tuple:
    if isinstance(result, Exception):  # h2's ProtocolError, or UnicodeDecodeError
        return ("error", type(result).__name__, int(getattr(result, "error_code", 0) or 0))
    return ("events", [(type(e).__name__, getattr(e, "stream_id", None),
                        [tuple(h) for h in getattr(e, "headers", None) or []])
                       for e in result])


def _as_session(conn: ProxyH2Connection, frame: bytes) -> tuple:
    """The tunnel session's way: the shortcut for HEADERS with END_HEADERS alone, h2's
    parser when it declines (or for any other frame)."""
    length, kind, flags, stream_id = h2_frames.parse_header(frame[:9])
    try:
        if kind == h2_frames.HEADERS and flags == h2_frames.END_HEADERS:
            event = conn.receive_known_request(stream_id, frame[9:])
            if event is not None:
                conn.taken = getattr(conn, "taken", 0) + 1
                return _outcome([event])
        return _outcome(conn.receive_data(frame))
    except (h2.exceptions.ProtocolError, UnicodeDecodeError) as e:
        return _outcome(e)


def _through_h2(conn: ProxyH2Connection, frame: bytes) -> tuple:
    try:
        return _outcome(conn.receive_data(frame))
    except (h2.exceptions.ProtocolError, UnicodeDecodeError) as e:
        return _outcome(e)


def _state(conn: ProxyH2Connection) -> tuple:
    guard = conn.guard
    return (conn.state_machine.state, conn.highest_inbound_stream_id,
            # open streams; a closed one only by how it closed (h2 culls closed streams
            # when it counts them, the shortcut when the session forgets them)
            {sid: (s.state_machine.state, s.state_machine.headers_received,
                   s.state_machine.client, s._expected_content_length)
             for sid, s in conn.streams.items() if not s.closed},
            {sid: conn._stream_closed_by(sid) for sid in range(1, 12, 2)
             if sid <= conn.highest_inbound_stream_id},
            list(conn.decoder.header_table.dynamic_entries), conn.decoder.header_table_size,
            None if guard is None else (guard.highest_stream_id, guard.streams_opened,
                                        dict(guard._started), guard.empty_run))


def _play(frames: list[bytes], setup=None, guard: bool = True) -> tuple[list, int]:
    """Both twins through `frames`; (the outcomes, frames the shortcut took)."""
    fast, slow = _server(guard=guard), _server(guard=guard)
    if setup is not None:
        setup(fast)
        setup(slow)
        fast.data_to_send()
        slow.data_to_send()
    outcomes = []
    for frame in frames:
        a, b = _as_session(fast, frame), _through_h2(slow, frame)
        assert a == b, (frame, a, b)
        assert _state(fast) == _state(slow), frame
        assert fast.data_to_send() == slow.data_to_send(), frame
        outcomes.append(a)
        if a[0] == "error":
            break
    # and what each sends next on the newest stream is the same
    for conn in (fast, slow):
        sid = conn.highest_inbound_stream_id
        try:
            conn.send_headers(sid, [(":status", "200")])
        except (h2.exceptions.ProtocolError, KeyError) as e:
            conn.next_error = type(e).__name__
    assert getattr(fast, "next_error", None) == getattr(slow, "next_error", None)
    assert fast.data_to_send() == slow.data_to_send()
    return outcomes, getattr(fast, "taken", 0)


def test_the_tunnels_own_request_is_h2s_request_event_states_and_answer() -> None:
    outcomes, taken = _play([_headers(_block(), 1)])
    assert taken == 1
    assert outcomes == [("events", [("RequestReceived", 1, [
        (":method", "CONNECT"), (":authority", TARGET), ("forwarded", "for=10.0.1.1"),
        ("x-nodeproxy-source-port", "40000")])])]


def test_repeated_blocks_on_many_new_streams_match_h2_and_leave_the_table_empty() -> None:
    frames = [_headers(_block(40000 + n % 3, marker=n % 2 == 1), 1 + 2 * n)
              for n in range(300)]
    outcomes, taken = _play(frames)
    assert taken == 300 and all(o[0] == "events" for o in outcomes)


def test_blocks_using_the_dynamic_table_interleaved_with_static_ones_stay_in_step() -> None:
    """A peer indexes fields (h2 decodes and adds them to its table), then sends static
    blocks (taken), then references the entries it indexed (h2): the decoder's table is
    where h2 alone would have it, and the references decode to the same fields."""
    encoder = hpack.Encoder()
    fields = [(":method", "CONNECT"), (":authority", TARGET), ("forwarded", "for=10.0.1.9")]
    frames = [_headers(encoder.encode(fields), 1),       # indexing, Huffman: h2's
              _headers(_block(), 3),                      # static: taken
              _headers(encoder.encode(fields), 5),       # dynamic references: h2's
              _headers(_block(1), 7),                     # taken
              _headers(encoder.encode(fields), 9)]
    outcomes, taken = _play(frames)
    assert taken == 2
    assert all(o[0] == "events" for o in outcomes), outcomes
    assert outcomes[2] == outcomes[0][:1] + ([("RequestReceived", 5, [
        (":method", "CONNECT"), (":authority", TARGET), ("forwarded", "for=10.0.1.9")])],)


def _static(*parts: bytes) -> bytes:
    return b"".join(parts)


_METHOD = literal(2, "CONNECT")
_AUTHORITY = literal(1, TARGET)


@pytest.mark.parametrize("block", [
    _static(_METHOD, _AUTHORITY, b"\xbe"),  # a dynamic-table index (empty table)
    _static(_METHOD, _AUTHORITY, b"\x40\x01a\x01b"),  # incremental indexing
    _static(b"\x20", _METHOD, _AUTHORITY),  # a size update to 0 first
    _static(b"\x3f\xe1\x1f", _METHOD, _AUTHORITY),  # a size update to 4096
    _static(b"\x3f\xe2\x1f", _METHOD, _AUTHORITY),  # a size update above the maximum
    _static(_METHOD, _AUTHORITY, b"\x20"),  # a size update after fields
    _static(_METHOD, _AUTHORITY, b"\x10\x01a\x01b"),  # never indexed
    _static(_METHOD, b"\x01\x8b" + b"\x00" * 11),  # a Huffman-coded (garbage) value
    _static(_METHOD, _AUTHORITY, b"\x00\x05ab"),  # cut short
    _static(_METHOD, _AUTHORITY, b"\x80"),  # index 0
    _static(_METHOD, _AUTHORITY, literal("content-length", "4")),
    _static(_METHOD, _AUTHORITY, literal("cookie", "a=1"), literal("cookie", "b=2")),
    _static(_METHOD, _AUTHORITY, literal("X-Upper", "1")),  # uppercase name
    _static(_METHOD, _AUTHORITY, literal("connection", "close")),
    _static(_METHOD, _AUTHORITY, literal("te", "gzip")),
    _static(_METHOD, _AUTHORITY, literal("x-bad", "a\rb")),
    _static(_METHOD, _AUTHORITY, literal("x-bad", " lead")),
    _static(_METHOD, _AUTHORITY, b"\x00\x05x-bad\x02\xff\xfe"),  # not UTF-8
    _static(_METHOD, _AUTHORITY, b"\x00\x00\x01v"),  # an empty name
    _static(_METHOD),  # no :authority
    _static(_AUTHORITY),  # no :method
    _static(_METHOD, _AUTHORITY, b"\x84"),  # CONNECT with :path
    _static(_METHOD, _AUTHORITY, _METHOD),  # :method twice
    _static(_METHOD, literal("x-a", "1"), _AUTHORITY),  # a pseudo-header after a field
    _static(_METHOD, _AUTHORITY, literal(":custom", "1")),
    _static(_METHOD, _AUTHORITY, b"\x88"),  # :status in a request
    _static(_METHOD, _AUTHORITY, literal("x-huge", "v" * (MAX_HEADER_BYTES - 80))),
    _static(b"\x82\x86\x84", _AUTHORITY),  # GET: taken (any request h2 accepts)
    b"",  # an empty block
])
def test_every_other_block_gets_h2s_answer(block: bytes) -> None:
    """Each block on a fresh stream, then the tunnel's own on the next: the same answers
    (an event, or a GOAWAY with h2's code) whether or not the shortcut took it."""
    _play([_headers(block, 1), _headers(_block(), 3)])


def test_refused_blocks_are_not_taken_and_taken_ones_are_h2s_accepted_ones() -> None:
    taken_ok = []
    for block in (_static(_METHOD, _AUTHORITY, b"\xbe"), _static(b"\x20", _METHOD, _AUTHORITY),
                  _static(_METHOD, _AUTHORITY, literal("x-bad", "a\rb")),
                  _static(_METHOD, _AUTHORITY, literal("content-length", "4"))):
        conn = _server()
        assert conn.receive_known_request(1, block) is None
        assert conn.streams == {} and conn.guard.streams_opened == 0
        taken_ok.append(conn.highest_inbound_stream_id == 0)
    assert all(taken_ok)


@pytest.mark.parametrize("stream_id", [0, 2, 3])
def test_stream_ids_the_peer_may_not_use_get_h2s_answer(stream_id: int) -> None:
    """An even id, 0, and an id below one already used: h2's PROTOCOL_ERROR."""
    _play([_headers(_block(), 5), _headers(_block(), stream_id)])


def test_headers_again_on_an_open_stream_get_h2s_answer() -> None:
    _play([_headers(_block(), 1), _headers(_block(), 1)])


def test_flags_other_than_end_headers_alone_go_to_h2() -> None:
    for flags in (h2_frames.END_HEADERS | h2_frames.END_STREAM, 0):
        fast = _server()
        # the session only asks for END_HEADERS alone; h2 judges the rest
        assert _as_session(fast, _headers(_block(), 1, flags)) == \
            _through_h2(_server(), _headers(_block(), 1, flags))
        assert getattr(fast, "taken", 0) == 0


def test_a_header_block_partly_received_is_left_to_h2() -> None:
    conn = _server()
    whole = _headers(_block(), 1)
    conn.receive_data(whole[:12])
    assert conn.receive_known_request(3, _block()) is None
    assert 3 not in conn.streams


def test_after_an_error_goaway_the_request_is_h2s() -> None:
    def goaway(conn):
        conn.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    _, taken = _play([_headers(_block(), 1)], setup=goaway)
    assert taken == 0


def test_a_table_size_lowered_by_our_settings_and_not_yet_acknowledged_is_h2s() -> None:
    """We lowered SETTINGS_HEADER_TABLE_SIZE; hpack requires the peer's size update in its
    next block, so a static block without one is refused by h2 (COMPRESSION_ERROR)."""
    def lower(conn):
        conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        conn.receive_data(h2_frames.header(0, 0x4, 0x1, 0))  # the peer's ACK
    outcomes, taken = _play([_headers(_block(), 1)], setup=lower)
    assert taken == 0 and outcomes[0][0] == "error"
    # with the peer's size update first, h2 takes it, and the shortcut the next one
    outcomes, taken = _play([_headers(b"\x20" + _block(), 1), _headers(_block(), 3)],
                            setup=lower)
    assert taken == 1 and all(o[0] == "events" for o in outcomes)


def test_a_header_list_above_the_limit_is_h2s() -> None:
    big = _static(_METHOD, _AUTHORITY, literal("x-big", "v" * (MAX_HEADER_BYTES + 10)))
    outcomes, taken = _play([_headers(big, 1)])
    assert taken == 0 and outcomes[0][0] == "error"


def test_our_stream_limit_is_h2s_to_count_when_the_dict_could_hold_it() -> None:
    def limit(conn):
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        conn.receive_data(h2_frames.header(0, 0x4, 0x1, 0))
    frames = [_headers(_block(), sid) for sid in (1, 3, 5)]
    outcomes, taken = _play(frames, setup=limit)
    assert taken == 2
    assert outcomes[2] == ("error", "TooManyStreamsError",
                           int(h2.errors.ErrorCodes.PROTOCOL_ERROR))


def test_a_spent_stream_budget_is_raised_and_answered_as_h2s_frame_loop_does() -> None:
    limits = Http2Limits(max_streams_per_second=3)
    fast, slow = _server(limits), _server(limits)
    answers = []
    for conn, way in ((fast, _as_session), (slow, _through_h2)):
        got = [way(conn, _headers(_block(), sid)) for sid in (1, 3, 5, 7)]
        answers.append((got, conn.data_to_send(), conn.guard.streams_opened,
                        conn.terminated))
    assert answers[0] == answers[1]
    assert answers[0][0][-1] == ("error", "Abuse", int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM))
    assert answers[0][3] is True


def test_the_shortcut_is_a_servers_only() -> None:
    client = ProxyH2Connection(h2.config.H2Configuration(client_side=True,
                                                         header_encoding="utf-8"), 65536)
    client.initiate_connection()
    assert client.receive_known_request(1, _block()) is None
    plain = ProxyH2Connection(h2.config.H2Configuration(client_side=False), 65536)
    plain.initiate_connection()
    assert plain.receive_known_request(1, _block()) is None  # bytes headers: h2's


def test_resets_mid_stream_and_new_streams_after_them_stay_in_step() -> None:
    rst = h2_frames.header(4, 0x3, 0, 1) + (8).to_bytes(4, "big")
    _play([_headers(_block(), 1), rst, _headers(_block(), 3), rst,
           h2_frames.header(4, 0x3, 0, 3) + (8).to_bytes(4, "big"), _headers(_block(), 5),
           _headers(_block(), 1)])


def test_the_guard_sees_every_new_stream_once_either_way() -> None:
    conn = _server()
    conn.taken = 0
    _as_session(conn, _headers(_block(), 1))
    _as_session(conn, _headers(hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", TARGET)]), 3))
    assert conn.taken == 1
    assert conn.guard.streams_opened == 2 and sorted(conn.guard._started) == [1, 3]


def test_abuse_is_an_h2_protocol_error() -> None:
    assert issubclass(Abuse, h2.exceptions.ProtocolError)

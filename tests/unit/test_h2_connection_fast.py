"""The per-frame shortcuts of the proxy's h2 connection (codec/h2_connection.py) against
a hostile peer: DATA it frames itself, received frames dispatched without h2's eager
repr, a frame's length read from its header.  Each case is played twice, on
ProxyH2Connection and on h2's own H2Connection, and the bytes each puts on the wire (and
the errors each raises) must be the same: the shortcuts change the cost, never what the
peer sees.  Sans-IO: the peer is a real h2 client connection, or raw frames for what h2
would refuse to send."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.codec.h2_connection import ProxyH2Connection

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"),
           (b":path", b"/")]
RESPONSE = [(b":status", b"200")]
SETTINGS = h2.settings.SettingCodes


def _config(client_side: bool, *, raw_out: bool = False) -> h2.config.H2Configuration:
    """raw_out: h2's outbound header checks and normalization off, as the L7 codec's
    server side has them (ProxyH2Connection then frames response heads itself)."""
    return h2.config.H2Configuration(
        client_side=client_side, header_encoding=None,
        validate_outbound_headers=not raw_out, normalize_outbound_headers=not raw_out)


class Twins:
    """A server ProxyH2Connection and a plain h2 server fed the same bytes and calls."""

    def __init__(self, client_window: int = 65535, client_frame: int = 16384,
                 raw_out: bool = False):
        self.proxy = ProxyH2Connection(_config(False, raw_out=raw_out), 64 * 1024)
        self.plain = h2.connection.H2Connection(_config(False, raw_out=raw_out))
        self.client = h2.connection.H2Connection(_config(True))
        self.client.local_settings = h2.settings.Settings(client=True, initial_values={
            SETTINGS.INITIAL_WINDOW_SIZE: client_window,
            SETTINGS.MAX_FRAME_SIZE: client_frame})
        self.client.initiate_connection()
        for conn in (self.proxy, self.plain):
            conn.initiate_connection()
        preface = self.client.data_to_send()
        self.feed(preface)
        self.client.receive_data(self.server_bytes())  # server SETTINGS (+ ACK)
        self.feed(self.client.data_to_send())  # SETTINGS ACK
        self.server_bytes()

    def feed(self, data: bytes) -> list[type]:
        """Both servers receive `data`; their events (types) must agree; returns them.
        Raises what they both raised."""
        results = []
        for conn in (self.proxy, self.plain):
            try:
                results.append([type(e) for e in conn.receive_data(data)])
            except h2.exceptions.ProtocolError as e:
                results.append((type(e), int(e.error_code)))
        assert results[0] == results[1]
        if isinstance(results[0], tuple):
            raise results[0][0](f"both raised {results[0]}")
        return results[0]

    def call(self, name: str, *args, **kwargs) -> type | None:
        """The same call on both; the same exception (or none) from each."""
        raised = []
        for conn in (self.proxy, self.plain):
            try:
                getattr(conn, name)(*args, **kwargs)
                raised.append(None)
            except (h2.exceptions.ProtocolError, ValueError) as e:
                raised.append(type(e))
        assert raised[0] == raised[1], raised
        return raised[0]

    def server_bytes(self) -> bytes:
        """What both would write now: the same bytes."""
        proxy, plain = self.proxy.data_to_send(), self.plain.data_to_send()
        assert proxy == plain
        return proxy

    def states(self, stream_id: int) -> object:
        """The stream's state on both (the same), None once forgotten."""
        a, b = (conn.streams.get(stream_id) for conn in (self.proxy, self.plain))
        got = [None if x is None else (x.state_machine.state, x.state_machine.headers_sent,
                                       x.state_machine.trailers_sent, x.request_method)
               for x in (a, b)]
        assert got[0] == got[1], got
        return got[0]

    def windows(self, stream_id: int) -> int:
        a = self.proxy.local_flow_control_window(stream_id)
        assert a == self.plain.local_flow_control_window(stream_id)
        return a

    def open_stream(self, end: bool = False) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, REQUEST, end_stream=end)
        self.feed(self.client.data_to_send())
        self.call("send_headers", sid, RESPONSE)
        self.client.receive_data(self.server_bytes())
        return sid


def _received(client: h2.connection.H2Connection, data: bytes) -> bytes:
    out = b""
    for event in client.receive_data(data):
        if isinstance(event, h2.events.DataReceived):
            out += event.data
    return out


def _raw(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return h2_frames.header(len(payload), frame_type, flags, stream_id) + payload


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed-remote"])
def test_data_up_to_the_exact_window_is_framed_byte_for_byte_as_h2_frames_it(half_closed):
    t = Twins(client_window=1000)
    sid = t.open_stream(end=half_closed)
    assert t.windows(sid) == 1000
    chunks = [b"a" * 1, bytes(range(256)) * 2, memoryview(b"z" * 487)]  # 1000 in all
    got = b""
    for chunk in chunks:
        assert t.call("send_data", sid, chunk) is None
        got += _received(t.client, t.server_bytes())
    assert got == b"a" + bytes(range(256)) * 2 + b"z" * 487
    assert t.windows(sid) == 0
    # One byte past the window: h2's FlowControlError on both, nothing written.
    assert t.call("send_data", sid, b"!") is h2.exceptions.FlowControlError
    assert t.server_bytes() == b""
    # The peer credits 10 bytes: exactly 10 go, the 11th does not.
    t.client.increment_flow_control_window(10, sid)
    t.client.increment_flow_control_window(10)
    t.feed(t.client.data_to_send())
    assert t.call("send_data", sid, b"0123456789") is None
    assert _received(t.client, t.server_bytes()) == b"0123456789"
    assert t.call("send_data", sid, b"x") is h2.exceptions.FlowControlError


def test_data_past_the_connection_window_is_refused_even_with_stream_window_left():
    t = Twins(client_window=1_000_000)
    sid = t.open_stream()
    assert t.windows(sid) == 65535  # the connection window binds
    for _ in range(3):
        assert t.call("send_data", sid, b"q" * 16384) is None
    assert t.call("send_data", sid, b"q" * 16383) is None
    assert t.windows(sid) == 0
    assert t.call("send_data", sid, b"q") is h2.exceptions.FlowControlError
    assert len(_received(t.client, t.server_bytes())) == 65535


def test_a_frame_larger_than_the_peers_max_frame_size_is_h2s_error():
    t = Twins(client_window=1_000_000, client_frame=16384)
    sid = t.open_stream()
    assert t.call("send_data", sid, b"m" * 16385) is h2.exceptions.FrameTooLargeError
    assert t.call("send_data", sid, b"m" * 16384) is None
    assert _received(t.client, t.server_bytes()) == b"m" * 16384


def test_data_on_a_stream_the_peer_reset_or_that_ended_is_h2s_error():
    t = Twins()
    reset, ended = t.open_stream(), t.open_stream()
    t.client.reset_stream(reset, h2.errors.ErrorCodes.CANCEL)
    t.feed(t.client.data_to_send())
    assert t.call("send_data", reset, b"late") is h2.exceptions.StreamClosedError
    assert t.call("send_data", ended, b"last", end_stream=True) is None
    t.client.receive_data(t.server_bytes())
    assert t.call("send_data", ended, b"more") is not None  # half closed (local)
    assert t.call("send_data", 99, b"never opened") is not None
    assert t.server_bytes() == b""


def test_padding_and_end_stream_go_through_h2_with_the_same_window_charge():
    t = Twins(client_window=1000)
    sid = t.open_stream()
    assert t.call("send_data", sid, b"p" * 10, pad_length=20) is None
    assert t.windows(sid) == 1000 - 10 - 20 - 1
    assert t.call("send_data", sid, b"e" * 5, end_stream=True) is None
    events = t.client.receive_data(t.server_bytes())
    assert [type(e) for e in events] == [h2.events.DataReceived, h2.events.DataReceived,
                                         h2.events.StreamEnded]


def test_after_an_error_goaway_data_is_refused_as_h2_refuses_it():
    t = Twins()
    sid = t.open_stream()
    with pytest.raises(h2.exceptions.ProtocolError):
        t.feed(_raw(0x4, 0, 1, b""))  # SETTINGS on a stream: connection error
    t.server_bytes()  # the GOAWAY
    assert t.call("send_data", sid, b"x") is h2.exceptions.ProtocolError
    assert t.server_bytes() == b""


@pytest.mark.parametrize("case", ["data-after-our-reset", "data-on-a-long-ended-stream",
                                  "headers-on-a-lower-never-opened-stream",
                                  "padding-longer-than-the-frame"])
def test_frames_on_closed_streams_get_h2s_answer(case):
    """Received frames run the copy of h2's dispatch (no eager repr): the same answers."""
    t = Twins()
    if case == "data-after-our-reset":
        sid = t.open_stream()
        t.call("reset_stream", sid, h2.errors.ErrorCodes.CANCEL)
        t.server_bytes()
        t.feed(_raw(h2_frames.DATA, 0, sid, b"late"))  # a stream error, not fatal
        assert t.server_bytes() == _raw(0x3, 0, sid, struct.pack(
            ">I", h2.errors.ErrorCodes.STREAM_CLOSED))
    elif case == "data-on-a-long-ended-stream":
        sid = t.open_stream(end=True)
        t.call("send_data", sid, b"", end_stream=True)
        t.server_bytes()
        for _ in range(3):
            t.open_stream(end=True)  # h2 forgets closed streams as new ones open
        assert t.feed(_raw(h2_frames.DATA, 0, sid, b"late")) == []  # forgotten by h2
        assert t.server_bytes() == _raw(0x3, 0, sid, struct.pack(
            ">I", h2.errors.ErrorCodes.STREAM_CLOSED))
    elif case == "headers-on-a-lower-never-opened-stream":
        t.open_stream()
        t.open_stream()  # stream 3
        block = h2.connection.H2Connection(_config(True)).encoder.encode(REQUEST)
        with pytest.raises(h2.exceptions.ProtocolError):
            t.feed(_raw(h2_frames.HEADERS, h2_frames.END_HEADERS, 1, block))
        assert t.server_bytes()
    else:
        sid = t.open_stream()
        with pytest.raises(h2.exceptions.ProtocolError):
            t.feed(_raw(h2_frames.DATA, h2_frames.PADDED, sid, bytes([9]) + b"abc"))
        assert t.server_bytes()


def test_received_frames_are_not_formatted_for_the_trace_log(monkeypatch):
    """h2 calls repr(frame) for every received frame; the proxy's connection does not,
    unless a logger is configured (then h2's own method runs)."""
    formatted = []

    def spy(self) -> str:
        formatted.append(type(self).__name__)
        return "frame"

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", spy)
    t = Twins()
    formatted.clear()
    block = h2.connection.H2Connection(_config(True)).encoder.encode(REQUEST)
    request = _raw(h2_frames.HEADERS, h2_frames.END_HEADERS, 1, block)
    assert [type(e) for e in t.proxy.receive_data(request)] == [h2.events.RequestReceived]
    assert formatted == []
    t.plain.receive_data(request)
    assert formatted == ["HeadersFrame"]  # what h2 alone does
    formatted.clear()

    class Tracing:
        def debug(self, *args) -> None:
            pass

        def trace(self, fmt: str, *args) -> None:
            pass

    config = _config(False)
    config.logger = Tracing()
    traced = ProxyH2Connection(config, 64 * 1024)
    client = h2.connection.H2Connection(_config(True))
    client.initiate_connection()
    traced.receive_data(client.data_to_send())
    assert formatted == ["SettingsFrame"]


def test_a_frame_header_is_judged_by_its_length_before_its_payload_arrives():
    """At most max_inbound_frame_size: exactly that is buffered, one byte more refused
    from the nine-byte header alone."""
    t = Twins()
    sid = t.open_stream()
    limit = t.proxy.max_inbound_frame_size
    assert limit == 16384
    t.proxy.increment_flow_control_window(1 << 20)
    t.proxy.increment_flow_control_window(1 << 20, sid)
    head = struct.pack(">I", limit)[1:] + bytes([h2_frames.DATA, 0]) + struct.pack(">I", sid)
    assert t.proxy.receive_data(head) == []  # waits for the payload
    events = t.proxy.receive_data(b"d" * limit)
    assert [type(e) for e in events] == [h2.events.DataReceived]
    over = struct.pack(">I", limit + 1)[1:] + bytes([h2_frames.DATA, 0]) + \
        struct.pack(">I", sid)
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        t.proxy.receive_data(over)  # no payload sent at all


# -- response heads framed by the proxy (the L7 server side: h2's outbound pipeline off) --

BIG = [(b":status", b"200")] + [(b"x-%d" % i, bytes([97 + i % 26]) * 900) for i in range(60)]


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed-remote"])
@pytest.mark.parametrize("shape", ["head-data-trailers", "head-ends", "head-data-end",
                                   "continue-then-head", "continuation", "never-indexed"])
def test_response_heads_are_framed_byte_for_byte_as_h2_frames_them(shape, half_closed):
    t = Twins(raw_out=True)
    assert t.proxy._frame_headers
    for _ in range(2):  # twice: the second block uses the HPACK table the first filled
        sid = t.client.get_next_available_stream_id()
        t.client.send_headers(sid, REQUEST, end_stream=half_closed)
        t.feed(t.client.data_to_send())
        head = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-a", b"1")]
        if shape == "head-ends":
            assert t.call("send_headers", sid, head, end_stream=True) is None
        elif shape == "continue-then-head":
            assert t.call("send_headers", sid, [(b":status", b"100")]) is None
            assert t.call("send_headers", sid, head) is None
            assert t.call("send_data", sid, b"x", end_stream=True) is None
        elif shape == "continuation":
            assert t.call("send_headers", sid, BIG) is None  # 54 KB: four frames
            assert t.call("send_headers", sid, BIG[1:], end_stream=True) is None
        elif shape == "never-indexed":
            head.append(hpack.NeverIndexedHeaderTuple(b"authorization", b"secret"))
            assert t.call("send_headers", sid, head, end_stream=True) is None
        else:
            assert t.call("send_headers", sid, head) is None
            assert t.states(sid)[1]  # headers_sent
            assert t.call("send_data", sid, b"body") is None
            if shape == "head-data-trailers":
                assert t.call("send_headers", sid, [(b"grpc-status", b"0")],
                              end_stream=True) is None
            else:
                assert t.call("end_stream", sid) is None
        t.states(sid)
        events = t.client.receive_data(t.server_bytes())
        assert h2.events.StreamEnded in [type(e) for e in events], events
        if shape == "continuation":
            got = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
            assert [tuple(f) for f in got[0].headers] == BIG
        t.feed(t.client.data_to_send())


def test_response_head_mistakes_get_h2s_errors():
    t = Twins(raw_out=True)
    sid = t.open_stream()  # a head sent already (through the shortcut)
    # A second header block without END_STREAM is trailers that do not end: refused.
    assert t.call("send_headers", sid, [(b"x-t", b"1")]) is h2.exceptions.ProtocolError
    t.server_bytes()  # both encoded it before refusing, as h2 does
    assert t.call("send_headers", sid, [(b":status", b"100")],
                  end_stream=True) is h2.exceptions.ProtocolError
    other = t.open_stream()
    assert t.call("send_headers", other, [(b"x-t", b"1")], end_stream=True) is None
    t.states(other)
    assert t.call("send_headers", other, [(b"x-t", b"1")]) is not None  # closed
    reset = t.client.get_next_available_stream_id()
    t.client.send_headers(reset, REQUEST)
    t.client.reset_stream(reset, h2.errors.ErrorCodes.CANCEL)
    t.feed(t.client.data_to_send())
    assert t.call("send_headers", reset, RESPONSE) is h2.exceptions.StreamClosedError
    assert t.call("send_headers", 99, RESPONSE) is not None  # never opened by the peer
    t.server_bytes()


def test_after_an_error_goaway_a_response_head_is_refused_as_h2_refuses_it():
    t = Twins(raw_out=True)
    sid = t.client.get_next_available_stream_id()
    t.client.send_headers(sid, REQUEST)
    t.feed(t.client.data_to_send())
    with pytest.raises(h2.exceptions.ProtocolError):
        t.feed(_raw(0x4, 0, 1, b""))  # SETTINGS on a stream: connection error
    t.server_bytes()
    assert t.call("send_headers", sid, RESPONSE) is h2.exceptions.ProtocolError
    assert t.server_bytes() == b""


def test_a_client_or_a_normalizing_server_keeps_h2s_header_framing():
    assert not ProxyH2Connection(_config(True, raw_out=True), 1024)._frame_headers
    assert not ProxyH2Connection(_config(False), 1024)._frame_headers


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed-remote"])
def test_ending_a_stream_is_framed_as_h2_frames_it_and_refused_where_h2_refuses(half_closed):
    t = Twins()
    sid = t.open_stream(end=half_closed)
    assert t.call("send_data", sid, b"last") is None
    assert t.call("end_stream", sid) is None
    t.states(sid)
    kinds = [type(e) for e in t.client.receive_data(t.server_bytes())]
    assert kinds == [h2.events.DataReceived, h2.events.DataReceived, h2.events.StreamEnded]
    assert t.call("end_stream", sid) is not None  # ended already
    reset = t.open_stream()
    t.client.reset_stream(reset, h2.errors.ErrorCodes.CANCEL)
    t.feed(t.client.data_to_send())
    assert t.call("end_stream", reset) is not None
    t.states(reset)
    assert t.server_bytes() == b""

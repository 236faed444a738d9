"""The names of h2's internals that nodeproxy's one HTTP/2 integration overrides or reads
(nodeproxy/codec/h2_connection.py, driven by the L7 codec and the HBONE tunnel).
pyproject.toml bounds h2 below its next major version; this test fails, naming what went
away, if a release within the bound drops or reshapes one of them, instead of the proxy
misbehaving at run time."""

from __future__ import annotations

import ast
import inspect
import textwrap

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import h2.utilities
import hyperframe.frame
import pytest

# (object, method name, the parameters our override passes on)
OVERRIDDEN_METHODS = [
    (h2.connection.H2Connection, "_receive_frame", ["frame"]),
    (h2.connection.H2Connection, "_begin_new_stream", ["stream_id", "allowed_ids"]),
    (h2.connection.H2Connection, "get_next_available_stream_id", []),
    (h2.connection.H2Connection, "_terminate_connection", ["error_code"]),
    (h2.connection.H2Connection, "_receive_goaway_frame", ["frame"]),
    (h2.connection.H2Connection, "_receive_headers_frame", ["frame"]),
    (h2.connection.H2Connection, "_local_settings_acked", []),
    (h2.connection.H2Connection, "_open_streams", ["remainder"]),
    (h2.connection.H2Connection, "clear_outbound_data_buffer", []),
    (h2.connection.H2Connection, "close_connection",
     ["error_code", "additional_data", "last_stream_id"]),
    (h2.connection.H2Connection, "send_data", ["stream_id", "data", "end_stream", "pad_length"]),
    (h2.connection.H2Connection, "send_headers",
     ["stream_id", "headers", "end_stream", "priority_weight", "priority_depends_on",
      "priority_exclusive"]),
    (h2.connection.H2ConnectionStateMachine, "process_input", ["input_"]),
    (h2.frame_buffer.FrameBuffer, "__next__", []),
    (h2.frame_buffer.FrameBuffer, "_validate_frame_length", ["length"]),
]


@pytest.mark.parametrize(("owner", "name", "params"), OVERRIDDEN_METHODS,
                         ids=[f"{o.__name__}.{n}" for o, n, _ in OVERRIDDEN_METHODS])
def test_an_overridden_method_is_still_there_with_its_parameters(owner, name, params) -> None:
    method = getattr(owner, name, None)
    assert callable(method), f"h2 no longer has {owner.__name__}.{name}"
    found = [p for p in inspect.signature(method).parameters if p != "self"]
    assert found[:len(params)] == params, (owner.__name__, name, found)


def test_the_attributes_read_and_replaced_are_still_there() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    # codec/h2.py replaces these two and reads the decoder's header-list limit
    assert isinstance(conn.state_machine, h2.connection.H2ConnectionStateMachine)
    assert isinstance(conn.incoming_buffer, h2.frame_buffer.FrameBuffer)
    assert hasattr(conn.decoder, "max_header_list_size")
    assert isinstance(conn.streams, dict)
    assert hasattr(conn.state_machine, "state")
    buffer = conn.incoming_buffer
    assert isinstance(buffer._data, bytearray | bytes), type(buffer._data)
    assert isinstance(buffer._headers_buffer, list), type(buffer._headers_buffer)
    assert {"SEND_GOAWAY", "RECV_GOAWAY"} <= set(h2.connection.ConnectionInputs.__members__)
    assert "CLOSED" in h2.connection.ConnectionState.__members__


def test_receive_frame_is_still_the_shape_its_quiet_copy_repeats() -> None:
    """ProxyH2Connection._dispatch_frame is h2's _receive_frame without its first
    statement (the trace log's eager repr).  If h2 changes that method, the copy must be
    made again: this fails on any change to its statements."""
    source = textwrap.dedent(inspect.getsource(h2.connection.H2Connection._receive_frame))
    body = ast.parse(source).body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    body = [s for s in body if not isinstance(s, ast.AnnAssign)]  # `events: list[Event]`
    first = ast.unparse(body[0])
    assert first == "self.config.logger.trace('Received frame: %s', repr(frame))", first
    rest = "\n".join(ast.unparse(s) for s in body[1:])
    assert_all_in(rest, (
        "frames, events = self._frame_dispatch_table[frame.__class__](frame)",
        "except StreamClosedError as e:", "if self._stream_is_closed_by_reset(e.stream_id):",
        "f = RstStreamFrame(e.stream_id)", "f.error_code = e.error_code",
        "self._prepare_for_sending([f])", "events = e._events",
        "except StreamIDTooLowError as e:", "f.error_code = ErrorCodes.STREAM_CLOSED",
        "events = []", "elif self._stream_is_closed_by_end(e.stream_id):",
        "raise StreamClosedError(e.stream_id) from e",
        "self._prepare_for_sending(frames)", "return events",
    ))
    assert rest.count("except ") == 2 and rest.count("raise") == 3, rest
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    assert isinstance(conn._frame_dispatch_table, dict)
    for name in ("_stream_is_closed_by_reset", "_stream_is_closed_by_end",
                 "_prepare_for_sending"):
        assert callable(getattr(conn, name, None)), name
    assert hasattr(h2.exceptions.StreamClosedError(1), "_events")
    assert type(conn.config.logger) is h2.config.DummyLogger


def test_the_names_the_data_framing_reads_and_charges_are_still_there() -> None:
    """ProxyH2Connection.send_data frames DATA on open streams itself: it reads the states
    h2 allows DATA in and charges h2's window counters, and appends to h2's output."""
    assert {"OPEN", "HALF_CLOSED_REMOTE"} <= set(h2.stream.StreamState.__members__)
    assert {"CLIENT_OPEN", "SERVER_OPEN"} <= set(h2.connection.ConnectionState.__members__)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    assert isinstance(conn._data_to_send, bytearray)
    assert isinstance(conn.outbound_flow_control_window, int)
    assert isinstance(conn.max_outbound_frame_size, int)
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                          (":path", "/")])
    stream = conn.streams[1]
    assert isinstance(stream.outbound_flow_control_window, int)
    assert stream.state_machine.state is h2.stream.StreamState.OPEN
    assert conn.local_flow_control_window(1) == min(stream.outbound_flow_control_window,
                                                    conn.outbound_flow_control_window)


def test_the_header_checks_taken_over_are_still_h2s_to_switch_off() -> None:
    """codec/h2_header_checks.py makes h2's inbound header checks (h2_connection.py turns
    h2's off): the switch, the constant it shares and the order of a header block's
    events (the block's own first, PRIORITY's after it) must still be h2's."""
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    assert config.validate_inbound_headers is True
    assert {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
            b"upgrade"} == set(h2.utilities.CONNECTION_HEADERS)
    server = h2.connection.H2Connection(config)
    server.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/")], end_stream=True, priority_weight=200)
    data = client.data_to_send()
    frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
    frame.parse_body(memoryview(data[9:9 + length]))
    assert "PRIORITY" in frame.flags
    _, events = server._receive_headers_frame(frame)
    assert [type(e) for e in events] == [h2.events.RequestReceived, h2.events.StreamEnded,
                                         h2.events.PriorityUpdated], events


def _statements(function) -> str:
    source = textwrap.dedent(inspect.getsource(function))
    return "\n".join(ast.unparse(s) for s in ast.walk(ast.parse(source))
                     if isinstance(s, ast.stmt))


def assert_all_in(body: str, statements: tuple[str, ...]) -> None:
    """Every statement is in the function body (``_statements``); the missing ones named."""
    missing = [statement for statement in statements if statement not in body]
    assert not missing, missing


def test_the_response_head_framing_still_mirrors_h2s_send_headers() -> None:
    """ProxyH2Connection.send_headers frames a server's response head itself (and
    end_stream its END_STREAM frame), giving the state machines the inputs h2's
    methods give them, in their order; this fails if h2 changes what they do."""
    stream_send = _statements(h2.stream.H2Stream.send_headers)
    assert_all_in(stream_send, (
        "input_ = StreamInputs.SEND_HEADERS",
        "events = self.state_machine.process_input(input_)",
        "self.state_machine.process_input(StreamInputs.SEND_END_STREAM)",
        "frames[0].flags.add('END_STREAM')",
        "if self.state_machine.trailers_sent and (not end_stream):",
        "self.request_method = extract_method_header(bytes_headers)",
    ))
    build = _statements(h2.stream.H2Stream._build_headers_frames)
    assert_all_in(build, (
        "encoded_headers = encoder.encode(headers)",
        "frames[-1].flags.add('END_HEADERS')",
        "cf = ContinuationFrame(self.stream_id)",
    ))
    ending = _statements(h2.connection.H2Connection.end_stream) + \
        _statements(h2.stream.H2Stream.end_stream)
    assert_all_in(ending, (
        "self.state_machine.process_input(ConnectionInputs.SEND_DATA)",
        "self.state_machine.process_input(StreamInputs.SEND_END_STREAM)",
        "df.flags.add('END_STREAM')",
    ))
    conn_send = _statements(h2.connection.H2Connection.send_headers)
    assert "self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)" in conn_send
    assert {"SEND_HEADERS", "SEND_END_STREAM"} <= set(h2.stream.StreamInputs.__members__)
    machine = h2.stream.H2StreamStateMachine(1)
    assert machine.headers_sent is None or machine.headers_sent is False
    assert machine.trailers_sent is None or machine.trailers_sent is False
    assert h2.utilities.is_informational_response([(b":status", b"103")])
    assert not h2.utilities.is_informational_response([(b":status", b"200")])


def test_what_send_encoded_headers_drives_is_still_there() -> None:
    """codec/h2_connection.py send_encoded_headers: h2's states for a header block the
    tunnel encoded itself (tunnel/header_block.py)."""
    import h2.stream

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    assert isinstance(client._data_to_send, bytearray), type(client._data_to_send)
    assert isinstance(client.open_outbound_streams, int)
    assert "SEND_HEADERS" in h2.connection.ConnectionInputs.__members__
    assert {"SEND_HEADERS", "SEND_END_STREAM"} <= set(h2.stream.StreamInputs.__members__)
    found = [p for p in inspect.signature(client._get_or_create_stream).parameters]
    assert found == ["stream_id", "allowed_ids"], found
    stream = client._get_or_create_stream(1, h2.connection.AllowedStreamIDs(True))
    assert isinstance(stream, h2.stream.H2Stream)
    assert stream._authority is None and stream.request_method is None


def test_the_receive_paths_taken_over_still_mirror_h2s() -> None:
    """ProxyH2Connection.receive_end_stream and receive_known_response give h2's state
    machines the inputs h2's _receive_data_frame / _receive_headers_frame give them, and
    read what those read (content-length, headers_received, the frame buffer); this fails
    if h2 changes what they do."""
    data_frame = _statements(h2.connection.H2Connection._receive_data_frame) + \
        _statements(h2.stream.H2Stream.receive_data) + \
        _statements(h2.stream.H2Stream._track_content_length)
    assert_all_in(data_frame, (
        "events = self.state_machine.process_input(ConnectionInputs.RECV_DATA)",
        "events = self.state_machine.process_input(StreamInputs.RECV_DATA)",
        "es_events = self.state_machine.process_input(StreamInputs.RECV_END_STREAM)",
        "self._inbound_window_manager.window_consumed(flow_control_len)",
        "self._track_content_length(len(data), end_stream)",
        "expected = self._expected_content_length",
    ))
    headers_frame = _statements(h2.connection.H2Connection._receive_headers_frame) + \
        _statements(h2.stream.H2Stream.receive_headers)
    assert_all_in(headers_frame, (
        "headers = _decode_headers(self.decoder, frame.data)",
        "events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)",
        "events = self.state_machine.process_input(input_)",
        "input_ = StreamInputs.RECV_HEADERS",
        "self._initialize_content_length(headers)",
    ))
    received = _statements(h2.stream.H2StreamStateMachine.response_received)
    assert "if not self.headers_received:" in received, received
    assert "self.headers_received = True" in received, received
    assert {"OPEN", "HALF_CLOSED_LOCAL"} <= set(h2.stream.StreamState.__members__)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/")])
    stream = client.streams[1]
    assert stream._expected_content_length is None
    assert stream.state_machine.headers_received in (None, False)
    buffer = client.incoming_buffer
    assert not buffer._data and buffer._headers_buffer == []


def test_what_receive_known_request_mirrors_is_still_h2s() -> None:
    """ProxyH2Connection.receive_known_request gives h2's state machines the inputs h2's
    _receive_headers_frame gives them for a new request, after the checks h2 makes there
    (the stream limit, the stream id rules of _begin_new_stream), decodes only blocks
    hpack would decode the same (its static table), and knows what h2's pipeline does
    to a request's fields (cookies joined, content-length read, the fields checked and
    decoded); this fails if h2 or hpack change any of it."""
    import hpack.table

    headers_frame = _statements(h2.connection.H2Connection._receive_headers_frame)
    assert_all_in(headers_frame, (
        "max_open_streams = self.local_settings.max_concurrent_streams",
        "value = self.open_inbound_streams",
        "headers = _decode_headers(self.decoder, frame.data)",
        "events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)",
        "stream = self._get_or_create_stream(frame.stream_id, "
        "AllowedStreamIDs(not self.config.client_side))",
    ))
    new_stream = _statements(h2.connection.H2Connection._begin_new_stream)
    assert_all_in(new_stream, (
        "if stream_id <= highest_stream_id:",
        "if stream_id % 2 != int(allowed_ids):",
        "self.highest_inbound_stream_id = stream_id",
    ))
    receive = _statements(h2.stream.H2Stream.receive_headers)
    assert "self._initialize_content_length(headers)" in receive
    assert "headers_event.headers = self._process_received_headers(headers, " \
        "hdr_validation_flags, header_encoding)" in receive, receive
    assert "if n == b'content-length':" in \
        _statements(h2.stream.H2Stream._initialize_content_length)
    assert "if header[0] == b'cookie':" in _statements(h2.utilities._combine_cookie_fields)
    assert "event = RequestReceived(stream_id=self.stream_id)" in \
        _statements(h2.stream.H2StreamStateMachine.request_received)
    assert len(hpack.table.HeaderTable.STATIC_TABLE) == 61
    assert hpack.table.HeaderTable.STATIC_TABLE[1] == (b":method", b"GET")
    assert {"IDLE", "SERVER_OPEN"} <= set(h2.connection.ConnectionState.__members__)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    assert server.highest_inbound_stream_id == 0
    assert server.decoder.header_table_size == server.decoder.max_allowed_table_size


def test_what_the_direct_stream_steps_and_quiet_stream_opening_mirror_is_still_there() -> None:
    """codec/h2_stream_steps.py sets these attributes of h2's stream state machine;
    ProxyH2Connection._begin_new_stream and get_next_available_stream_id repeat h2's
    bodies without their logging and read settings as Settings.__getitem__ does.
    (tests/unit/test_h2_stream_steps.py compares the outcomes; this names the parts.)"""
    machine = h2.stream.H2StreamStateMachine(1)
    assert set(vars(machine)) == {"state", "stream_id", "client", "headers_sent",
                                  "trailers_sent", "headers_received", "trailers_received",
                                  "stream_closed_by"}
    assert hasattr(h2.stream, "_transitions")
    for name in ("request_sent", "response_sent", "request_received", "response_received",
                 "data_received", "stream_half_closed", "stream_ended", "send_end_stream"):
        assert callable(getattr(h2.stream.H2StreamStateMachine, name, None)), name
    source = inspect.getsource(h2.connection.H2Connection._begin_new_stream)
    for text in ("H2Stream(", "max_outbound_frame_size", "highest_outbound_stream_id",
                 "highest_inbound_stream_id", "StreamIDTooLowError", "self.streams[stream_id]"):
        assert text in source, text
    source = inspect.getsource(h2.connection.H2Connection.get_next_available_stream_id)
    assert "HIGHEST_ALLOWED_STREAM_ID" in source and "highest_outbound_stream_id" in source
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    assert isinstance(conn.local_settings._settings, dict)
    assert conn.local_settings._settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE][0] \
        == conn.local_settings.initial_window_size
    assert isinstance(conn.max_outbound_frame_size, int)  # an attribute h2 keeps


def test_the_open_stream_counts_go_through_open_streams() -> None:
    """ProxyH2Connection counts its shelved streams in `_open_streams`: h2's two counts
    (which its stream limits read) must still call it."""
    for prop in ("open_outbound_streams", "open_inbound_streams"):
        getter = getattr(h2.connection.H2Connection, prop).fget
        assert "self._open_streams(" in inspect.getsource(getter), prop
    stream = h2.stream.H2Stream(1, config=h2.config.H2Configuration(), inbound_window_size=1,
                                outbound_window_size=1)
    # ProxyH2Connection._twin sets these on the stream it makes again
    for name in ("_authority", "request_method", "max_outbound_frame_size"):
        assert hasattr(stream, name), name
    for name in ("state", "client", "headers_sent", "headers_received"):
        assert hasattr(stream.state_machine, name), name


def test_the_hpack_names_the_caching_coders_read_and_override_are_still_there() -> None:
    """codec/hpack_cache.py overrides hpack's public Encoder.encode and Decoder.decode,
    replaces h2's ``encoder`` and ``decoder`` attributes, and reads the dynamic table's
    state (a change it did not see would be a wrong kept result)."""
    import hpack
    import hpack.table

    for owner, name, params in ((hpack.Encoder, "encode", ["headers", "huffman"]),
                                (hpack.Decoder, "decode", ["data", "raw"])):
        found = [p for p in inspect.signature(getattr(owner, name)).parameters if p != "self"]
        assert found == params, (owner.__name__, name, found)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    assert type(conn.encoder) is hpack.Encoder and type(conn.decoder) is hpack.Decoder
    for coder in (hpack.Encoder(), hpack.Decoder()):
        table = coder.header_table
        assert isinstance(table, hpack.table.HeaderTable)
        assert len(table.dynamic_entries) == 0 and table.resized is False
        assert isinstance(table.maxsize, int)
        # an addition puts a new tuple object first
        table.add(b"a", b"b")
        first = table.dynamic_entries[0]
        table.add(b"a", b"b")
        assert table.dynamic_entries[0] == first and table.dynamic_entries[0] is not first
    decoder = hpack.Decoder()
    assert isinstance(decoder.max_header_list_size, int)
    assert isinstance(decoder.max_allowed_table_size, int)

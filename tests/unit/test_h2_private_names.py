"""The names of h2's internals that nodeproxy's one HTTP/2 integration overrides or reads
(nodeproxy/codec/h2_connection.py, driven by the L7 codec and the HBONE tunnel).
pyproject.toml bounds h2 below its next major version; this test fails, naming what went
away, if a release within the bound drops or reshapes one of them, instead of the proxy
misbehaving at run time."""

from __future__ import annotations

import inspect

import h2.config
import h2.connection
import h2.frame_buffer
import pytest

# (object, method name, the parameters our override passes on)
OVERRIDDEN_METHODS = [
    (h2.connection.H2Connection, "_receive_frame", ["frame"]),
    (h2.connection.H2Connection, "_terminate_connection", ["error_code"]),
    (h2.connection.H2Connection, "_receive_goaway_frame", ["frame"]),
    (h2.connection.H2Connection, "_local_settings_acked", []),
    (h2.connection.H2Connection, "clear_outbound_data_buffer", []),
    (h2.connection.H2Connection, "close_connection",
     ["error_code", "additional_data", "last_stream_id"]),
    (h2.connection.H2Connection, "send_data", ["stream_id", "data", "end_stream", "pad_length"]),
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

"""The one h2 integration of the proxy: the H2Connection both the L7 codec (codec/h2.py)
and the HBONE tunnel (tunnel/session.py) drive, with what h2 lacks for a proxy.

- A graceful GOAWAY (NO_ERROR, sent or received) leaves the connection open for the streams
  it lets finish; h2 alone treats any GOAWAY as the end and refuses every further frame
  (python-hyper/h2#1181).  Only an error GOAWAY closes it.
- A frame's length is checked from its header, before the frame is buffered.
- An undecodable header block is COMPRESSION_ERROR (RFC 9113 §4.3; h2 says
  PROTOCOL_ERROR); the header-list limit is the caller's and survives SETTINGS.
- On a server, a FrameGuard (h2_guard.py) sees each frame before h2 acts on it.

It overrides private methods of h2 (tests/unit/test_h2_private_names.py names each, and
fails if a release within pyproject.toml's bound drops or reshapes one).
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import Frame

from nodeproxy.codec.h2_guard import FrameGuard

ErrorCodes = h2.errors.ErrorCodes
_Connection_States = h2.connection.ConnectionState
_Inputs = h2.connection.ConnectionInputs
_HEADERS, _CONTINUATION = 0x1, 0x9  # frame types
_END_STREAM, _END_HEADERS = 0x1, 0x4  # flags
_StreamInputs = h2.stream.StreamInputs


class GracefulStateMachine(h2.connection.H2ConnectionStateMachine):
    """Stays open across a graceful GOAWAY (sent with NO_ERROR, or received)."""

    terminating = False

    def process_input(self, input_: h2.connection.ConnectionInputs) -> list[h2.events.Event]:
        if (input_ in (_Inputs.SEND_GOAWAY, _Inputs.RECV_GOAWAY) and not self.terminating
                and self.state != _Connection_States.CLOSED):
            return []
        return super().process_input(input_)


class CheckedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer checks a frame's length once the whole frame has arrived: check it
    from the header, so an overlong frame is refused before it is buffered."""

    def __next__(self) -> Any:
        if len(self._data) >= 9:
            try:
                _, length = Frame.parse_frame_header(memoryview(self._data[:9]))
            except (InvalidDataError, InvalidFrameError):
                pass  # h2's own __next__ reports it
            else:
                self._validate_frame_length(length)
        return super().__next__()

    @property
    def head_pending(self) -> bool:
        """Has a header block begun and not ended (HEADERS without END_HEADERS and its
        CONTINUATIONs, or such a frame, or any frame header, partly received)?  The
        request-header timeout runs meanwhile."""
        if self._headers_buffer:
            return True
        if not self._data:
            return False
        return len(self._data) < 9 or self._data[3] in (_HEADERS, _CONTINUATION)


class ProxyH2Connection(h2.connection.H2Connection):
    """H2Connection with a graceful GOAWAY, COMPRESSION_ERROR for undecodable header
    blocks (h2 says PROTOCOL_ERROR), a header-list limit of our own (see H2Server) and,
    on a server, a FrameGuard that sees each frame first (h2_guard.py)."""

    def __init__(self, config: h2.config.H2Configuration, header_limit: int):
        super().__init__(config=config)
        self.state_machine = GracefulStateMachine()
        self.incoming_buffer = CheckedFrameBuffer(server=not config.client_side)
        self._header_limit = header_limit
        self.decoder.max_header_list_size = header_limit
        self._keep_outbound = False
        self.guard: FrameGuard | None = None
        # The last stream handed to a handler: an ENHANCE_YOUR_CALM GOAWAY names it, not
        # streams h2 parsed in the same read whose requests were never started.
        self.processed_stream_id: int | None = None

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        if error_code:
            self.state_machine.terminating = True
        super().close_connection(error_code, additional_data, last_stream_id)

    def _terminate_connection(self, error_code: h2.errors.ErrorCodes) -> None:
        self.state_machine.terminating = True
        if error_code == ErrorCodes.ENHANCE_YOUR_CALM and self.processed_stream_id is not None:
            self.close_connection(error_code, last_stream_id=self.processed_stream_id)
            return
        super()._terminate_connection(error_code)

    @property
    def terminated(self) -> bool:
        """An error GOAWAY has been queued."""
        return self.state_machine.terminating

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        if self.guard is not None:
            self.guard.frame(frame)  # Abuse: h2 sends GOAWAY ENHANCE_YOUR_CALM
        try:
            return super()._receive_frame(frame)
        except h2.exceptions.ProtocolError as e:
            cause = e.__cause__
            if isinstance(cause, HPACKError) and not isinstance(cause, OversizedHeaderListError):
                e.error_code = ErrorCodes.COMPRESSION_ERROR  # RFC 9113 4.3
            raise

    def _receive_goaway_frame(self, frame: Any) -> Any:
        # h2 drops queued output on a GOAWAY (a SETTINGS ACK, WINDOW_UPDATEs); streams
        # below the last stream id still need it.
        self._keep_outbound = True
        try:
            return super()._receive_goaway_frame(frame)
        finally:
            self._keep_outbound = False

    def send_encoded_headers(self, stream_id: int, block: bytes, *, end_stream: bool = False,
                             method: bytes | None = None, authority: bytes | None = None
                             ) -> None:
        """send_headers for a header block encoded by the caller without the dynamic table
        (tunnel/header_block.py): one HEADERS frame, h2's connection and stream states as
        send_headers leaves them, the encoder untouched; a client passes the request's
        method and authority, which h2 keeps on the stream.  A request or a final
        response only (no informational response, no trailers)."""
        if len(block) > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"a {len(block)}-byte header block in one frame")
        if stream_id not in self.streams:
            value = self.open_outbound_streams
            if value + 1 > self.remote_settings.max_concurrent_streams:
                raise h2.exceptions.TooManyStreamsError(
                    f"Max outbound streams is {self.remote_settings.max_concurrent_streams}, "
                    f"{value} open")
        self.state_machine.process_input(_Inputs.SEND_HEADERS)
        stream = self._get_or_create_stream(
            stream_id, h2.connection.AllowedStreamIDs(self.config.client_side))
        stream.state_machine.process_input(_StreamInputs.SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(_StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        if self.config.client_side:
            if stream._authority is None:
                stream._authority = authority
            stream.request_method = method
        length = len(block)
        self._data_to_send += bytes((length >> 16, (length >> 8) & 0xFF, length & 0xFF,
                                     _HEADERS, flags)) + stream_id.to_bytes(4, "big") + block

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False,
                  pad_length: Any = None) -> None:
        super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        if self.guard is not None and data:
            self.guard.data_frame_sent()

    def clear_outbound_data_buffer(self) -> None:
        if not self._keep_outbound:
            super().clear_outbound_data_buffer()

    def _local_settings_acked(self) -> Any:
        changes = super()._local_settings_acked()
        self.decoder.max_header_list_size = self._header_limit  # h2 resets it to ours
        return changes

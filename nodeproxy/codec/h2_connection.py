"""The one h2 integration of the proxy: the H2Connection both the L7 codec (codec/h2.py)
and the HBONE tunnel (tunnel/session.py) drive, with what h2 lacks for a proxy.

- A graceful GOAWAY (NO_ERROR, sent or received) leaves the connection open for the streams
  it lets finish; h2 alone treats any GOAWAY as the end and refuses every further frame
  (python-hyper/h2#1181).  Only an error GOAWAY closes it.
- A frame's length is checked from its header, before the frame is buffered.
- An undecodable header block is COMPRESSION_ERROR (RFC 9113 §4.3; h2 says
  PROTOCOL_ERROR); the header-list limit is the caller's and survives SETTINGS.
- On a server, a FrameGuard (h2_guard.py) sees each frame before h2 acts on it.
- A frame whose outcome is fixed is handled without h2's frame parser, with h2's state
  machines given the inputs its handler would give them: END_STREAM without payload on
  an open stream (receive_end_stream); on a client, a final response whose header
  block is a known static-table reference (receive_known_response); on a server, a
  request on a new stream whose header block neither reads nor changes HPACK's dynamic
  table (receive_known_request, hpack_static.py), its fields checked as h2 checks them
  and the FrameGuard told as h2's frame loop tells it.  Any other state (a closed or
  reset stream, a declared content-length, a header block open, a block that touches
  the dynamic table) is h2's, so a peer gets the same answer as before.
- With ``cache_hpack`` (the L7 codec), HPACK results that leave the dynamic table as it
  was are kept while it stays so (hpack_cache.py): a repeated header block is not
  decoded, nor a repeated head encoded, again.
- Per-frame work h2 does for nothing is skipped: a received frame is not formatted for a
  trace log that is off (h2 calls ``repr(frame)`` eagerly), a frame's header is read once
  more for its length only, and DATA on an open stream within the peer's windows (and the
  empty DATA frame that ends a stream) is framed here (codec/h2_frames.py) with h2's own
  window counters charged and state machines driven, as h2 would; every other case
  (padding, a closed stream, a window overrun) is h2's to frame or refuse.

- An open stream whose HBONE flow sleeps may have its H2Stream dropped (shelve) where it
  is exactly what this connection would make again from its current settings and the
  stream's authority, counted open meanwhile (_open_streams), and made again (unshelve)
  before any frame or call for it reaches h2 (tunnel/session.py, tcp/half_sleep.py).

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
import h2.settings
import h2.stream
import h2.utilities
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import RstStreamFrame

from nodeproxy.codec import h2_frames, h2_stream_steps, hpack_static
from nodeproxy.codec.h2_guard import FrameGuard
from nodeproxy.codec.h2_header_checks import check_received
from nodeproxy.codec.hpack_cache import CachingDecoder, CachingEncoder

ErrorCodes = h2.errors.ErrorCodes
_Connection_States = h2.connection.ConnectionState
_Inputs = h2.connection.ConnectionInputs
_HEADERS, _CONTINUATION = 0x1, 0x9  # frame types
_END_STREAM, _END_HEADERS = 0x1, 0x4  # flags
_StreamInputs = h2.stream.StreamInputs
# Where DATA may be sent without END_STREAM (h2's SEND_DATA transitions, which change
# nothing in these states).
_DATA_STREAM_STATES = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
_DATA_CONNECTION_STATES = (_Connection_States.CLIENT_OPEN, _Connection_States.SERVER_OPEN)
# Where END_STREAM may be received (h2's RECV_DATA and RECV_END_STREAM transitions: to
# half-closed (remote) or closed).
_END_STREAM_STATES = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)
# Response header blocks whose fields are known without decoding them: static-table
# references only (RFC 7541 Appendix A: index 8 is ":status: 200"), which leave the
# decoder's dynamic table as it was whatever its state, and whose fields pass every
# check h2 makes of a response.
KNOWN_RESPONSE_BLOCKS: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {
    b"\x88": ((b":status", b"200"),),
}
# Each known block's header-list size as hpack counts it (RFC 7541 §4.1: name, value and
# 32 per field), which the decoder's limit must allow, as decoding it would check.
# Where a server may receive a request (h2's RECV_HEADERS transitions: the first one
# opens the connection, IDLE to SERVER_OPEN).
_REQUEST_STATES = (_Connection_States.IDLE, _Connection_States.SERVER_OPEN)
# Fields h2 acts on when it takes a request's header block (a declared body length, the
# cookie fields it joins): a block with one is h2's to take.
_H2_ACTS_ON = frozenset({b"content-length", b"cookie"})
_INITIAL_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
_MAX_CONCURRENT_STREAMS = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
_NO_STREAM_LIMIT = 2**32 + 1  # h2's max_concurrent_streams when the peer sets none
# h2's AllowedStreamIDs(client_side), looked up rather than made by Enum's __call__.
_ALLOWED_IDS = {True: h2.connection.AllowedStreamIDs.ODD,
                False: h2.connection.AllowedStreamIDs.EVEN}
_KNOWN_RESPONSE_SIZES = {block: sum(len(name) + len(value) + 32 for name, value in fields)
                         for block, fields in KNOWN_RESPONSE_BLOCKS.items()}


def _same_stream(stream: h2.stream.H2Stream, twin: h2.stream.H2Stream) -> bool:
    """Are two H2Streams the same state: every attribute of the stream, its state
    machine and its window manager equal in type and value (the config the same one)?"""
    mine, theirs = vars(stream), vars(twin)
    if mine.keys() != theirs.keys():
        return False
    for name, value in mine.items():
        other = theirs[name]
        if name == "config":
            if value is not other:
                return False
        elif name in ("state_machine", "_inbound_window_manager"):
            if type(value) is not type(other) or not _same_values(vars(value), vars(other)):
                return False
        elif type(value) is not type(other) or value != other:
            return False
    return True


def _same_values(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    return mine.keys() == theirs.keys() and all(
        type(value) is type(theirs[name]) and value == theirs[name]
        for name, value in mine.items())


def _setting(settings: h2.settings.Settings, code: h2.settings.SettingCodes) -> int | None:
    """A setting's current value as h2's Settings reads it (``Settings.__getitem__``:
    the first of its deque), None where h2 raises KeyError (unset)."""
    values = settings._settings.get(code)
    return None if values is None else values[0]


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
        data = self._data
        if len(data) >= 9:
            # The 24-bit length only: h2's __next__ parses the header (and reports a bad
            # one) right after; building its Frame twice was a per-frame cost.
            self._validate_frame_length((data[0] << 16) | (data[1] << 8) | data[2])
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

    def __init__(self, config: h2.config.H2Configuration, header_limit: int, *,
                 cache_hpack: bool = False):
        # h2's inbound header checks are made by check_received instead (same verdicts,
        # one pass) where h2 hands header blocks over as bytes.
        self._check_headers = bool(config.validate_inbound_headers) and \
            not isinstance(config.header_encoding, str)
        if self._check_headers:
            config.validate_inbound_headers = False
        super().__init__(config=config)
        self.state_machine = GracefulStateMachine()
        self.incoming_buffer = CheckedFrameBuffer(server=not config.client_side)
        if cache_hpack:  # the L7 codec: header blocks that repeat (hpack_cache.py)
            self.encoder = CachingEncoder()
            self.decoder = CachingDecoder(self.decoder.max_header_list_size)
        self._header_limit = header_limit
        self.decoder.max_header_list_size = header_limit
        self._keep_outbound = False
        # Open streams shelved (see shelve), by stream id parity: h2's counts add them.
        self._shelved = [0, 0]
        self.guard: FrameGuard | None = None
        # The last stream handed to a handler: an ENHANCE_YOUR_CALM GOAWAY names it, not
        # streams h2 parsed in the same read whose requests were never started.
        self.processed_stream_id: int | None = None
        # No trace log to format received frames for (see _dispatch_frame).
        self._quiet = type(config.logger) is h2.config.DummyLogger
        self._client_side = bool(config.client_side)  # not a descriptor call per stream
        # h2 would send header fields as given: a response head can be framed here.
        self._frame_headers = not (config.client_side or config.normalize_outbound_headers
                                   or config.validate_outbound_headers)

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
            if self._quiet:
                return self._dispatch_frame(frame)
            return super()._receive_frame(frame)
        except h2.exceptions.ProtocolError as e:
            cause = e.__cause__
            if isinstance(cause, HPACKError) and not isinstance(cause, OversizedHeaderListError):
                e.error_code = ErrorCodes.COMPRESSION_ERROR  # RFC 9113 4.3
            raise

    def _dispatch_frame(self, frame: Any) -> list[h2.events.Event]:
        """h2's _receive_frame without its first line, ``logger.trace("Received frame: %s",
        repr(frame))``: h2 formats every frame for a trace log that is off (the default
        DummyLogger; with a logger configured, h2's own method runs).  The rest is h2's
        handling, the same (tests/unit/test_h2_private_names.py fails if h2's changes)."""
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # Closed by our RST_STREAM: a stream error (RST_STREAM again); otherwise a
            # connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            # A stream already forgotten: closed by RST_STREAM, a stream error; by
            # END_STREAM, a connection error (STREAM_CLOSED); implicitly, PROTOCOL_ERROR.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: Any) -> Any:
        frames, events = super()._receive_headers_frame(frame)
        if self._check_headers and events:
            first = events[0]  # the header block's event; PRIORITY's follows it
            kind = type(first)
            if kind is h2.events.RequestReceived:
                check_received(first.headers, request=True, trailer=False)
            elif kind is h2.events.TrailersReceived:
                check_received(first.headers, request=not self.config.client_side,
                               trailer=True)
            elif kind in (h2.events.ResponseReceived,
                          h2.events.InformationalResponseReceived):
                check_received(first.headers, request=False, trailer=False)
        return frames, events

    def _receive_goaway_frame(self, frame: Any) -> Any:
        # h2 drops queued output on a GOAWAY (a SETTINGS ACK, WINDOW_UPDATEs); streams
        # below the last stream id still need it.
        self._keep_outbound = True
        try:
            return super()._receive_goaway_frame(frame)
        finally:
            self._keep_outbound = False

    def receive_end_stream(self, stream_id: int) -> bool:
        """An empty DATA frame with END_STREAM on `stream_id`, judged (FrameGuard) and
        flow-controlled (no payload) by the caller: handled as h2's _receive_data_frame
        would, without a Frame, where its outcome is fixed (the stream open or half-closed
        (local) after its headers, no content-length to check, the connection open, no
        frame partly parsed).  Its StreamEnded is the caller's to act on.  False: nothing
        was done, the frame is h2's to handle (refuse)."""
        stream = self.streams.get(stream_id)
        if (stream is None or not self._idle_buffer()
                or self.state_machine.state not in _DATA_CONNECTION_STATES):
            return False
        machine = stream.state_machine
        if (machine.state not in _END_STREAM_STATES or not machine.headers_received
                or stream._expected_content_length is not None):
            return False
        if not h2_stream_steps.received_end_stream(machine):  # the same, directly
            self.state_machine.process_input(_Inputs.RECV_DATA)
            machine.process_input(_StreamInputs.RECV_DATA)  # DataReceived: no bytes
            machine.process_input(_StreamInputs.RECV_END_STREAM)  # StreamEnded
        return True

    def receive_known_response(self, stream_id: int, block: bytes) -> Any:
        """A client's HEADERS frame with END_HEADERS alone (no END_STREAM, padding or
        priority: the caller read the flags) whose header block is one of
        KNOWN_RESPONSE_BLOCKS: the ResponseReceived h2's _receive_headers_frame would give,
        with the same state changes, where its outcome is fixed (the stream open, no
        response yet, the connection open, no frame partly parsed, no guard, the block
        within the decoder's table size and header-list limit).  None: nothing was done,
        the frame is h2's."""
        fields = KNOWN_RESPONSE_BLOCKS.get(block)
        stream = self.streams.get(stream_id)
        if (fields is None or stream is None or not self.config.client_side
                or self.guard is not None or not self._idle_buffer()
                or self.state_machine.state not in _DATA_CONNECTION_STATES):
            return None
        machine = stream.state_machine
        if machine.state not in _END_STREAM_STATES or machine.headers_received:
            return None
        # hpack's checks at the end of any block: a table size this side lowered (and the
        # peer never acknowledged with a size update) or a header-list limit below the
        # block's size refuse it (COMPRESSION_ERROR, ENHANCE_YOUR_CALM): h2's to answer.
        decoder = self.decoder
        if (decoder.header_table_size > decoder.max_allowed_table_size
                or _KNOWN_RESPONSE_SIZES[block] > decoder.max_header_list_size):
            return None
        # The connection's RECV_HEADERS changes nothing in an open state (checked above).
        event = h2_stream_steps.received_response(machine)
        if event is None:
            self.state_machine.process_input(_Inputs.RECV_HEADERS)
            event = machine.process_input(_StreamInputs.RECV_HEADERS)[0]  # ResponseReceived
        encoding = self.config.header_encoding
        event.headers = [(name.decode(encoding), value.decode(encoding))
                         for name, value in fields] if encoding else list(fields)
        return event

    def receive_known_request(self, stream_id: int, block: bytes) -> Any:
        """A server's HEADERS frame with END_HEADERS alone (no END_STREAM, padding or
        priority: the caller read the flags) opening a new stream with a header block
        that neither reads nor changes HPACK's dynamic table (hpack_static.py: static
        references and literals without indexing, no Huffman): the RequestReceived h2's
        _receive_headers_frame would give, with the same state changes, the FrameGuard
        told first as h2's frame loop tells it.  Only where the outcome is fixed: the
        connection open, no frame or header block partly parsed, the stream id new, odd
        and above every stream the peer opened, room under our stream limit without
        counting, the block within the decoder's table size and header-list limit, no
        content-length or cookie field (h2 acts on those), fields h2's checks accept and
        UTF-8 (the tunnel's header encoding).  None: nothing was done (the guard not
        told), the frame is h2's, which answers it as it always did.  A budget the guard
        finds spent is raised as h2 raises it: its GOAWAY queued."""
        if (self.config.client_side or self.state_machine.state not in _REQUEST_STATES
                or stream_id % 2 != 1
                or stream_id <= self.highest_inbound_stream_id or stream_id in self.streams
                or not self._idle_buffer() or self.config.header_encoding != "utf-8"):
            return None
        # h2 counts the open streams (walking them all) when its dict could hold the
        # limit; below that the count cannot reach it.
        limit = _setting(self.local_settings, _MAX_CONCURRENT_STREAMS)
        if len(self.streams) + self.shelved + 1 > \
                (_NO_STREAM_LIMIT if limit is None else limit):
            return None
        fields = hpack_static.static_fields(block)
        if fields is None:
            return None
        size = 0  # the header list's size as the decoder's limit counts it (list_size)
        for name, value in fields:
            if name in _H2_ACTS_ON:
                return None
            size += len(name) + len(value) + 32
        decoder = self.decoder
        if (decoder.header_table_size > decoder.max_allowed_table_size
                or size > decoder.max_header_list_size):
            return None
        try:
            check_received(fields, request=True, trailer=False)
            headers = [(name.decode(), value.decode()) for name, value in fields]
        except (h2.exceptions.ProtocolError, UnicodeDecodeError):
            return None
        guard = self.guard
        if guard is not None:
            try:
                guard.headers(stream_id)
            except h2.exceptions.ProtocolError as e:  # Abuse: as h2's receive_data does
                self._terminate_connection(e.error_code)
                raise
        if not h2_stream_steps.connection_open(self.state_machine):
            self.state_machine.process_input(_Inputs.RECV_HEADERS)  # IDLE: SERVER_OPEN
        stream = self._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
        machine = stream.state_machine
        event = h2_stream_steps.received_request(machine)  # a new stream: always taken
        if event is None:
            event = machine.process_input(_StreamInputs.RECV_HEADERS)[0]
        event.headers = headers  # RequestReceived
        return event

    def _begin_new_stream(self, stream_id: int,
                          allowed_ids: h2.connection.AllowedStreamIDs) -> h2.stream.H2Stream:
        """h2's _begin_new_stream without its three ``logger.debug`` calls (one formats
        every stream id's dict view) when the logger is h2's DummyLogger: the same checks,
        the same H2Stream, the same highest-id bookkeeping (with a logger configured, h2's
        own method runs)."""
        if not self._quiet:
            return super()._begin_new_stream(stream_id, allowed_ids)
        client = self._client_side
        outbound = stream_id % 2 == client
        highest_stream_id = (self.highest_outbound_stream_id if outbound
                             else self.highest_inbound_stream_id)
        if stream_id <= highest_stream_id:
            raise h2.exceptions.StreamIDTooLowError(stream_id, highest_stream_id)
        if stream_id % 2 != int(allowed_ids):
            raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
        # The two windows as h2's properties read them (Settings.__getitem__: the
        # deque's first value), without the two Python calls each.
        inbound = _setting(self.local_settings, _INITIAL_WINDOW_SIZE)
        outbound_window = _setting(self.remote_settings, _INITIAL_WINDOW_SIZE)
        if inbound is None or outbound_window is None:
            return super()._begin_new_stream(stream_id, allowed_ids)  # h2's KeyError
        stream = h2.stream.H2Stream(stream_id, config=self.config,
                                    inbound_window_size=inbound,
                                    outbound_window_size=outbound_window)
        stream.max_outbound_frame_size = self.max_outbound_frame_size  # h2's attribute
        self.streams[stream_id] = stream
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return stream

    def get_next_available_stream_id(self) -> int:
        """h2's, without its ``logger.debug`` call when the logger is h2's DummyLogger."""
        if not self._quiet:
            return super().get_next_available_stream_id()
        highest = self.highest_outbound_stream_id
        if not highest:
            next_stream_id = 1 if self._client_side else 2
        else:
            next_stream_id = highest + 2
        if next_stream_id > self.HIGHEST_ALLOWED_STREAM_ID:
            raise h2.exceptions.NoAvailableStreamIDError("Exhausted allowed stream IDs")
        return next_stream_id

    # -- streams shelved while their flows sleep ---------------------------------

    def shelve(self, stream_id: int) -> bool:
        """Drop the H2Stream of an open tunnel stream whose flow sleeps (its state machine,
        window manager and slot in `streams`, about 0.55 KiB), where the stream is
        exactly what `_twin` makes again from the connection's current settings and its
        authority: open both ways after its request and response, h2's window counters
        untouched (the tunnel frames DATA and WINDOW_UPDATE itself), nothing else of it
        changed.  The caller keeps the authority and calls `unshelve` before any frame
        or call for the stream reaches h2.  While shelved the stream is counted open
        (`_open_streams`, the stream limits).  False: nothing was done."""
        stream = self.streams.get(stream_id)
        if (stream is None or not self._idle_buffer()
                or self.state_machine.state not in _DATA_CONNECTION_STATES):
            return False
        twin = self._twin(stream_id, stream._authority)
        if twin is None or not _same_stream(stream, twin):
            return False
        del self.streams[stream_id]
        self._shelved[stream_id % 2] += 1
        return True

    def unshelve(self, stream_id: int, authority: bytes | None) -> None:
        """The shelved stream's H2Stream made again, as h2 would hold it now: what it was
        when shelved, with the SETTINGS changes since applied as h2 applies them to every
        stream it holds (INITIAL_WINDOW_SIZE both ways, MAX_FRAME_SIZE)."""
        twin = self._twin(stream_id, authority)
        if twin is None or stream_id in self.streams:  # cannot be: shelve checked both
            raise h2.exceptions.ProtocolError(f"stream {stream_id} cannot be restored")
        self._shelved[stream_id % 2] -= 1
        self.streams[stream_id] = twin

    def _twin(self, stream_id: int, authority: bytes | None) -> h2.stream.H2Stream | None:
        """An open tunnel stream's H2Stream as h2 leaves it after the CONNECT request and
        its response (h2's _begin_new_stream, then request_sent and response_received on
        a client, request_received and response_sent on a server), with h2's windows
        at the current initial sizes; None for a stream id that is not a request's."""
        if stream_id % 2 != 1:
            return None
        inbound = _setting(self.local_settings, _INITIAL_WINDOW_SIZE)
        outbound = _setting(self.remote_settings, _INITIAL_WINDOW_SIZE)
        if inbound is None or outbound is None:
            return None
        stream = h2.stream.H2Stream(stream_id, config=self.config,
                                    inbound_window_size=inbound,
                                    outbound_window_size=outbound)
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        machine = stream.state_machine
        machine.state = h2.stream.StreamState.OPEN
        machine.client = self._client_side
        machine.headers_sent = True
        machine.headers_received = True
        if self._client_side:
            stream.request_method = b"CONNECT"
            stream._authority = authority
        return stream

    def _open_streams(self, remainder: int) -> int:
        """h2's count of open streams of a parity (it culls closed ones as it walks),
        with the shelved ones, which are open."""
        return super()._open_streams(remainder) + self._shelved[remainder]

    @property
    def shelved(self) -> int:
        """How many streams are shelved (counted open, not in `streams`)."""
        return self._shelved[0] + self._shelved[1]

    def forget_closed(self, stream_id: int) -> None:
        """Drop a closed stream as h2 drops them when it next counts open streams
        (_open_streams: its closing kept for the frames that may still come on it), so
        the count walks live streams only."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by

    def _idle_buffer(self) -> bool:
        """Has h2 no frame or header block partly received?"""
        buffer = self.incoming_buffer
        return not buffer._data and not buffer._headers_buffer

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False,
                     priority_weight: Any = None, priority_depends_on: Any = None,
                     priority_exclusive: Any = None) -> None:
        """h2's send_headers; a server's final response head or trailer section (fields as
        bytes, h2's outbound checks off) on an open stream is encoded and framed here,
        with the connection's and the stream's state machines given h2's inputs: the
        same bytes and states, without h2's Frame objects and header pipelines."""
        stream = self.streams.get(stream_id)
        if (not self._frame_headers or stream is None or not headers
                or priority_weight is not None or priority_depends_on is not None
                or priority_exclusive is not None
                or stream.state_machine.state not in _DATA_STREAM_STATES
                or h2.utilities.is_informational_response(headers)):
            super().send_headers(stream_id, headers, end_stream, priority_weight,
                                 priority_depends_on, priority_exclusive)
            return
        self.state_machine.process_input(_Inputs.SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(_StreamInputs.SEND_HEADERS)  # a response, or its trailers
        block = self.encoder.encode(headers)
        if end_stream:
            machine.process_input(_StreamInputs.SEND_END_STREAM)
        if machine.trailers_sent and not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        # h2 also sets stream.request_method from these fields: None for a response
        # (no :method), as it already is on a server's stream (h2 reads it for a
        # client's responses only).
        size = self.max_outbound_frame_size
        out = self._data_to_send
        first = block[:size]
        flags = (_END_STREAM if end_stream else 0) | (_END_HEADERS if len(block) <= size else 0)
        out += h2_frames.header(len(first), h2_frames.HEADERS, flags, stream_id)
        out += first
        for at in range(size, len(block), size):
            piece = block[at:at + size]
            last = at + size >= len(block)
            out += h2_frames.header(len(piece), h2_frames.CONTINUATION,
                                    _END_HEADERS if last else 0, stream_id)
            out += piece

    def end_stream(self, stream_id: int) -> None:
        """h2's end_stream; on an open stream the empty END_STREAM DATA frame is framed
        here, the state machines given h2's inputs (SEND_DATA, SEND_END_STREAM)."""
        stream = self.streams.get(stream_id)
        if (stream is None or stream.state_machine.state not in _DATA_STREAM_STATES
                or self.state_machine.state not in _DATA_CONNECTION_STATES):
            super().end_stream(stream_id)
            return
        # The connection's SEND_DATA changes nothing in an open state (checked above).
        if not h2_stream_steps.sent_end_stream(stream.state_machine):
            self.state_machine.process_input(_Inputs.SEND_DATA)
            stream.state_machine.process_input(_StreamInputs.SEND_END_STREAM)
        self._data_to_send += h2_frames.empty_data(stream_id, True)

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
        stream = self.streams.get(stream_id)
        if stream is None:
            limit = _setting(self.remote_settings, _MAX_CONCURRENT_STREAMS)
            if limit is None:
                limit = _NO_STREAM_LIMIT  # h2's max_concurrent_streams, unset
            # Every open stream is in self.streams (closed ones too until culled): below
            # the limit there, the exact count (which walks them all) cannot reach it.
            if len(self.streams) + self.shelved + 1 > limit:
                value = self.open_outbound_streams
                if value + 1 > limit:
                    raise h2.exceptions.TooManyStreamsError(
                        f"Max outbound streams is {limit}, {value} open")
        client = self._client_side
        if not h2_stream_steps.connection_open(self.state_machine):
            self.state_machine.process_input(_Inputs.SEND_HEADERS)
            stream = self._get_or_create_stream(stream_id, _ALLOWED_IDS[client])
            stream.state_machine.process_input(_StreamInputs.SEND_HEADERS)
        else:
            # The connection's SEND_HEADERS changes nothing in an open state; the stream
            # takes h2's steps for a request on a new stream or a response directly.
            if stream is None:
                stream = self._begin_new_stream(stream_id, _ALLOWED_IDS[client])
            machine = stream.state_machine
            if not (h2_stream_steps.sent_request(machine) if client
                    else h2_stream_steps.sent_response(machine)):
                machine.process_input(_StreamInputs.SEND_HEADERS)  # h2's answer
        flags = _END_HEADERS
        if end_stream:
            if not h2_stream_steps.sent_end_stream(stream.state_machine):
                stream.state_machine.process_input(_StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        if client:
            if stream._authority is None:
                stream._authority = authority
            stream.request_method = method
        length = len(block)
        self._data_to_send += bytes((length >> 16, (length >> 8) & 0xFF, length & 0xFF,
                                     _HEADERS, flags)) + stream_id.to_bytes(4, "big") + block

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False,
                  pad_length: Any = None) -> None:
        """h2's send_data; DATA without END_STREAM or padding on an open stream, within the
        peer's windows and frame size, is framed here instead of by h2's Frame objects and
        state machines: the same bytes, the same window accounting (h2's counters are
        charged), no state changes (h2 makes none for such a frame)."""
        size = len(data)
        stream = self.streams.get(stream_id)
        if (end_stream or pad_length is not None or not size or stream is None
                or stream.state_machine.state not in _DATA_STREAM_STATES
                or self.state_machine.state not in _DATA_CONNECTION_STATES
                or size > stream.outbound_flow_control_window
                or size > self.outbound_flow_control_window
                or size > self.max_outbound_frame_size):
            super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        else:
            stream.outbound_flow_control_window -= size
            self.outbound_flow_control_window -= size
            out = self._data_to_send
            out += h2_frames.data_header(size, stream_id)
            out += data
        if self.guard is not None and size:
            self.guard.data_frame_sent()

    def clear_outbound_data_buffer(self) -> None:
        if not self._keep_outbound:
            super().clear_outbound_data_buffer()

    def _local_settings_acked(self) -> Any:
        changes = super()._local_settings_acked()
        self.decoder.max_header_list_size = self._header_limit  # h2 resets it to ours
        return changes

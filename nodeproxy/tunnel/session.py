"""One HTTP/2 connection (over mutual TLS) carrying CONNECT streams: HBONE's framing.

h2 does the framing and the protocol rules; this module joins it to asyncio.
Each stream is exposed as a transport (StreamTransport) so the same Relay
that joins two TCP connections joins a TCP connection and a tunnel stream:
write() queues and sends within the peer's flow-control window and pauses
the writer past a high-water mark; pause_reading() withholds WINDOW_UPDATEs,
so backpressure crosses the tunnel both ways; write_eof() ends the stream;
abort() resets it.

A server session keeps the HTTP/2 budgets of the L7 front end (nodeproxy/codec/h2_guard.py):
a peer node passed mTLS, but a compromised one must not be able to flood the proxy with
CONNECT streams it resets at once, or with control frames; past a budget the session
sends GOAWAY ENHANCE_YOUR_CALM and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from nodeproxy.codec.h2_guard import Abuse, FrameGuard
from nodeproxy.config.model import Http2Limits

log = logging.getLogger(__name__)

# Backpressure is per stream (a paused reader withholds its stream's WINDOW_UPDATEs); the
# connection window is the protocol's maximum so one slow stream never stalls the others.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 2**31 - 1
MAX_FRAME = 64 * 1024 - 1
HIGH_WATER = 1024 * 1024
ABUSE_CLOSE_DELAY = 1.0  # after an ENHANCE_YOUR_CALM GOAWAY (Envoy's delayed_close_timeout)
LOW_WATER = 256 * 1024


class StreamReset(ConnectionResetError):
    """The peer reset the stream; `code` is the HTTP/2 error code."""

    def __init__(self, code: int):
        super().__init__(f"tunnel stream reset ({code})")
        self.code = code


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class StreamTransport:
    """An HTTP/2 stream that looks like an asyncio transport to a protocol."""

    def __init__(self, session: H2Session, stream_id: int):
        self.session = session
        self.stream_id = stream_id
        self.protocol: asyncio.Protocol | None = None
        self.response: asyncio.Future = asyncio.get_running_loop().create_future()
        # Only a client awaits the response; never leave its failure unretrieved.
        self.response.add_done_callback(_retrieve)
        self._buffer = bytearray()
        self._eof_pending = False
        self._local_ended = False
        self._remote_ended = False
        self._closing = False
        self._finished = False
        self._reading_paused = False
        self._unacked = 0
        self._writing_paused = False
        self._early: list[bytes] = []
        self._early_eof = False
        self._error: BaseException | None = None
        self.request_headers: dict[str, str] = {}

    # -- wiring --------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]
        early, self._early = self._early, []
        for data in early:
            protocol.data_received(data)
        if self._early_eof:
            protocol.eof_received()
        if self._finished:
            protocol.connection_lost(self._error)  # type: ignore[arg-type]

    # -- asyncio transport API used by the relay -----------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.session.peername
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the stream's own limits (flow control) apply

    def is_closing(self) -> bool:
        return self._closing or self._finished

    def write(self, data: bytes) -> None:
        if self.is_closing() or self._local_ended:
            return
        self._buffer += data
        self._flush()
        if len(self._buffer) > HIGH_WATER and not self._writing_paused and self.protocol:
            self._writing_paused = True
            self.protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof_pending = True
        self._flush()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._unacked and not self._finished:
            n, self._unacked = self._unacked, 0
            self.session.acknowledge(self.stream_id, n)

    def close(self) -> None:
        if self._finished:
            return
        self._closing = True
        self._eof_pending = True
        self._flush()
        if not self._remote_ended:
            self.session.reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._finish(None)

    def abort(self) -> None:
        if self._finished:
            return
        self.session.reset(self.stream_id, h2.errors.ErrorCodes.CONNECT_ERROR)
        self._finish(None)

    # -- called by the session -------------------------------------------------

    def _flush(self) -> None:
        if self._finished:
            return
        conn = self.session.conn
        try:
            while self._buffer:
                window = min(conn.local_flow_control_window(self.stream_id),
                             conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(self._buffer[:window])
                conn.send_data(self.stream_id, chunk)
                del self._buffer[:window]
            if not self._buffer and self._eof_pending and not self._local_ended:
                conn.end_stream(self.stream_id)
                self._local_ended = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._finish(ConnectionResetError("tunnel stream closed"))
            return
        self.session.flush()
        if self._writing_paused and len(self._buffer) < LOW_WATER and self.protocol:
            self._writing_paused = False
            self.protocol.resume_writing()
        self._maybe_done()

    def _data(self, data: bytes, flow_controlled: int) -> None:
        if self.protocol is None:
            self._early.append(data)
        else:
            self.protocol.data_received(data)
        if self._reading_paused or self.protocol is None:
            self._unacked += flow_controlled
        elif flow_controlled and not self._finished:
            self.session.acknowledge(self.stream_id, flow_controlled)

    def _ended(self) -> None:
        self._remote_ended = True
        if self.protocol is None:
            self._early_eof = True
        else:
            self.protocol.eof_received()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._remote_ended and self._local_ended and not self._buffer:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._error = exc
        self.session.forget(self.stream_id)
        if not self.response.done():
            self.response.set_exception(exc or ConnectionResetError("stream ended"))
        if self.protocol is not None:
            self.protocol.connection_lost(exc)  # type: ignore[arg-type]


class _GuardedConnection(h2.connection.H2Connection):
    """An H2Connection whose FrameGuard sees each frame before h2 acts on it."""

    guard: FrameGuard | None = None

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        if self.guard is not None:
            self.guard.frame(frame)  # Abuse: h2 sends GOAWAY ENHANCE_YOUR_CALM
        return super()._receive_frame(frame)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False,
                  pad_length: Any = None) -> None:
        super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        if self.guard is not None and data:
            self.guard.data_frame_sent()


class H2Session(asyncio.Protocol):
    """The HTTP/2 side of one TLS connection; client or server.  A server with `limits`
    enforces them (h2_guard.py) and reports a spent budget to ``on_abuse(reason)``."""

    def __init__(self, *, client_side: bool,
                 on_request: Callable[[H2Session, StreamTransport], None] | None = None,
                 on_ready: Callable[[H2Session], bool] | None = None,
                 on_lost: Callable[[H2Session], None] | None = None,
                 limits: Http2Limits | None = None,
                 on_abuse: Callable[[str], None] | None = None):
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.conn = _GuardedConnection(config=config)
        self.client_side = client_side
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamTransport] = {}
        self.peername: Any = None
        self.closed = False
        self.goaway = False
        self.retired = False  # takes no new streams; closes when its last stream ends
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last_activity = asyncio.get_running_loop().time()
        self._on_request = on_request
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._pings: dict[bytes, asyncio.Future] = {}
        self._before_start: list[bytes] = []
        self.peer_identity: str | None = None
        self.local_identity: str | None = None
        self.guard: FrameGuard | None = None
        self._on_abuse = on_abuse
        self._abused = False
        if limits is not None and not client_side:
            self.guard = self.conn.guard = FrameGuard(
                limits, clock=asyncio.get_running_loop().time, is_open=self._stream_open)

    # -- asyncio protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peername = transport.get_extra_info("peername")
        if self._on_ready is not None and not self._on_ready(self):
            transport.close()
            return
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            })
        # h2 sizes its inbound frame check when settings are acknowledged; ours are
        # set before the preface, so tell it directly.
        self.conn.max_inbound_frame_size = MAX_FRAME
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        if not self.ready.done():
            self.ready.set_result(self)
        early, self._before_start = self._before_start, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._abused:
            return
        if self.transport is None:  # TLS delivered data before we were started
            self._before_start.append(data)
            return
        try:
            events = self.conn.receive_data(data)
        except Abuse as e:
            self._abuse(e)
            return
        except h2.exceptions.ProtocolError as e:
            log.info("HTTP/2 protocol error from %s: %s", self.peername, e)
            self.flush()  # h2 queued a GOAWAY with the error code
            self._close_transport()
            return
        except UnicodeDecodeError as e:
            # header_encoding="utf-8": h2 decodes field values as it parses, and a value
            # that is not UTF-8 escapes as this, not as a ProtocolError.
            log.info("HTTP/2 header field from %s is not UTF-8: %s", self.peername, e)
            try:
                self.conn.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self.flush()
            self._close_transport()
            return
        for event in events:
            self._dispatch(event)
            if self._abused or self.closed or \
                    (self.transport is not None and self.transport.is_closing()):
                break
        self.flush()

    def _stream_open(self, stream_id: int) -> bool:
        """Is the stream open in h2 (judged as a frame arrives, before its events)?"""
        stream = self.conn.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _abuse(self, abuse: Abuse) -> None:
        """A budget was spent: GOAWAY ENHANCE_YOUR_CALM (h2 queued it if a frame raised),
        every stream ends, the connection closes."""
        log.warning("HBONE peer %s (%s) over its HTTP/2 budget (%s): %s; "
                    "GOAWAY ENHANCE_YOUR_CALM", self.peername, self.peer_identity,
                    abuse.reason, abuse)
        self._abused = True
        try:
            self.conn.close_connection(abuse.error_code)
        except h2.exceptions.ProtocolError:
            pass  # h2 has queued it already
        self.flush()
        self.goaway = True
        for stream in list(self.streams.values()):
            stream._finish(ConnectionResetError("tunnel closed for abuse"))
        if self.transport is not None:
            # Read nothing more; close a moment later, so the GOAWAY is read first.
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(ABUSE_CLOSE_DELAY, self._close_transport)
        if self._on_abuse is not None:
            self._on_abuse(abuse.reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionResetError("tunnel closed"))
        for stream in list(self.streams.values()):
            stream._finish(ConnectionResetError("tunnel connection lost"))
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("tunnel connection lost"))
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        # Flow control windows bound what is queued; the guard counts the PINGs and
        # SETTINGS that still come while their answers go unread.
        if self.guard is not None:
            self.guard.paused()

    def resume_writing(self) -> None:
        if self.guard is not None:
            self.guard.resumed()

    # -- events ----------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = StreamTransport(self, event.stream_id)
            stream.request_headers = dict(event.headers)
            self.streams[event.stream_id] = stream
            if self._on_request is None:
                self.reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self._on_request(self, stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.response.done():
                stream.response.set_result(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._data(event.data, event.flow_controlled_length)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:  # the guard judged the reset as its frame came
                stream._finish(StreamReset(int(event.error_code)))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            targets = (list(self.streams.values()) if getattr(event, "stream_id", 0) == 0
                       else [self.streams[event.stream_id]] if event.stream_id in self.streams
                       else [])
            for stream in targets:
                stream._flush()
        elif isinstance(event, h2.events.PingAckReceived):
            fut = self._pings.pop(event.ping_data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            if not self.streams:
                self._close_transport()

    # -- operations ------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def acknowledge(self, stream_id: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self.guard is not None:
            self.guard.stream_ended(stream_id)
        self.last_activity = asyncio.get_running_loop().time()
        if (self.goaway or self.retired) and not self.streams:
            self._close_transport()

    def retire(self) -> None:
        """No new streams; close once the open ones end.  (No GOAWAY: h2 would then refuse
        the open streams' remaining frames.)"""
        self.retired = True
        if not self.streams:
            self._close_transport()

    def open_stream(self, headers: list[tuple[str, str]]) -> StreamTransport:
        stream_id = self.conn.get_next_available_stream_id()
        stream = StreamTransport(self, stream_id)
        self.streams[stream_id] = stream
        self.last_activity = asyncio.get_running_loop().time()
        self.conn.send_headers(stream_id, headers)
        self.flush()
        return stream

    def respond(self, stream: StreamTransport, status: int, end: bool = False) -> None:
        if self.guard is not None:
            self.guard.responded(stream.stream_id)
        try:
            self.conn.send_headers(stream.stream_id, [(":status", str(status))], end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._finish(ConnectionResetError("stream closed before the response"))
            return
        self.flush()
        if end:
            stream._local_ended = True
            stream._remote_ended = True
            stream._finish(None)

    async def ping(self, timeout: float) -> None:
        data = asyncio.get_running_loop().time().hex().encode()[-8:].rjust(8, b"0")
        fut = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        self.conn.ping(data)
        self.flush()
        await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        """GOAWAY and close once no stream is open (h2 refuses frames of open streams after
        a GOAWAY, so use retire() for a graceful end)."""
        if self.closed:
            return
        try:
            self.conn.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self.goaway = True
        if not self.streams:
            self._close_transport()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

"""One HTTP/2 connection (over mutual TLS) carrying CONNECT streams: HBONE's framing.

h2 (through the proxy's one h2 integration, codec/h2_connection.py, which the L7 codec
drives too) keeps the protocol's rules for everything but the bytes of an established stream:
HEADERS, SETTINGS, PING, RST_STREAM, GOAWAY and the stream states.  DATA and
WINDOW_UPDATE frames, which are nearly all of a busy tunnel's frames, are framed and
parsed here (codec/h2_frames.py) with exact flow-control accounting, so each costs a few
integer operations instead of h2's per-frame state machine and copies:

- received DATA is handed on in the pieces TLS delivered, without waiting for a whole
  frame (padded frames excepted); the peer's connection window is checked and credited
  at once, its stream window only as the stream's reader takes the bytes (a paused
  reader withholds its WINDOW_UPDATEs), so backpressure crosses the tunnel per stream and
  one slow stream never stalls the others; a peer that sends past a window it was given
  is a connection FLOW_CONTROL_ERROR.  END_STREAM on an open stream moves h2's stream
  state directly (ProxyH2Connection.receive_end_stream); in any other state it, and DATA
  on a stream this side does not serve, reach h2 as an empty DATA frame, so its stream
  states and refusals stay exact;
- a relayed connection's usual frame, a flagless DATA frame whole in one read for an open
  stream a relay's side reads, within both windows, is judged, charged and forwarded in
  one call (H2Session._whole_data); any other frame takes the general path above, which
  refuses what breaks a rule;
- a client's CONNECT response that is the one-byte static ":status: 200" block becomes
  h2's ResponseReceived without h2's frame parser, HPACK decoder and header checks
  (ProxyH2Connection.receive_known_response); any other response is h2's;
- a server's CONNECT request whose header block neither reads nor changes HPACK's
  dynamic table (static references and literals without indexing, as the tunnel's own
  requests are: codec/hpack_static.py) becomes h2's RequestReceived without h2's frame
  parser and HPACK decoder, its fields judged by the checks h2 makes
  (ProxyH2Connection.receive_known_request); any other block is h2's;
- sent DATA is framed straight from the writer's chunks (no copy but the one join per
  batch), as large as the peer allows, within the peer's stream and connection windows; a
  small write with nothing queued is one DATA frame straight into the TLS transport's
  write (StreamTransport.write);
  everything a turn produced (frames of every stream, acknowledgements, h2's own output,
  in order) leaves in one transport write.

Each stream is exposed as a transport (StreamTransport) so the same Relay that joins two
TCP connections joins a TCP connection and a tunnel stream: write() queues and sends within
the peer's flow-control window and pauses the writer past a high-water mark;
pause_reading() withholds WINDOW_UPDATEs; write_eof() ends the stream; abort() resets it.

A server session keeps the HTTP/2 budgets of the L7 front end (nodeproxy/codec/h2_guard.py)
for every frame, those parsed here included: a peer node passed mTLS, but a compromised
one must not be able to flood the proxy with CONNECT streams it resets at once, with
control frames or with empty DATA frames; past a budget the session sends GOAWAY
ENHANCE_YOUR_CALM and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from mypy_extensions import mypyc_attr

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec.h2 import MAX_HEADER_BYTES
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.h2_frames import FrameError
from nodeproxy.codec.h2_guard import Abuse, FrameGuard
from nodeproxy.config.model import Http2Limits
from nodeproxy.tcp.relay import Side
from nodeproxy.tunnel.header_block import status_block

log = logging.getLogger(__name__)

# ztunnel's sizes.  The stream window bounds what one stream may have in flight (and so
# what it may leave in this process while its reader is paused); the connection window
# is credited as soon as DATA arrives, so it never holds one stream up for another's
# slowness: it only bounds what the peer sends ahead of this side's reading.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# The largest frame accepted (SETTINGS_MAX_FRAME_SIZE): DATA streams through whatever its
# size; another frame is held whole before h2 parses it, so this bounds that buffer.
MAX_FRAME = 1024 * 1024
# Credit a window once this share of it was consumed: one WINDOW_UPDATE per quarter of a
# window instead of one per DATA frame.
ACK_SHARE = 4
HIGH_WATER = 1024 * 1024
# A write this small goes out as one DATA frame at once when nothing waits before it
# (StreamTransport.write); every peer accepts frames this large (RFC 9113's least
# SETTINGS_MAX_FRAME_SIZE), so the check needs no look at the peer's settings.
SMALL_FRAME = 16 * 1024
LOW_WATER = 256 * 1024
# The credit points (see ACK_SHARE).
STREAM_ACK = STREAM_WINDOW // ACK_SHARE
CONNECTION_ACK = CONNECTION_WINDOW // ACK_SHARE
ABUSE_CLOSE_DELAY = 1.0  # after an ENHANCE_YOUR_CALM GOAWAY (Envoy's delayed_close_timeout)
PREFACE_LENGTH = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", a server's first bytes
STREAM_MASK = 0x7FFFFFFF  # a stream identifier's reserved bit is ignored
# A stream's request headers once read (StreamTransport._shed_open), and a client's:
# one shared empty mapping, not an empty dict per stream.
NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# StreamTransport._h2_shelf of a stream whose H2Stream is h2's (see StreamTransport.shelve).
_AWAKE: object = object()


@mypyc_attr(native_class=False)  # a builtin exception's subclass (compiled build)
class StreamReset(ConnectionResetError):
    """The peer reset the stream; `code` is the HTTP/2 error code."""

    def __init__(self, code: int):
        super().__init__(f"tunnel stream reset ({code})")
        self.code = code


class StreamTransport:
    """An HTTP/2 stream that looks like an asyncio transport to a protocol."""

    __slots__ = ("_closing", "_early", "_early_eof", "_eof_pending", "_error", "_finished",
                 "_h2_shelf", "_local_ended", "_pending", "_pending_size", "_reading_paused",
                 "_remote_ended", "_side", "_takes_views", "_unacked", "_writing_paused",
                 "protocol", "receive_window", "request_headers", "response",
                 "send_window", "session", "stream_id")

    def __init__(self, session: H2Session, stream_id: int):
        self.session = session
        self.stream_id = stream_id
        self.protocol: asyncio.Protocol | None = None
        # The CONNECT's response, which only a client awaits; a server's stream has none.
        # Its failure is marked retrieved where it is set (_finish), not by a done
        # callback, which costs a loop callback per connection.
        self.response: asyncio.Future | None = None
        if session.client_side:
            self.response = asyncio.get_running_loop().create_future()
        # Written, not yet framed: a deque only while something waits (an empty one is
        # 760 bytes, and most streams are idle most of the time: _queue, _frame).
        self._pending: deque[bytes | memoryview] | None = None
        self._pending_size = 0
        # What the peer still lets us send, and what we still let it send.
        self.send_window = session.conn.remote_settings.initial_window_size
        self.receive_window = STREAM_WINDOW
        # The nine flags together: the compiled build lays a native class's attributes
        # out in the order first assigned here, a byte per flag, so together they take
        # 16 bytes, not 8 each (24 bytes less per stream).
        self._eof_pending = False
        self._local_ended = False
        self._remote_ended = False
        self._closing = False
        self._finished = False
        self._reading_paused = False
        self._writing_paused = False
        self._takes_views = False
        self._early_eof = False
        self._unacked = 0
        self._early: list[bytes | memoryview] | tuple[()] = ()  # DATA before a protocol
        self._side: Side | None = None  # the reader, when it is a relay's side
        self._error: BaseException | None = None
        self.request_headers: Mapping[str, str] = NO_HEADERS
        # While the stream's flow sleeps, its H2Stream is dropped and this is what makes
        # it again (its authority): see shelve.  _AWAKE: h2 holds it.
        self._h2_shelf: object = _AWAKE

    # -- wiring --------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self._shed_open()
        self.protocol = protocol
        self._takes_views = isinstance(protocol, Side)
        self._side = protocol if isinstance(protocol, Side) else None
        protocol.connection_made(self)  # type: ignore[arg-type]
        early, self._early = self._early, ()
        for data in early:
            protocol.data_received(data if self._takes_views else bytes(data))  # type: ignore[arg-type]
        if self._early_eof:
            protocol.eof_received()
        if self._finished:
            protocol.connection_lost(self._error)  # type: ignore[arg-type]

    def swap_reader(self, protocol: Any) -> None:
        """Another reader in this one's place, as it is: no connection_made, nothing
        replayed.  An asleep cross-node flow's relay stands in for its side, and a new
        side takes its place as it wakes (tcp/half_sleep.py); only a relay's side gets
        views of the read and the frame reader's one-call path."""
        self.protocol = protocol
        self._takes_views = isinstance(protocol, Side)
        self._side = protocol if isinstance(protocol, Side) else None

    def _shed_open(self) -> None:
        """What only the stream's open needed, dropped once its reader joins: a client's
        answered response (the future and its header dict, about 0.3 KiB: whoever awaited
        it has read it; every check of it asks whether it is done) and a server's request
        headers (read by the listener before it joins a reader)."""
        if self.response is not None and self.response.done():
            self.response = None
        if self.request_headers:
            self.request_headers = NO_HEADERS

    # -- asleep --------------------------------------------------------------

    def shelve(self) -> bool:
        """The stream's flow fell asleep (tcp/half_sleep.py): drop h2's state of the stream
        (ProxyH2Connection.shelve, about 0.55 KiB) if the stream is open both ways with
        nothing queued, keeping only its authority.  Every path that hands h2 a frame of
        this stream or calls h2 for it (a frame other than DATA or a nonzero
        WINDOW_UPDATE, END_STREAM, a reset either way, the stream's end, its write_eof)
        calls unshelve first; so does the relay's waking.  True: shelved."""
        if self._h2_shelf is not _AWAKE or self._finished or self._closing \
                or self._local_ended or self._remote_ended or self._eof_pending \
                or self._pending_size:
            return False
        conn = self.session.conn
        stream = conn.streams.get(self.stream_id)
        if stream is None:
            return False
        authority = stream._authority
        if not conn.shelve(self.stream_id):
            return False
        self._h2_shelf = authority
        return True

    def unshelve(self) -> None:
        """h2's state of the stream back, as h2 would hold it now (a no-op unless shelved)."""
        authority = self._h2_shelf
        if authority is not _AWAKE:
            self._h2_shelf = _AWAKE
            assert authority is None or isinstance(authority, bytes)
            self.session.conn.unshelve(self.stream_id, authority)

    # -- asyncio transport API used by the relay -----------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.session.peername
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the stream's own limits (flow control) apply

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def is_closing(self) -> bool:
        return self._closing or self._finished

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._finished or self._local_ended or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer
        size = len(data)
        session = self.session
        if not self._pending_size and size <= SMALL_FRAME and size <= self.send_window \
                and size <= session.send_window and not session._receiving \
                and not session._out and not session.conn._data_to_send:
            # The latency path (a small message on a stream with nothing queued, the
            # windows open, nothing else of this turn waiting): one DATA frame straight to
            # the TLS transport, the same accounting as _frame.
            self.send_window -= size
            session.send_window -= size
            if session.guard is not None:
                session.guard.data_frame_sent()
            head = frames.pack_header(size >> 8, size & 0xFF, frames.DATA, 0, self.stream_id)
            write = session.write_direct
            if write is not None:  # the TLS transport: drops it itself once closing
                write(head + data)
                return
            transport = session.transport
            if transport is not None and not transport.is_closing():
                transport.write(head + data)
            return
        self._queue(data)
        self._flush()
        if self._pending_size > HIGH_WATER and not self._writing_paused and self.protocol:
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
            self._acknowledge()

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

    def _queue(self, data: bytes) -> None:
        """Keep written bytes until the windows let them be framed."""
        if self._pending is None:
            self._pending = deque()
        self._pending.append(data)
        self._pending_size += len(data)

    # -- called by the session -------------------------------------------------

    def _frame(self, out: list[bytes | memoryview]) -> None:
        """Move what the windows allow from the pending chunks into DATA frames on `out`
        (the chunks themselves, not copies)."""
        session = self.session
        max_frame = session.conn.max_outbound_frame_size
        pending = self._pending
        if pending is None:
            return
        while self._pending_size:
            size = min(self.send_window, session.send_window, max_frame, self._pending_size)
            if size <= 0:
                break
            out.append(frames.data_header(size, self.stream_id))
            left = size
            while left:
                chunk = pending[0]
                if len(chunk) <= left:
                    pending.popleft()
                    out.append(chunk)
                    left -= len(chunk)
                else:
                    view = memoryview(chunk)
                    out.append(view[:left])
                    pending[0] = view[left:]
                    left = 0
            self._pending_size -= size
            self.send_window -= size
            session.send_window -= size
            if session.guard is not None:
                session.guard.data_frame_sent()
        if not self._pending_size:
            self._pending = None  # nothing waits: no deque kept (see __init__)

    def _flush(self) -> None:
        if self._finished:
            return
        session = self.session
        if self._pending_size:
            session.queue_frames(self)
        if not self._pending_size and self._eof_pending and not self._local_ended:
            self.unshelve()
            try:
                session.conn.end_stream(self.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._finish(ConnectionResetError("tunnel stream closed"))
                return
            self._local_ended = True
        session.flush()
        if self._writing_paused and self._pending_size < LOW_WATER and self.protocol:
            self._writing_paused = False
            self.protocol.resume_writing()
        self._maybe_done()

    def _data(self, data: bytes | memoryview, flow_controlled: int) -> None:
        """DATA for this stream: `data` to the reader; `flow_controlled` bytes of the window
        to credit once the reader takes more.  A piece of a read comes as a memoryview of
        it (immutable bytes); only a relay's side (which just writes it on) takes that
        uncopied, any other reader gets bytes."""
        if type(data) is not bytes and not self._takes_views:
            data = bytes(data)
        if self.protocol is None:
            if self._early:
                self._early.append(data)  # type: ignore[union-attr]
            else:
                self._early = [data]
        else:
            self.protocol.data_received(data)  # type: ignore[arg-type]
        self._unacked += flow_controlled
        if not (self._reading_paused or self.protocol is None or self._finished) \
                and self._unacked >= STREAM_ACK:
            self._acknowledge()

    def _acknowledge(self) -> None:
        n, self._unacked = self._unacked, 0
        self.receive_window += n
        self.session.send_window_update(self.stream_id, n)

    def _ended(self) -> None:
        self._remote_ended = True
        if self.protocol is None:
            self._early_eof = True
        else:
            self.protocol.eof_received()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._remote_ended and self._local_ended and not self._pending_size:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._finished:
            return
        self.unshelve()  # h2 ends it (forget) as it would have
        self._finished = True
        self._error = exc
        self._pending = None
        self._pending_size = 0
        self.session.forget(self.stream_id)
        response = self.response
        if response is not None and not response.done():
            response.set_exception(exc or ConnectionResetError("stream ended"))
            response.exception()  # retrieved: a stream nobody awaits any more logs nothing
        # Let go of the protocol (a relay's side holds this transport): the two would be
        # a reference cycle per stream, left to the cyclic collector.
        protocol, self.protocol = self.protocol, None
        self._side = None
        if protocol is not None:
            protocol.connection_lost(exc)  # type: ignore[arg-type]


class H2Session:
    """The HTTP/2 side of one TLS connection; client or server.  A server with `limits`
    enforces them (h2_guard.py) and reports a spent budget to ``on_abuse(reason)``.

    An asyncio protocol by its methods, not by inheritance: the compiled build
    (nodeproxy/native.py) makes it a native class (attributes in C slots, methods
    called directly), which a subclass of asyncio.Protocol cannot be; the TLS
    transport and the event loops call only the methods."""

    def __init__(self, *, client_side: bool,
                 on_request: Callable[[H2Session, StreamTransport], None] | None = None,
                 on_ready: Callable[[H2Session], bool] | None = None,
                 on_lost: Callable[[H2Session], None] | None = None,
                 limits: Http2Limits | None = None,
                 on_abuse: Callable[[str], None] | None = None):
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.conn = ProxyH2Connection(config, MAX_HEADER_BYTES)
        self.client_side = client_side
        self.transport: asyncio.Transport | None = None
        # The transport's write when it drops writes once closing (the TLS transport's
        # `drops_writes_when_closing`): the small-write path calls it without asking
        # is_closing first.  None: ask.
        self.write_direct: Callable[[bytes], None] | None = None
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
        self._failed = False  # a connection error was sent: nothing more is read
        # Set wherever this session makes _stopped() true (abuse, a connection error,
        # closing or aborting its transport, the connection lost): what the frame reader
        # looks at after a frame _whole_data took, instead of the full _stopped().
        self._halted = False
        # Connection flow control: what the peer still lets us send (its WINDOW_UPDATEs
        # and SETTINGS are read here, h2 never sees them), what we still let it send,
        # and what it used that we have not credited yet.
        self.send_window = 65535
        self.receive_window = 65535
        self._receive_unacked = 0
        # The frame reader's state (see _receive).
        self._preface_left = 0 if client_side else PREFACE_LENGTH
        self._head = bytearray()  # a frame header cut by the end of a read
        self._frame_head = b""  # the header of the frame being collected whole
        self._frame_body = bytearray()
        self._frame_left = 0
        self._data_left = 0  # payload bytes of the DATA frame being streamed
        self._data_stream: StreamTransport | None = None  # its stream (None: dropped)
        self._data_end = False  # it carries END_STREAM
        self._continuation = False  # a header block is open: only CONTINUATION may come
        # What this turn sends (frames, h2's output), written at once.
        self._out: list[bytes | memoryview] = []
        self._receiving = False
        if limits is not None and not client_side:
            self.guard = self.conn.guard = FrameGuard(
                limits, clock=asyncio.get_running_loop().time, is_open=self._stream_open)

    # -- asyncio protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if getattr(transport, "drops_writes_when_closing", False):
            self.write_direct = transport.write  # type: ignore[attr-defined]
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
        self.send_window_update(0, CONNECTION_WINDOW - self.receive_window)
        self.receive_window = CONNECTION_WINDOW
        self.flush()
        if not self.ready.done():
            self.ready.set_result(self)
        early, self._before_start = self._before_start, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._abused or self._failed:
            return
        if self.transport is None:  # TLS delivered data before we were started
            self._before_start.append(data)
            return
        self._receiving = True
        try:
            self._receive(data)
        # (A name per clause: mypyc types an ``as`` name by its first clause, and Abuse is
        # a compiled class of the group.)
        except Abuse as abuse:
            self._receiving = False
            self._abuse(abuse)
            return
        except FrameError as framing:
            self._receiving = False
            self._connection_error(framing.code, str(framing))
            return
        except h2.exceptions.ProtocolError as e:
            self._receiving = False
            log.info("HTTP/2 protocol error from %s: %s", self.peername, e)
            self._failed = self._halted = True
            self.flush()  # h2 queued a GOAWAY with the error code
            self._close_transport()
            return
        except UnicodeDecodeError as e:
            # header_encoding="utf-8": h2 decodes field values as it parses, and a value
            # that is not UTF-8 escapes as this, not as a ProtocolError.
            self._receiving = False
            self._connection_error(h2.errors.ErrorCodes.PROTOCOL_ERROR,
                                   f"header field is not UTF-8: {e}")
            return
        self._receiving = False
        self.flush()

    def _stopped(self) -> bool:
        return self._abused or self._failed or self.closed or \
            (self.transport is not None and self.transport.is_closing())

    # -- the frame reader ------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Split what TLS delivered into frames: DATA payloads stream to their stream as
        they arrive, WINDOW_UPDATEs are applied here, every other frame goes to h2 whole."""
        if self._stopped():
            return
        if type(data) is not bytes:
            data = bytes(data)  # pieces of it are handed on: never of a buffer reused
        end = len(data)
        pos = 0
        view = memoryview(data)
        if self._preface_left:  # a server: the client's preface is h2's to check
            n = min(self._preface_left, end)
            self._preface_left -= n
            self._to_h2(data[:n])
            pos = n
        taken = False  # the last frame was _whole_data's (it may only have halted us)
        while pos < end:
            if self._data_left:
                n = min(self._data_left, end - pos)
                self._data_left -= n
                stream = self._data_stream
                if stream is not None and not stream._finished:
                    stream._data(data if n == end else view[pos:pos + n], n)
                pos += n
                if not self._data_left:
                    self._data_done()
                continue
            if self._frame_left:
                n = min(self._frame_left, end - pos)
                self._frame_body += view[pos:pos + n]
                self._frame_left -= n
                pos += n
                if not self._frame_left:
                    body, self._frame_body = bytes(self._frame_body), bytearray()
                    self._frame(self._frame_head, body)
                continue
            # A new frame: judged only while the session still reads (checked once per
            # frame; a DATA frame's payload follows its header without another look).
            # After a frame _whole_data took, only this session's own halting can have
            # happened (it ran the reader's relay forward and the stream's credit).
            if self._halted if taken else self._stopped():
                break
            taken = False
            if self._head or end - pos < frames.HEADER_LENGTH:
                n = min(frames.HEADER_LENGTH - len(self._head), end - pos)
                self._head += view[pos:pos + n]
                pos += n
                if len(self._head) < frames.HEADER_LENGTH:
                    break
                head = bytes(self._head)
                self._head.clear()
                length, frame_type, flags, stream_id = frames.parse_header(head)
            else:
                high, low, frame_type, flags, stream_id = frames.unpack_header_from(data, pos)
                length = (high << 8) | low
                start = pos + frames.HEADER_LENGTH
                if frame_type == frames.DATA and not flags and length and \
                        start + length <= end and length <= MAX_FRAME and \
                        not self._continuation and \
                        self._whole_data(view, start, length, stream_id & STREAM_MASK):
                    pos = start + length
                    taken = True
                    continue
                head = data[pos:start]
                pos = start
                stream_id &= STREAM_MASK
            if length > MAX_FRAME:
                raise FrameError(h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                                 f"a {length}-byte frame (type {frame_type}); at most "
                                 f"{MAX_FRAME} were allowed")
            if frame_type == frames.DATA and not flags & frames.PADDED \
                    and not self._continuation:
                self._data_begin(length, flags, stream_id)
                if not length:
                    self._data_done()
            elif end - pos >= length:  # the whole frame is here
                body = data[pos:pos + length]
                pos += length
                self._frame(head, body)
            else:
                self._frame_head = head
                self._frame_left = length
                self._frame_body += view[pos:]
                self._frame_left -= end - pos
                pos = end

    def _whole_data(self, view: memoryview, start: int, length: int, stream_id: int) -> bool:
        """The frame reader's common case in one call: a DATA frame without flags (no
        padding, no END_STREAM) and with a payload, whole in this read (view[start:][:length]),
        for a stream open both ways whose reader is a relay's side, within both receive
        windows.  It is judged and accounted as _data_begin, StreamTransport._data and
        _data_done would (the FrameGuard sees the frame first; both windows charged; the
        connection credited at once; the payload a view of the read, forwarded by the
        side's relay; the stream credited as its reader takes it).  Anything else, and any
        frame that breaks a rule, returns False having done nothing: the general path
        judges it, refusals and all."""
        stream = self.streams.get(stream_id)
        if stream is None or stream._side is None or stream._remote_ended \
                or stream._finished or length > self.receive_window \
                or length > stream.receive_window:
            return False
        response = stream.response
        if response is not None and not response.done():
            return False  # before the CONNECT's response: _data_begin resets it
        if self.guard is not None:
            self.guard.data_frame(True)
        self.receive_window -= length
        unacked = self._receive_unacked + length
        if unacked >= CONNECTION_ACK:
            self._receive_unacked = 0
            self.receive_window += unacked
            self.send_window_update(0, unacked)
        else:
            self._receive_unacked = unacked
        stream.receive_window -= length
        side = stream._side
        relay = side.relay
        if relay is not None and type(side) is Side:
            # What a plain side's data_received would do, without its call.
            relay.forward(side, view[start:start + length])  # type: ignore[arg-type]
        else:
            # No relay yet (a side holds the bytes until its relay joins: so does the
            # new side of an asleep relay waking, tcp/half_sleep.py), or a side of
            # another class, whose own data_received decides.  An asleep relay itself
            # reads its stream with no side (_side is None): the general path wakes it.
            side.data_received(view[start:start + length])  # type: ignore[arg-type]
        stream._unacked += length
        if stream._unacked >= STREAM_ACK and not stream._reading_paused \
                and not stream._finished:
            stream._acknowledge()
        return True

    def _frame(self, head: bytes, body: bytes) -> None:
        """A whole frame other than an unpadded DATA frame."""
        length, frame_type, flags, stream_id = frames.parse_header(head)
        if self._continuation or frame_type not in (frames.DATA, frames.WINDOW_UPDATE):
            self._unshelve(stream_id)  # h2 judges this frame: it holds the stream again
            if frame_type == frames.HEADERS and flags == frames.END_HEADERS \
                    and not self._continuation:
                # The CONNECT response: a 200 is known without h2's parser; a CONNECT
                # request whose block leaves HPACK's dynamic table alone is decoded
                # without it (h2's checks still judge its fields).
                if self.client_side:
                    event = self.conn.receive_known_response(stream_id, body)
                else:
                    event = self.conn.receive_known_request(stream_id, body)
                if event is not None:
                    self._dispatch(event)
                    return
            if frame_type in (frames.HEADERS, frames.PUSH_PROMISE, frames.CONTINUATION):
                self._continuation = not flags & frames.END_HEADERS
            self._to_h2(head + body)
        elif frame_type == frames.DATA:  # PADDED
            content = frames.unpad(body)
            self._data_begin(length, flags, stream_id)
            self._data_left = 0
            stream = self._data_stream
            if stream is not None:
                stream._data(bytes(content), length)
            self._data_done()
        else:
            self._window_update(head, body, stream_id)

    def _to_h2(self, data: bytes, *, made_up: bool = False) -> None:
        """Frames (or the preface) for h2 to parse; its events are acted on at once, so a
        stream h2 opens exists before the next frame is read."""
        guard = self.conn.guard
        if made_up:  # its real frame was judged already
            self.conn.guard = None
        try:
            events = self.conn.receive_data(data)
        finally:
            self.conn.guard = guard
        for event in events:
            self._dispatch(event)
            if self._stopped():
                break

    def _data_begin(self, length: int, flags: int, stream_id: int) -> None:
        """A DATA frame's header: judge it and charge the windows, before its payload."""
        if self.guard is not None:
            self.guard.data_frame(bool(length or flags & frames.END_STREAM))
        if stream_id == 0:
            raise FrameError(h2.errors.ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self.receive_window:
            frames.consume(self.receive_window, length, "connection")  # raises
        self.receive_window -= length
        if length:
            # Credited at once: the stream windows bound what waits for a reader.
            self._receive_unacked += length
            if self._receive_unacked >= CONNECTION_ACK:
                n, self._receive_unacked = self._receive_unacked, 0
                self.receive_window += n
                self.send_window_update(0, n)
        end_stream = bool(flags & frames.END_STREAM)
        stream = self.streams.get(stream_id)
        self._data_left = length
        self._data_end = end_stream
        self._data_stream = None
        if stream is None or stream._remote_ended or stream._finished:
            # Not a stream we serve (closed, reset, never opened): h2 answers by its
            # rules (STREAM_CLOSED, or a connection error); the payload is dropped.
            self._to_h2(frames.empty_data(stream_id, end_stream), made_up=True)
            return
        if stream.response is not None and not stream.response.done():
            # DATA before the CONNECT response: no tunnel yet.
            self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            stream._finish(ConnectionResetError("DATA before the tunnel's response"))
            return
        if length > stream.receive_window:
            frames.consume(stream.receive_window, length, "stream")  # raises
        stream.receive_window -= length
        self._data_stream = stream

    def _data_done(self) -> None:
        stream = self._data_stream
        self._data_stream = None
        if stream is not None and self._data_end and not stream._finished:
            stream.unshelve()
            # h2's stream state takes the END_STREAM: directly where the outcome is fixed
            # (an open stream), else through h2's parser, whose StreamEnded (or refusal)
            # reaches the stream.
            if self.conn.receive_end_stream(stream.stream_id):
                stream._ended()
            else:
                self._to_h2(frames.empty_data(stream.stream_id, True), made_up=True)

    def _window_update(self, head: bytes, body: bytes, stream_id: int) -> None:
        increment = frames.window_increment(body)
        stream = self.streams.get(stream_id) if stream_id else None
        if increment == 0 or (stream_id and (stream is None or stream._finished)):
            self._unshelve(stream_id)
            self._to_h2(head + body)  # h2's rules: an error, or a closed stream's
            return
        if self.guard is not None:
            self.guard.window_update()
        if stream is None:
            self.send_window = frames.credit(self.send_window, increment)
            self.queue_all()
            return
        try:
            stream.send_window = frames.credit(stream.send_window, increment)
        except FrameError:
            self.reset(stream_id, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
            stream._finish(ConnectionResetError("stream window overflowed"))
            return
        stream._flush()

    def _connection_error(self, code: h2.errors.ErrorCodes, detail: str) -> None:
        log.info("HTTP/2 connection error from %s (%s): %s", self.peername, code.name,
                 detail)
        self._failed = self._halted = True
        try:
            self.conn.close_connection(code)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self._close_transport()

    def _stream_open(self, stream_id: int) -> bool:
        """Is the stream open in h2 (judged as a frame arrives, before its events)?  A
        shelved stream is (StreamTransport.shelve)."""
        stream = self.conn.streams.get(stream_id)
        if stream is None:
            ours = self.streams.get(stream_id)
            return ours is not None and ours._h2_shelf is not _AWAKE
        return not stream.closed

    def _unshelve(self, stream_id: int) -> None:
        """h2's state of a shelved stream back before h2 sees anything of it."""
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.unshelve()

    def _abuse(self, abuse: Abuse) -> None:
        """A budget was spent: GOAWAY ENHANCE_YOUR_CALM (h2 queued it if a frame raised),
        every stream ends, the connection closes."""
        log.warning("HBONE peer %s (%s) over its HTTP/2 budget (%s): %s; "
                    "GOAWAY ENHANCE_YOUR_CALM", self.peername, self.peer_identity,
                    abuse.reason, abuse)
        self._abused = self._halted = True
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

    def eof_received(self) -> bool | None:
        return None  # asyncio.Protocol's: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self._halted = True
        self._out.clear()
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
        stream: StreamTransport | None
        if isinstance(event, h2.events.RequestReceived):
            opened = StreamTransport(self, event.stream_id)
            opened.request_headers = dict(event.headers)  # type: ignore[arg-type]
            if self._on_request is None:
                self.reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self.streams[event.stream_id] = opened
                self._on_request(self, opened)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.response is not None \
                    and not stream.response.done():
                stream.response.set_result(dict(event.headers))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:  # the guard judged the reset as its frame came
                stream._finish(StreamReset(int(event.error_code)))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None:
                delta = changed.new_value - changed.original_value  # type: ignore[operator]
                for each in self.streams.values():
                    each.send_window = frames.credit(each.send_window, delta)
            self.queue_all()
        elif isinstance(event, h2.events.PingAckReceived):
            fut = self._pings.pop(event.ping_data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            if not self.streams:
                self._close_transport()
        # DataReceived: only the empty frames made up above reach h2; their (absent)
        # bytes went to the stream already.

    # -- operations ------------------------------------------------------------

    def queue_frames(self, stream: StreamTransport) -> None:
        """The stream's DATA frames that the windows allow, after h2's output so far."""
        self._take_h2_output()
        stream._frame(self._out)

    def queue_all(self) -> None:
        """The windows grew: every stream sends what it can."""
        for stream in list(self.streams.values()):
            if stream._pending_size or stream._eof_pending:
                stream._flush()

    def send_window_update(self, stream_id: int, increment: int) -> None:
        self._take_h2_output()
        self._out.append(frames.window_update(stream_id, increment))
        self.flush()

    def _take_h2_output(self) -> None:
        if self.conn._data_to_send:  # h2's buffer (named in test_h2_private_names.py)
            self._out.append(self.conn.data_to_send())

    def flush(self) -> None:
        """Write what this turn produced, in one write (while a read is being handled,
        at its end)."""
        self._take_h2_output()
        if self._receiving or not self._out:
            return
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def reset(self, stream_id: int, code: int) -> None:
        self._unshelve(stream_id)
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.conn.forget_closed(stream_id)
        if self.guard is not None:
            self.guard.stream_ended(stream_id)
        self.last_activity = asyncio.get_running_loop().time()
        if (self.goaway or self.retired) and not self.streams:
            self._close_transport()

    def retire(self) -> None:
        """No new streams; close once the open ones end (the pool opens no more on it)."""
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

    def open_encoded_stream(self, block: bytes, authority: bytes) -> StreamTransport:
        """open_stream for a CONNECT request whose header block is already encoded
        (tunnel/header_block.py: the same bytes for every connection to a destination)."""
        stream_id = self.conn.get_next_available_stream_id()
        stream = StreamTransport(self, stream_id)
        self.streams[stream_id] = stream
        self.last_activity = asyncio.get_running_loop().time()
        self.conn.send_encoded_headers(stream_id, block, method=b"CONNECT",
                                       authority=authority)
        self.flush()
        return stream

    def respond(self, stream: StreamTransport, status: int, end: bool = False) -> None:
        if self.guard is not None:
            self.guard.responded(stream.stream_id)
        stream.unshelve()
        try:
            self.conn.send_encoded_headers(stream.stream_id, status_block(status),
                                           end_stream=end)
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
        """GOAWAY (NO_ERROR: the open streams may finish) and close once none is open."""
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
            self._halted = True
            self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self._halted = True
        self._receiving = False
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

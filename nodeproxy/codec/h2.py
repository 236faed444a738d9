"""HTTP/2 (and so gRPC) for L7: the downstream server side and the upstream client side.

This module owns the HTTP/2 wire protocol between message.py's protocol-neutral objects
and a byte transport: h2 does all framing, HPACK and the protocol rules; this module joins
h2 to asyncio (flow control both ways, write pausing, stream lifecycles, GOAWAY).

H2Server   one downstream connection: each request stream becomes an Exchange handed to
           the caller's handler as a task.  It can take over an already-connected transport
           that delivered the first bytes to a sniffer: ``server.attach(transport, initial)``.
H2Client   one upstream connection (prior-knowledge h2c, over TCP or an HBONE stream):
           an UpstreamConnection that multiplexes requests within the peer's
           SETTINGS_MAX_CONCURRENT_STREAMS.

Flow control.  Received DATA is acknowledged (WINDOW_UPDATE) only as the reader of the
Body takes it, so a slow reader holds the sender back: a Body buffers at most one stream
window (``stream_window``), and one connection at most ``connection_window`` across its
streams.  Sending waits for the peer's window and for the transport to resume writing.

GOAWAY.  h2 treats any GOAWAY as the end of the connection (python-hyper/h2#1181) and then
refuses every further frame; a graceful GOAWAY (the peer's, or our own NO_ERROR one) must
let streams at or below its last stream id finish, so the connection
(codec/h2_connection.py) keeps h2's connection state open after every GOAWAY it receives
(RFC 9113 6.8: streams up to the last stream id may still complete, whatever the error
code; the peer closes the connection when it is done) and after its own NO_ERROR one;
only an error GOAWAY of its own closes it.  The codecs enforce "no new streams" (the
tunnel's pool opens none on a session that received a GOAWAY).

Header names and values are bytes on the wire and str in message.py: latin-1 both ways
(lossless), values that latin-1 cannot encode go out as UTF-8.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple

from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.h2_guard import Abuse, FrameGuard
from nodeproxy.codec.message import (
    HOP_BY_HOP,
    Body,
    BodyError,
    Exchange,
    Headers,
    MalformedRequest,
    OutgoingBody,
    RequestHead,
    ResponseHead,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.codec.request_target import Refusal, check_authority, check_method, check_target
from nodeproxy.config.model import Http2Limits

log = logging.getLogger(__name__)

ErrorCodes = h2.errors.ErrorCodes

STREAM_WINDOW = 1024 * 1024  # per stream: what one Body may buffer
CONNECTION_WINDOW = 16 * 1024 * 1024  # per connection, across its streams
MAX_FRAME = 64 * 1024 - 1  # largest DATA frame we accept
MAX_CONCURRENT_STREAMS = 1000  # advertised by the server side
MAX_HEADER_BYTES = 60 * 1024  # Envoy's max_request_headers_kb default
INITIAL_STREAMS = 100  # what the client side assumes before the server's SETTINGS
_DEFAULT_WINDOW = 65535  # RFC 9113's initial window
ABUSE_CLOSE_DELAY = 1.0  # after an ENHANCE_YOUR_CALM GOAWAY (Envoy's delayed_close_timeout)

_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


_BODY_EVENTS = (h2.events.DataReceived, h2.events.TrailersReceived, h2.events.StreamEnded)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _decode(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode("latin-1")


def _wire_fields(headers: Headers, *, keep_te: bool = False) -> list[tuple[bytes, bytes]]:
    """Regular header fields as h2 will accept them: lowercase names, no pseudo-headers,
    no hop-by-hop or Host (``:authority`` carries it), no CR/LF/NUL, no surrounding
    whitespace.  What h2 would refuse is dropped here, before HPACK sees it.  Credentials
    (Authorization, Proxy-Authorization, a Cookie under 20 bytes) are never indexed by
    HPACK, as h2's outbound normalization would mark them (the server side has it off:
    this is all it did for these fields)."""
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        key = name.lower()
        if key == "te":
            if keep_te and value.strip().lower() == "trailers":
                fields.append((b"te", b"trailers"))
            continue
        if key in HOP_BY_HOP or key == "host" or key.startswith(":"):
            continue
        raw_name, raw_value = _encode(key), _encode(value.strip(" \t"))
        if not _TOKEN.match(raw_name) or _BAD_VALUE.search(raw_value):
            continue
        if raw_name in _NEVER_INDEXED or (raw_name == b"cookie" and len(raw_value) < 20):
            fields.append(NeverIndexedHeaderTuple(raw_name, raw_value))
        else:
            fields.append((raw_name, raw_value))
    return fields


def _split(fields: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    pseudo: dict[str, str] = {}
    headers: Headers = []
    for name, value in fields:
        key, text = _decode(name), _decode(value)
        if key.startswith(":"):
            pseudo[key] = text
        else:
            headers.append((key, text))
    return pseudo, headers


_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_CONTROL_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_fields(headers: Headers) -> None:
    """Regular fields as RFC 9110 5.1 and 5.5 write them: a name is a (lowercase) token, a
    value holds no control character but HTAB.  h2 itself refuses only CR, LF and NUL in
    a value (RFC 9113 8.2.1); an HTTP/1.1 upstream must never see the rest.  Raises
    Refusal ("bad_field")."""
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name) or _CONTROL_IN_VALUE.search(value):
            raise Refusal("bad_field", f"header field {name[:32]!r} is malformed")


# Fields a trailer section must not carry (RFC 9110 6.5.1: framing, routing, request
# modifiers, authentication, response control, content format) and hop-by-hop ones:
# a recipient that merged them would act on what no check saw; they are not forwarded.
TRAILER_FORBIDDEN = frozenset({
    "content-length", "transfer-encoding", "host", "connection", "keep-alive",
    "proxy-connection", "upgrade", "te", "trailer", "expect", "max-forwards", "range",
    "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range",
    "cache-control", "pragma", "authorization", "proxy-authorization", "cookie",
    "set-cookie", "www-authenticate", "proxy-authenticate", "age", "expires", "date",
    "location", "retry-after", "vary", "content-encoding", "content-type", "content-range",
})


def forwardable_trailers(trailers: Headers) -> Headers:
    """A received trailer section as it may go on: each field well formed (check_fields:
    an HTTP/1.1 peer gets them as lines of a chunked body's end, where a name with a
    colon or a space would read as another field), TRAILER_FORBIDDEN ones left out.
    Raises Refusal ("bad_trailer") for a malformed field."""
    try:
        check_fields(trailers)
    except Refusal as e:
        raise Refusal("bad_trailer", f"trailer {e}") from e
    return [(name, value) for name, value in trailers if name not in TRAILER_FORBIDDEN]


_FORWARDED_HOP_BY_HOP = frozenset({"te"})  # gRPC needs `te: trailers` end to end
_NOT_FORWARDED = frozenset({"host"}) | (HOP_BY_HOP - _FORWARDED_HOP_BY_HOP)


def _request_fields(fields: list[tuple[bytes, bytes]]
                    ) -> tuple[dict[str, str], Headers, int, str, bool]:
    """A request's received header block in one pass: its pseudo-headers; the regular
    fields to forward (no Host, no hop-by-hop field but TE, no ``expect: 100-continue``,
    which the server answers); the header list size as SETTINGS_MAX_HEADER_LIST_SIZE
    counts it; the first Host field's value ("" without one); whether it expects
    100-continue.  Each regular field is checked as check_fields checks it (Refusal
    "bad_field")."""
    pseudo: dict[str, str] = {}
    headers: Headers = []
    size = 0
    host: str | None = None
    continue_ = False
    name_ok, bad_value = _FIELD_NAME.fullmatch, _CONTROL_IN_VALUE.search
    for name, value in fields:
        size += len(name) + len(value) + 32
        key = name if isinstance(name, str) else name.decode("latin-1")
        text = value if isinstance(value, str) else value.decode("latin-1")
        if key[:1] == ":":
            pseudo[key] = text
            continue
        if not name_ok(key) or bad_value(text):
            raise Refusal("bad_field", f"header field {key[:32]!r} is malformed")
        if key in _NOT_FORWARDED:
            if key == "host" and host is None:
                host = text
            continue
        if key == "expect" and text.lower() == "100-continue":
            continue_ = True
        headers.append((key, text))
    if continue_:
        headers = [(n, v) for n, v in headers if n != "expect"]
    return pseudo, headers, size, host or "", continue_


class _Inflow:
    """One stream's received DATA not yet taken by its reader (to acknowledge later)."""

    __slots__ = ("outstanding",)

    def __init__(self) -> None:
        self.outstanding = 0


# --- what both sides share -------------------------------------------------------------------


class _H2Protocol(asyncio.Protocol):
    """An h2 connection on an asyncio transport: flushing, acknowledging, waiting to send."""

    client_side = False

    def __init__(self, *, stream_window: int, connection_window: int, header_limit: int,
                 settings: dict[int, int]):
        # The server side sends only what _wire_fields made (lowercase token names, no
        # pseudo-header or hop-by-hop field, no CR/LF/NUL, no surrounding whitespace,
        # credentials never indexed) and a :status: h2's outbound checks and
        # normalization of the same, chains of generators per header block, are off.
        # The client side keeps them: its pseudo-headers come from the request.
        config = h2.config.H2Configuration(client_side=self.client_side, header_encoding=None,
                                           validate_outbound_headers=self.client_side,
                                           normalize_outbound_headers=self.client_side)
        self.conn = ProxyH2Connection(config, header_limit, cache_hpack=True)
        self.transport: asyncio.Transport | None = None
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            **settings,
        }
        self._lost = False
        self._failed = False  # a protocol error ended it
        self._flush_pending = False  # a write of h2's queued frames is due this turn
        self._write_paused = False
        self.write_pauses = 0  # times the transport asked us to stop writing
        self._blocked: dict[int, list[asyncio.Future[None]]] = {}
        self._loop = asyncio.get_running_loop()
        self.idle_since: float | None = self._loop.time()
        self.closed_future: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=self._settings)  # type: ignore[arg-type]
        # h2 applies our frame size when the peer acknowledges; it is ours from the start.
        self.conn.max_inbound_frame_size = MAX_FRAME
        self.conn.initiate_connection()
        if self._connection_window > _DEFAULT_WINDOW:
            self.conn.increment_flow_control_window(self._connection_window - _DEFAULT_WINDOW)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._lost or self._failed:
            return
        try:
            events = self.conn.receive_data(data)
        # (A name per clause: mypyc types an ``as`` name by its first clause.)
        except Abuse as abuse:
            self._abuse(abuse)
            return
        except h2.exceptions.ProtocolError as error:
            self._protocol_error(int(error.error_code), str(error) or type(error).__name__)
            return
        except Exception as bug:  # a bug of ours or h2's: never let one kill the loop
            log.exception("HTTP/2 connection failed")
            try:
                self.conn.close_connection(ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._protocol_error(int(ErrorCodes.INTERNAL_ERROR), repr(bug))
            return
        for event in events:
            self._dispatch(event)
            if self._failed:
                return
        self._flush_now()  # what this read produced (ACKs, resets): one write, at once

    def pause_writing(self) -> None:
        self._write_paused = True
        self.write_pauses += 1
        if self.conn.guard is not None:
            self.conn.guard.paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.conn.guard is not None:
            self.conn.guard.resumed()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    # -- the parts a side defines ----------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def _abuse(self, abuse: Abuse) -> None:
        """A budget was spent (h2_guard.py): GOAWAY ENHANCE_YOUR_CALM (queued by h2 when
        raised from a frame) naming the last stream a handler took; stop reading, and
        close a moment later (Envoy's delayed close), so the GOAWAY is read before the
        close resets the connection under what the client is still sending."""
        self._failed = True
        if not self.conn.terminated:
            try:
                self.conn.close_connection(int(abuse.error_code),
                                           last_stream_id=self.conn.processed_stream_id)
            except h2.exceptions.ProtocolError:
                pass
        self._flush_now()  # the GOAWAY goes before the write side closes
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(Exception):
            transport.pause_reading()
        with contextlib.suppress(Exception):
            if transport.can_write_eof():
                transport.write_eof()
        self._loop.call_later(ABUSE_CLOSE_DELAY, self._close_transport)

    def _protocol_error(self, code: int, message: str) -> None:
        """Send the GOAWAY h2 has queued with `code` (or one: a bad preface raises before
        h2 queues anything) and close.  (H2Server's override also counts it.)"""
        self._close_for_error(code, message)

    def _close_for_error(self, code: int, message: str) -> None:
        """_protocol_error's work, uncounted (a subclass's timeout, counted as one)."""
        self._failed = True
        if not self.conn.terminated:
            try:
                self.conn.close_connection(code)
            except h2.exceptions.ProtocolError:
                pass
        self._flush()
        self._close_transport()

    # -- operations ------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not (self._lost or self._failed or self.transport is None
                    or self.transport.is_closing())

    def _flush(self) -> None:
        """Write what h2 has queued at the end of this event-loop turn, so the frames a
        turn makes (every stream's responses, their WINDOW_UPDATEs) go out in one write:
        a write per frame was an eighth of an HTTP/2 connection's CPU (docs/benchmarks.md).
        Anything that closes the transport writes first (_close_transport)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush_now()
            self.transport.close()

    def _acknowledge(self, stream_id: int, n: int) -> None:
        if n <= 0 or not self.usable:
            return
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.ProtocolError, ValueError):
            return
        self._flush()

    def _consumed(self, stream_id: int, inflow: _Inflow, n: int) -> None:
        n = min(n, inflow.outstanding)
        inflow.outstanding -= n
        self._acknowledge(stream_id, n)

    def _body_event(self, event: h2.events.Event, stream: Any) -> None:
        """A message body's data, trailers or end, for either side's stream state (an
        exchange or a client stream: inflow, body, trailers, remote_ended); None: a stream
        no longer tracked (its data still returns its flow-control credit)."""
        if isinstance(event, h2.events.DataReceived):
            if stream is None:
                self._received(event.stream_id, None, None, event)
            else:
                self._received(event.stream_id, stream.inflow, stream.body, event)
        elif stream is None:
            return
        elif isinstance(event, h2.events.TrailersReceived):
            try:
                stream.trailers = forwardable_trailers(_split(event.headers or [])[1])
            except Refusal as e:  # RFC 9113 8.1.1: a malformed message is a stream error
                log.debug("malformed trailers (stream %d): %s", event.stream_id, e)
                stream.body.fail(MalformedRequest(400, str(e)))
                self._reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
        else:  # StreamEnded
            stream.remote_ended = True
            stream.body.end(stream.trailers)

    def _received(self, stream_id: int, inflow: _Inflow | None, body: Body | None,
                  event: h2.events.DataReceived) -> None:
        """Feed a DATA event to a body; acknowledged now if nobody will read it."""
        data = event.data or b""
        flow = event.flow_controlled_length or 0
        if body is None or inflow is None or body.ended or body.error is not None:
            self._acknowledge(stream_id, flow)
            return
        inflow.outstanding += len(data)
        self._acknowledge(stream_id, flow - len(data))  # padding
        body.feed(data)

    def _release(self, stream_id: int, inflow: _Inflow) -> None:
        """Give back the window of data its reader will never take."""
        n, inflow.outstanding = inflow.outstanding, 0
        self._acknowledge(stream_id, n)

    def _describe(self) -> str:
        """The connection, as a log line names it."""
        return "HTTP/2 connection"

    def _fatal(self, exc: Exception) -> None:
        """Our own side failed (a bug, not the peer): GOAWAY INTERNAL_ERROR and close."""
        log.warning("%s failed: %s", self._describe(), exc)
        try:
            self.conn.close_connection(ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()
        self._failed = True
        self._close_transport()

    def _goaway_and_close(self) -> None:
        """GOAWAY(NO_ERROR) if the connection can still carry it, then close."""
        if self.usable:
            try:
                self.conn.close_connection(ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
        self._close_transport()

    def _reset(self, stream_id: int, code: int) -> None:
        if not self.usable:
            return
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except h2.exceptions.ProtocolError:  # closed already (StreamClosedError among them)
            return
        self._flush()

    def _wake(self, stream_id: int | None = None) -> None:
        if stream_id is None:
            waiting = [f for futures in self._blocked.values() for f in futures]
            self._blocked.clear()
        else:
            waiting = self._blocked.pop(stream_id, [])
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)

    async def _send_data(self, stream_id: int, data: bytes,
                         gone: Callable[[], BaseException | None]) -> None:
        """Send DATA as the peer's window and the transport allow.  `gone` says why the
        stream can take no more (an exception to raise) or None."""
        view = memoryview(data)
        while view:
            error = gone()
            if error is not None:
                raise error
            if not self.usable:
                raise ConnectionResetError("HTTP/2 connection closed")
            try:
                window = min(self.conn.local_flow_control_window(stream_id),
                             self.conn.max_outbound_frame_size)
            except h2.exceptions.ProtocolError as e:
                raise ConnectionResetError(f"HTTP/2 stream {stream_id} closed") from e
            if window <= 0 or self._write_paused:
                fut = self._loop.create_future()
                self._blocked.setdefault(stream_id, []).append(fut)
                await fut
                continue
            chunk = view[:window]
            try:
                self.conn.send_data(stream_id, chunk)
            except h2.exceptions.ProtocolError as e:
                raise ConnectionResetError(f"HTTP/2 stream {stream_id} closed") from e
            view = view[len(chunk):]
            # One frame at a time: the transport's buffer stays within its high-water
            # mark plus a frame, whatever window the peer grants.
            self._flush()

    def _window_event(self, event: h2.events.Event) -> bool:
        """Wake senders on window and settings changes; True if the event was one."""
        if isinstance(event, h2.events.WindowUpdated):
            self._wake(event.stream_id or None)
            return True
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake()
            return True
        return False


# --- downstream: the server side -------------------------------------------------------------


class H2Exchange:
    """One request stream of an H2Server, as the Exchange protocol describes it.

    respond/send/finish raise ConnectionResetError once the client is gone (it reset the
    stream or the connection broke); send() waits for the client's flow-control window.
    """

    def __init__(self, server: H2Server, stream_id: int, request: RequestHead):
        self.server = server
        self.stream_id = stream_id
        self.request = request
        self.inflow = inflow = _Inflow()
        # The body's callback names the server and the window, not the exchange: a bound
        # method would make the exchange a reference cycle (body -> exchange -> body), left
        # to the cyclic collector with its task, request and context after every request.
        self.body = Body(on_consumed=functools.partial(server._consumed, stream_id, inflow))
        self.trailers: Headers | None = None
        self.reset_code: int | None = None  # the client's RST_STREAM code
        self.done = False  # its handler has ended
        self.task: asyncio.Task[None] | None = None  # the handler's
        self._responded = False
        self._local_ended = False
        self.remote_ended = False
        self._gone = False
        self._reset_sent = False

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.server._tasks.discard(task)
        self.server._done(self)
        # A cancelled task keeps its CancelledError, whose traceback holds the handler's
        # frames, which hold this exchange: let go of the task, or that is a cycle.
        self.task = None

    @property
    def client_gone(self) -> bool:
        return self._gone

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def local_ended(self) -> bool:
        return self._local_ended

    def _check(self) -> None:
        if self._gone:
            raise ConnectionResetError("the client is gone")
        if self._reset_sent:
            raise ConnectionResetError("the stream was reset")
        if self._local_ended:
            raise RuntimeError("the response has ended")

    def _gone_error(self) -> BaseException | None:
        try:
            self._check()
        except (ConnectionResetError, RuntimeError) as e:
            return e
        return None

    async def respond(self, head: ResponseHead, *, end: bool = False) -> None:
        self._check()
        if self._responded:
            raise RuntimeError("the response head was sent already")
        fields = [(b":status", str(head.status).encode())] + _wire_fields(head.headers)
        informational = head.status < 200
        self.server._send_headers(self, fields, end=end and not informational)
        if not informational:
            self.server.guard.responded(self.stream_id)
            self._responded = True
            if end:
                self._local_ended = True

    async def send(self, data: bytes) -> None:
        self._check()
        if not self._responded:
            raise RuntimeError("send() before respond()")
        if data:
            await self.server._send_data(self.stream_id, data, self._gone_error)

    async def finish(self, trailers: Headers | None = None) -> None:
        if self._local_ended and not self._gone and not self._reset_sent:
            return
        self._check()
        if not self._responded:
            raise RuntimeError("finish() before respond()")
        fields = _wire_fields(trailers) if trailers else []
        if fields:
            self.server._send_headers(self, fields, end=True)
        else:
            self.server._end_stream(self)
        self._local_ended = True

    def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """RST_STREAM the client's stream (INTERNAL_ERROR unless told, e.g. CANCEL)."""
        if self._reset_sent or self._gone or (self._local_ended and self.remote_ended):
            return
        self._reset_sent = True
        self.server._reset(self.stream_id, code)
        self.server._wake(self.stream_id)
        self.body.fail(BodyError("the stream was reset"))
        self.server._release(self.stream_id, self.inflow)

    def _client_left(self, reason: str) -> None:
        if not self._local_ended:
            self._gone = True
        self.body.fail(BodyError(reason))
        self.server._release(self.stream_id, self.inflow)


class H2Server(_H2Protocol):
    """One downstream HTTP/2 connection; each request runs ``handler(exchange)`` as a task.

    Attach to a listener (``loop.create_server(lambda: H2Server(handler), ...)``) or take
    over a connected transport after sniffing: ``H2Server(handler).attach(transport, first)``.
    The handler answers through the Exchange; when it returns, a response it did not end
    is reset (INTERNAL_ERROR) and an upload it did not wait for is stopped (NO_ERROR).

    A request whose header list exceeds ``max_header_bytes`` (advertised as
    SETTINGS_MAX_HEADER_LIST_SIZE) is answered 431 without the handler; past twice that
    HPACK decoding stops and the connection ends (GOAWAY ENHANCE_YOUR_CALM).
    Protocol errors send h2's GOAWAY (PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR,
    FLOW_CONTROL_ERROR, ...), call ``on_protocol_error(code, message)`` and close.
    ``expect: 100-continue`` is answered here (and removed); ``te: trailers`` stays in the
    request's headers (gRPC needs it end to end), the only hop-by-hop field that does.
    A request whose pseudo-headers RFC 9113 8.3 forbids beyond what h2 checks
    (``check_pseudo_headers``) is reset (PROTOCOL_ERROR) without the handler, and
    ``on_bad_request(reason)`` is called; CONNECT goes to the handler, which refuses it.
    At most ``max_concurrent_streams`` handlers run at once: a stream past that, even one
    h2 would allow because earlier ones were reset, is refused (REFUSED_STREAM).

    The caller owns the idle timeout: ``active_streams`` and ``idle_since`` (loop time the
    last stream ended, None while one is open) say when; then close() or shutdown().
    """

    client_side = False

    def __init__(self, handler: Callable[[Exchange], Awaitable[None]], *,
                 max_header_bytes: int = MAX_HEADER_BYTES,
                 max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
                 stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW,
                 limits: Http2Limits | None = None,
                 on_protocol_error: Callable[[int, str], None] | None = None,
                 on_bad_request: Callable[[str], None] | None = None,
                 on_abuse: Callable[[str], None] | None = None):
        super().__init__(
            stream_window=stream_window, connection_window=connection_window,
            header_limit=max(2 * max_header_bytes, 16 * 1024),
            settings={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            })
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.on_protocol_error = on_protocol_error
        self.on_abuse = on_abuse
        self.on_bad_request = on_bad_request
        self.exchanges: dict[int, H2Exchange] = {}
        self.guard = self.conn.guard = FrameGuard(
            limits or Http2Limits(), clock=self._loop.time, is_open=self._stream_open)
        self.conn.processed_stream_id = 0
        self.peername: Any = None
        self.requests = 0  # streams accepted so far
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._last_stream_id: int | None = None

    def attach(self, transport: asyncio.BaseTransport, initial: bytes = b"") -> H2Server:
        """Take over a connected transport whose first bytes (`initial`, the client's
        preface onwards) a sniffer has already read.  Works for asyncio/uvloop transports
        (whose set_protocol does not call connection_made) and for the tunnel's
        StreamTransport (whose set_protocol does, and replays what arrived before)."""
        transport.set_protocol(self)
        if self.transport is None:
            self.connection_made(transport)
        if initial:
            self.data_received(initial)
        return self

    # -- state -----------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self.exchanges)

    @property
    def closed(self) -> bool:
        return not self.usable

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed_future)

    def shutdown(self) -> None:
        """Graceful: GOAWAY(NO_ERROR), finish the open streams, then close."""
        if self._draining or not self.usable:
            self._draining = True
            return
        self._draining = True
        self._last_stream_id = self.conn.highest_inbound_stream_id
        self.conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self._last_stream_id)
        self._flush()
        if not self.exchanges:
            self._close_transport()

    def close(self) -> None:
        """GOAWAY(NO_ERROR) and close now; open exchanges see client_gone."""
        self._goaway_and_close()

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peername = transport.get_extra_info("peername")
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for exchange in list(self.exchanges.values()):
            exchange._client_left("the client connection was lost")
            self._cancel(exchange)
        super().connection_lost(exc)

    def _protocol_error(self, code: int, message: str) -> None:
        log.info("HTTP/2 protocol error from %s: %s (%d)", self.peername, message, code)
        super()._protocol_error(code, message)
        if self.on_protocol_error is not None:
            self.on_protocol_error(code, message)

    def _abuse(self, abuse: Abuse) -> None:
        log.warning("HTTP/2 client %s over its budget (%s): %s; GOAWAY ENHANCE_YOUR_CALM",
                    self.peername, abuse.reason, abuse)
        super()._abuse(abuse)
        for exchange in list(self.exchanges.values()):
            exchange._client_left("the connection was closed for abuse")
            self._cancel(exchange)
        if self.on_abuse is not None:
            self.on_abuse(abuse.reason)

    def _stream_open(self, stream_id: int) -> bool:
        """Is the stream open in h2 (judged as a frame arrives, before its events)?"""
        stream = self.conn.streams.get(stream_id)
        return stream is not None and not stream.closed

    @staticmethod
    def _cancel(exchange: H2Exchange) -> None:
        """The client is gone: stop its handler, so whatever the request set going upstream
        is given up (a stream reset, a connection closed, a request never sent)."""
        task = exchange.task
        if task is not None and not task.done():
            task.cancel()

    # -- events ----------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers or [])
        elif isinstance(event, _BODY_EVENTS):
            self._body_event(event, self.exchanges.get(event.stream_id))
        elif isinstance(event, h2.events.StreamReset):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.reset_code = int(event.error_code)
                exchange.remote_ended = True
                exchange._client_left(f"the client reset the stream ({event.error_code!r})")
                self._wake(event.stream_id)
                self._cancel(exchange)  # the guard judged the reset as its frame came
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client goes away: nothing new will come; what is open may finish.
            self._draining = True
            if not self.exchanges:
                self._close_transport()
        else:
            self._window_event(event)

    def _request(self, stream_id: int, fields: list[tuple[bytes, bytes]]) -> None:
        if self._draining and (self._last_stream_id is None or stream_id > self._last_stream_id):
            self.guard.forget(stream_id)
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.exchanges) >= self.max_concurrent_streams:
            # h2 frees a stream's slot when the client resets it, but its handler runs on:
            # count the handlers too, so opening and resetting streams (CVE-2023-44487,
            # "rapid reset") cannot start handlers without bound.
            self.guard.forget(stream_id)
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        handler: Callable[[Exchange], Awaitable[None]] = self.handler
        try:  # RFC 9113 8.3; h2 has checked the rest of 8.2 and 8.3 (see the docstring)
            pseudo, headers, size, host, continue_ = _request_fields(fields)
            authority = pseudo.get(":authority") or host
            check_pseudo_headers(pseudo, authority)
        except Refusal as e:
            # CONNECT (and extended CONNECT) is well formed: the manager refuses it with
            # 403 and counts it as an upgrade refusal (nodeproxy/codec/upgrade.py).
            if e.reason != "connect":
                log.debug("malformed HTTP/2 request from %s (stream %d): %s",
                          self.peername, stream_id, e)
                if self.on_bad_request is not None:
                    self.on_bad_request(e.reason)
                self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
                abuse = self.guard.stream_refused(stream_id)
                if abuse is not None:
                    self._abuse(abuse)
                return
        method = pseudo.get(":method", "")
        request = RequestHead(
            method=method, path=pseudo.get(":path", ""), authority=authority,
            headers=headers, scheme=pseudo.get(":scheme", "http"), version="2")
        exchange = H2Exchange(self, stream_id, request)
        self.exchanges[stream_id] = exchange
        self.idle_since = None
        self.requests += 1
        if size > self.max_header_bytes:
            handler = _too_large
        elif handler is self.handler:
            if continue_:  # as Envoy does by default: answer it here, do not forward it
                with contextlib.suppress(ConnectionResetError):
                    self._send_headers(exchange, [(b":status", b"100")], end=False)
        task = exchange.task = self._loop.create_task(self._run(exchange, handler))
        self.conn.processed_stream_id = stream_id
        self._tasks.add(task)
        # A task cancelled before it ran never enters _run: its exchange still ends.
        task.add_done_callback(exchange._task_done)

    async def _run(self, exchange: H2Exchange,
                   handler: Callable[[Exchange], Awaitable[None]]) -> None:
        try:
            await handler(exchange)
        except Exception:
            log.exception("HTTP/2 request handler failed (stream %d)", exchange.stream_id)
        finally:
            self._done(exchange)

    def _done(self, exchange: H2Exchange) -> None:
        if exchange.done:
            return
        exchange.done = True
        self.guard.stream_ended(exchange.stream_id)
        if not exchange.client_gone and not exchange._reset_sent:
            if not exchange.local_ended:
                exchange.reset(ErrorCodes.INTERNAL_ERROR)
            elif not exchange.remote_ended:
                exchange.reset(ErrorCodes.NO_ERROR)  # RFC 9113 8.1: stop the upload
        if not exchange.body.ended:
            exchange.body.fail(BodyError("the exchange ended"))
        self._release(exchange.stream_id, exchange.inflow)
        self.exchanges.pop(exchange.stream_id, None)
        if not self.exchanges:
            self.idle_since = self._loop.time()
            if self._draining:
                self._close_transport()

    # -- called by exchanges ---------------------------------------------------------------

    def _send_headers(self, exchange: H2Exchange, fields: list[tuple[bytes, bytes]],
                      *, end: bool) -> None:
        if not self.usable:
            raise ConnectionResetError("the client connection is closed")
        try:
            self.conn.send_headers(exchange.stream_id, fields, end_stream=end)
        except h2.exceptions.StreamClosedError as closed:
            raise ConnectionResetError("the stream is closed") from closed
        except h2.exceptions.ProtocolError as e:
            # h2 refused them part way through HPACK encoding: the connection's header
            # compression state can no longer be trusted.
            self._fatal(e)
            raise ConnectionResetError(f"HTTP/2 headers refused: {e}") from e
        self._flush()

    def _end_stream(self, exchange: H2Exchange) -> None:
        if not self.usable:
            raise ConnectionResetError("the client connection is closed")
        try:
            self.conn.end_stream(exchange.stream_id)
        except h2.exceptions.ProtocolError as e:
            raise ConnectionResetError("the stream is closed") from e
        self._flush()

    def _describe(self) -> str:
        return f"HTTP/2 connection to {self.peername}"


async def _too_large(exchange: Exchange) -> None:
    await exchange.respond(ResponseHead(431, [("content-length", "0")]), end=True)


def check_pseudo_headers(pseudo: dict[str, str], authority: str) -> None:
    """What RFC 9113 8.3 asks of a request's pseudo-headers beyond h2's own checks
    (presence, order, repetition, names): ``:method`` a token, ``:scheme`` http or
    https, ``:path`` in origin form (``*`` for OPTIONS), the authority without userinfo.
    Raises Refusal."""
    method = pseudo.get(":method", "")
    check_method(method)
    if method == "CONNECT":
        raise Refusal("connect", "CONNECT is not proxied")
    if pseudo.get(":scheme") not in ("http", "https"):
        raise Refusal("bad_scheme", f":scheme {pseudo.get(':scheme', '')[:32]!r}")
    check_authority(authority)
    check_target(method, pseudo.get(":path", ""))


# --- upstream: the client side ---------------------------------------------------------------


class UpstreamBody(Body):
    """A response body from an H2Client; cancel() resets its stream (CANCEL) when the
    caller gives the response up before its end."""

    def __init__(self, on_consumed: Callable[[int], None], on_cancel: Callable[[], None]):
        super().__init__(on_consumed)
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.ended and self.error is None:
            self._on_cancel()


class _ClientStream:
    def __init__(self, client: H2Client, stream_id: int):
        self.stream_id = stream_id
        self.inflow = inflow = _Inflow()
        self.response: asyncio.Future[UpstreamResponse] = client._loop.create_future()
        self.response.add_done_callback(_retrieve)
        # Callbacks that name the client and the stream id, never this object: a closure
        # over it would make every stream a reference cycle for the cyclic collector.
        self.body = UpstreamBody(functools.partial(client._consumed, stream_id, inflow),
                                 functools.partial(client._cancel_stream, stream_id))
        self.trailers: Headers | None = None
        self.pump: asyncio.Task[None] | None = None
        self.local_ended = False
        self.remote_ended = False
        self.error: BaseException | None = None  # why it can send no more

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.response.done():
            self.response.set_exception(exc)
        else:
            self.body.fail(exc)
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()


class H2Client(_H2Protocol):
    """One upstream HTTP/2 connection with prior knowledge (h2c, or h2 inside a tunnel).

    Attach it to any transport: ``loop.create_connection(H2Client, host, port)``
    (see open_h2c), or ``H2Client().attach(transport)`` for one that is already connected
    (a TCP socket, an HBONE StreamTransport: only write, close, abort, is_closing and
    get_extra_info are used).  The connection preface goes out at once; requests may be
    sent right away (``ready`` resolves when the server's SETTINGS arrive).

    After a GOAWAY from the server (or shutdown()) it takes no new streams; streams the
    server never processed fail with ``refused_stream=True``, the others finish.
    """

    client_side = True

    def __init__(self, *, stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW,
                 max_header_bytes: int = MAX_HEADER_BYTES,
                 on_lost: Callable[[H2Client], None] | None = None):
        super().__init__(
            stream_window=stream_window, connection_window=connection_window,
            header_limit=max(2 * max_header_bytes, 16 * 1024),
            settings={
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                # Servers open no streams here: push is off.
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
            })
        self.streams: dict[int, _ClientStream] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.goaway = False  # the server sent GOAWAY, or we shut down
        self.goaway_code: int | None = None
        self.requests = 0
        self._closing = False
        self._on_lost = on_lost

    def attach(self, transport: asyncio.BaseTransport) -> H2Client:
        """Use an already-connected transport (set_protocol, then start the preface)."""
        transport.set_protocol(self)
        if self.transport is None:  # asyncio's set_protocol does not call connection_made
            self.connection_made(transport)
        return self

    # -- UpstreamConnection ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.goaway or self._closing or not self.usable

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def max_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS; until its SETTINGS arrive, 100
        (RFC 9113 5.1.2 asks servers for no fewer; h2 would assume no limit)."""
        limit = int(self.conn.remote_settings.max_concurrent_streams)
        return limit if self.ready.done() else min(limit, INITIAL_STREAMS)

    def can_take(self) -> bool:
        if self.closed:
            return False
        limit = self.max_streams
        conn = self.conn
        # Every open stream is in h2's `streams` (closed ones too until h2 culls them) or
        # shelved: below the limit there, h2's exact count (a walk over every stream, an
        # interpreted property per stream) cannot reach it.
        if len(conn.streams) + conn.shelved < limit:
            return True
        return conn.open_outbound_streams < limit

    async def wait_ready(self, timeout: float) -> None:
        """Wait for the server's SETTINGS (proof it speaks HTTP/2)."""
        await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def send(self, head: RequestHead, body: OutgoingBody) -> UpstreamResponse:
        """Open a stream, send the head, stream the body in the background; return the
        response head (1xx skipped) with its body.  UpstreamError("UC") when the server
        resets the stream before its head (refused_stream for REFUSED_STREAM, or a stream
        above a GOAWAY's last stream id) or the connection fails; a BodyError from the
        request body (its client went away) is raised as it is.  Cancelling the caller
        resets the stream (CANCEL)."""
        if self.closed:
            raise UpstreamError("UC", "upstream HTTP/2 connection closed", refused_stream=True)
        if not self.can_take():
            raise UpstreamError("UC", "no free HTTP/2 stream", refused_stream=True)
        authority = head.authority or self._peer_authority()
        fields = [(b":method", _encode(head.method))]
        if head.method == "CONNECT":
            fields.append((b":authority", _encode(authority)))
        else:
            fields += [(b":scheme", _encode(head.scheme or "http")),
                       (b":authority", _encode(authority)),
                       (b":path", _encode(head.path or "/"))]
        te = (head.header("te") or "").lower()
        fields += _wire_fields(head.headers)
        if head.is_grpc or "trailers" in te:
            fields.append((b"te", b"trailers"))
        try:
            stream_id = self.conn.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError as used_up:
            self.shutdown()
            raise UpstreamError("UC", "HTTP/2 stream ids used up",
                                refused_stream=True) from used_up
        stream = _ClientStream(self, stream_id)
        end = body.ended and not body.trailers
        try:
            self.conn.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            self._fatal(e)
            raise UpstreamError("UC", f"HTTP/2 request headers refused: {e}",
                                refused_stream=True) from e
        self.streams[stream_id] = stream
        self.idle_since = None
        self.requests += 1
        self._flush()
        if end:
            stream.local_ended = True
        else:
            stream.pump = self._loop.create_task(self._pump(stream, body))
        response = stream.response
        del stream
        try:
            return await response
        except BaseException as failure:
            # The future keeps the error, the error's traceback this frame: no local of
            # the frame may lead back to the future, or each failed request is a cycle.
            del response
            if isinstance(failure, asyncio.CancelledError):
                self._cancel_stream(stream_id)
            raise

    def _peer_authority(self) -> str:
        """For a request without one (HTTP/1.0 without Host): HTTP/2 requires it."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        return "localhost"

    def shutdown(self) -> None:
        """No new streams; GOAWAY and close once the open ones end."""
        self.goaway = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        """GOAWAY and close; whatever is in flight fails with UpstreamError("UC")."""
        if self._closing:
            return
        self._closing = True
        self._goaway_and_close()

    # -- the request body ------------------------------------------------------------------

    async def _pump(self, stream: _ClientStream, body: OutgoingBody) -> None:
        sid = stream.stream_id
        try:
            while True:
                data = await body.read()
                if not data:
                    break
                await self._send_data(sid, data, lambda: stream.error)
        except BodyError as broken:  # the request body broke off: its client went away
            self._reset(sid, ErrorCodes.CANCEL)
            self._finish(stream, broken)
            return
        except (ConnectionResetError, UpstreamError):
            return  # the stream or the connection ended; its events have said why
        if stream.error is not None or not self.usable:
            return
        trailers = _wire_fields(body.trailers) if body.trailers else []
        try:
            if trailers:
                self.conn.send_headers(sid, trailers, end_stream=True)
            else:
                self.conn.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            return
        except h2.exceptions.ProtocolError as e:  # refused mid-HPACK: see H2Server
            self._fatal(e)
            return
        self._flush()
        stream.local_ended = True
        self._maybe_done(stream)

    # -- events ----------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.response.done():
                pseudo, headers = _split(event.headers or [])
                try:
                    status = int(pseudo.get(":status", ""))
                except ValueError:
                    status = 502
                head = ResponseHead(status, [(n, v) for n, v in headers
                                             if n not in HOP_BY_HOP])
                stream.response.set_result(UpstreamResponse(head, stream.body))
        elif isinstance(event, _BODY_EVENTS):
            stream = self.streams.get(event.stream_id)
            self._body_event(event, stream)
            if stream is not None and isinstance(event, h2.events.StreamEnded):
                self._maybe_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                code = int(event.error_code)
                if stream.remote_ended and code == ErrorCodes.NO_ERROR:
                    # The response is complete; the server wants no more of the request.
                    if stream.pump is not None:
                        stream.pump.cancel()
                    stream.local_ended = True
                    self._maybe_done(stream)
                else:
                    self._finish(stream, UpstreamError(
                        "UC", f"upstream reset the stream ({_code_name(code)})",
                        refused_stream=(code == ErrorCodes.REFUSED_STREAM)))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(int(event.error_code or 0), event.last_stream_id)
        else:
            self._window_event(event)

    def _goaway(self, code: int, last_stream_id: int | None) -> None:
        self.goaway = True
        self.goaway_code = code
        last = last_stream_id if last_stream_id is not None else 2**31 - 1
        for sid, stream in list(self.streams.items()):
            if sid > last:
                self._finish(stream, UpstreamError(
                    "UC", f"upstream GOAWAY ({_code_name(code)}) before the stream was "
                    "processed", refused_stream=True))
        if not self.streams:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        error = UpstreamError("UC", "upstream connection lost" + (f": {exc}" if exc else ""))
        for stream in list(self.streams.values()):
            self._finish(stream, error)
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("upstream connection lost"))
        super().connection_lost(exc)
        if self._on_lost is not None:
            self._on_lost(self)

    def _protocol_error(self, code: int, message: str) -> None:
        log.info("HTTP/2 protocol error from upstream %s: %s (%d)",
                 self.transport.get_extra_info("peername") if self.transport else None,
                 message, code)
        super()._protocol_error(code, message)

    # -- stream lifecycle ------------------------------------------------------------------

    def _cancel(self, stream: _ClientStream) -> None:
        self._reset(stream.stream_id, ErrorCodes.CANCEL)
        self._finish(stream, UpstreamError("UC", "the request was cancelled"))

    def _cancel_stream(self, stream_id: int) -> None:
        """A response body given up before its end (UpstreamBody.cancel): its stream, if
        still open here (one that ended or failed has been forgotten, and its body says so)."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._cancel(stream)

    def _finish(self, stream: _ClientStream, exc: BaseException) -> None:
        stream.fail(exc)
        self._wake(stream.stream_id)
        self._release(stream.stream_id, stream.inflow)
        self._forget(stream)

    def _maybe_done(self, stream: _ClientStream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: _ClientStream) -> None:
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if not self.streams:
            self.idle_since = self._loop.time()
            if self.goaway and not self._lost:
                self.close()

    def _describe(self) -> str:
        return "upstream HTTP/2 connection"


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


async def open_h2c(host: str, port: int, **options: Any) -> H2Client:
    """A prior-knowledge h2c connection over TCP: ``timeout`` (seconds, 5 by default) to
    connect; the other options go to H2Client.  (No default before ``**options``: mypyc
    cannot build such a coroutine's signature.)"""
    timeout = float(options.pop("timeout", 5.0))
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: H2Client(**options), host, port), timeout)
    return client

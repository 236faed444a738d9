"""HTTP/1.1 codec on httptools (llhttp, Node's parser): both sides of the proxy.

H1Server is the downstream side.  It parses a client connection's requests (keep-alive,
pipelining: requests are answered in order, one at a time), streams bodies with
backpressure (a full body buffer pauses the socket), answers ``Expect: 100-continue``
when the body is first read (so a request refused before that never uploads), and
hands Upgrade requests over whole (``H1Exchange.take_over``).  llhttp is strict by
default: conflicting Content-Length and Transfer-Encoding, duplicate Content-Length,
invalid chunk sizes, bare LF line ends, obsolete line folding, and control characters
in the request line are errors.  On top of it this codec refuses a header block over
its limit (431; also while one field is still arriving: llhttp hands a field over only
when it ends and buffers it until then, so the bytes fed since the parser last handed
anything over are bounded too, ``_quiet_bytes``), any transfer coding but ``chunked``
(501, as Envoy does), Host sent twice, and a target or Host that request_target.py
finds malformed (400: absolute form, ``*`` but for OPTIONS, a fragment, a bad escape,
userinfo); header values lose surrounding whitespace.  Every malformed request gets its
error response and the connection is closed; nothing else is touched.

Request-header timeout (HAProxy's ``timeout http-request``): a request head must be
complete within ``request_headers_timeout`` of its first byte, and a new connection must
complete its first head within it of being accepted.  Past it the client gets 408 and
the connection closes; a connection that sent nothing at all is closed without a
response (a browser's pre-connect would take a 408 for the answer to its next request).
Between requests the keep-alive idle timeout applies instead.

An upgrade request (``Connection: upgrade`` with ``Upgrade``, or CONNECT) ends HTTP
parsing on its connection for good: what the client sends after its head is held, unread
by any parser and unforwarded (at most MAX_UPGRADE_EARLY_BYTES, beyond which the
connection is reset), until the handler either takes the connection over
(``H1Exchange.take_over``, after the upstream's 101) or answers with an ordinary
response, after which the connection closes and the held bytes are dropped.  They are
never parsed as a next request: a request smuggled behind an upgrade never skips policy.

H1Client is the upstream side: one request at a time on a pooled connection, the
request body framed by its Content-Length or chunked, the response streamed back.  An
upgrade request (``send(..., upgrade=token)``, on a connection of its own) completes
with a 101 response whose ``upgraded_to`` is the upstream's Upgrade token; the bytes after
the 101 head are held for ``detach``.  A 101 to a request that offered no upgrade is an
upstream protocol error (flag UPE).  An upstream is bounded like a client: a response
header block over ``max_header_bytes``, counted as the server side counts it, fails the
response (flag UC) and closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from nodeproxy.codec.message import (
    HOP_BY_HOP,
    MAX_HEADER_BYTES,
    NO_BODY,
    Body,
    BodyError,
    Headers,
    MalformedRequest,
    OutgoingBody,
    RequestHead,
    ResponseHead,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.codec.request_target import Refusal, check_authority, check_target

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 256 * 1024
MAX_PIPELINED = 16  # parsed requests waiting for their turn before reading pauses
# Bytes a client may send after an upgrade request's head before the upstream's 101: held,
# neither parsed nor forwarded; more resets the connection (a WebSocket client sends
# nothing before the handshake completes, RFC 6455 4.1).
MAX_UPGRADE_EARLY_BYTES = 64 * 1024

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created",
    202: "Accepted", 204: "No Content", 206: "Partial Content", 301: "Moved Permanently",
    302: "Found", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _reason(status: int) -> bytes:
    return REASONS.get(status, "Status").encode()


# The status line of every status REASONS names, made once (one lookup per response).
_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
                 for status in REASONS}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))


# Header names as they usually arrive, lowercased once: on_header looks a name up here
# before decoding and lowercasing it.  A fixed table (never filled from the wire), so a
# client cannot grow it; a name not in it is decoded as before, to the same string.
_NAMES = {raw.encode("latin-1"): raw.lower() for name in (
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "accept-ranges",
    "authorization", "cache-control", "connection", "content-encoding", "content-length",
    "content-type", "cookie", "date", "etag", "expect", "keep-alive", "last-modified",
    "location", "origin", "pragma", "referer", "server", "set-cookie", "te",
    "traceparent", "tracestate", "transfer-encoding", "upgrade", "vary", "via",
    "x-forwarded-for", "x-forwarded-proto", "x-request-id", "grpc-status",
    "grpc-message", "grpc-encoding", "grpc-accept-encoding", "grpc-timeout",
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "b3",
) for raw in (name, name.title(), name.upper())}
_NAMES[b"ETag"] = "etag"


def _header_lines(headers: Headers) -> str:
    """``name: value\r\n`` per header, hop-by-hop ones left out: one string, encoded
    once by the caller (not two encodes per header)."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers
                    if name not in HOP_BY_HOP])


def _no_body_status(status: int) -> bool:
    return 100 <= status < 200 or status in (204, 304)


class SentHeads:
    """The response heads of one client connection, encoded: the last one is kept with
    everything it was made of, and a head made of the same gets its bytes again without
    encoding (a backend's heads repeat but for a Date that changes once a second)."""

    def __init__(self) -> None:
        self._status = -1
        self._framing = ""
        self._headers: Headers = []
        self._bytes = b""

    def encode(self, status: int, headers: Headers, framing: str) -> bytes:
        """The status line, `headers` but the hop-by-hop ones, the codec's own `framing`
        lines, the blank line.  The key is all of what the bytes are made of (a copy of
        the header list, compared field by field, name and value), so what goes out is
        always the encoding of the head passed in."""
        if status == self._status and framing == self._framing and headers == self._headers:
            return self._bytes
        data = _status_line(status) + (
            _header_lines(headers) + framing + "\r\n").encode("latin-1")
        self._status, self._framing = status, framing
        self._headers, self._bytes = list(headers), data
        return data


class BadRequest(Exception):
    """A request the proxy refuses to parse further: `status` is what the client gets,
    `label` the fixed reason it is counted under (`reason`, which may quote the request,
    is only logged)."""

    def __init__(self, status: int, reason: str, label: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.label = label or reason


class _Writer:
    """Write-side flow control shared by both codecs: await while the socket is full."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._resumed: asyncio.Future[None] | None = None
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def lost(self) -> None:
        self.resume_writing()

    async def drain(self) -> None:
        while self.paused and self.transport is not None and not self.transport.is_closing():
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed


# --- downstream --------------------------------------------------------------------------


class H1Exchange:
    """One request of a client connection (the Exchange interface of message.py)."""

    # An upgrade request that declares a body (Content-Length above 0, Transfer-Encoding):
    # llhttp treats what follows its head as the upgraded protocol, not as that body.
    declares_body = False

    def __init__(self, server: H1Server, head: RequestHead, *, keep_alive: bool,
                 expect_continue: bool, upgrade: bool, header_bytes: int,
                 has_body: bool = True):
        self._server = server
        self.request = head
        # A request whose head ends it (no Content-Length, no Transfer-Encoding: RFC 9112
        # 6.3, as llhttp frames it) gets the shared ended body: no Body, deque and bound
        # method per GET.  on_body refuses bytes for it, should llhttp ever disagree.
        self.body: Body = NO_BODY if not has_body and not expect_continue else (
            _ContinueBody(self, server.body_consumed) if expect_continue
            else Body(on_consumed=server.body_consumed))
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.header_bytes = header_bytes
        server.head_received()
        self._expect_continue = expect_continue
        self.responded = False
        self.finished = False
        self.bytes_sent = 0
        self._chunked = False
        self._remaining: int | None = None  # declared Content-Length still to send
        self._no_body = False
        self._head_bytes = b""

    @property
    def client_gone(self) -> bool:
        return self._server.lost and not self.finished

    def send_continue(self) -> None:
        if self._expect_continue and not self.responded:
            self._expect_continue = False
            self._server.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def respond(self, head: ResponseHead, *, end: bool = False) -> None:
        self._begin(head, end)
        if end:
            await self.finish()

    def _begin(self, head: ResponseHead, end: bool) -> None:
        """The response head, kept to go out with the first body bytes (one write, one
        packet)."""
        if self.responded:
            raise RuntimeError("response already started")
        self.responded = True
        length = head.header("content-length")
        self._no_body = self.request.method == "HEAD" or _no_body_status(head.status)
        framing = ""
        if not self._no_body:
            if length is not None:
                self._remaining = int(length)
            elif end:
                framing = "content-length: 0\r\n"
                self._remaining = 0
            elif self.request.version == "1.1":
                framing = "transfer-encoding: chunked\r\n"
                self._chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        elif length is not None and self.request.method == "HEAD":
            self._remaining = 0
        if not self.keep_alive:
            framing += "connection: close\r\n"
        data = self._server.sent_heads.encode(head.status, head.headers, framing)
        self.bytes_sent += len(data)
        self._head_bytes = data

    async def send(self, data: bytes) -> None:
        if self._body_bytes(data):
            await self._server.writer.drain()

    def _body_bytes(self, data: bytes) -> bool:
        """Write body bytes (with the head, if it has not gone yet); False when there was
        nothing to write."""
        if not data or self._no_body or self.finished:
            return False
        if self._remaining is not None:
            if len(data) > self._remaining:
                data = data[:self._remaining]  # never more than the head declared
            self._remaining -= len(data)
        self.bytes_sent += len(data)
        head, self._head_bytes = self._head_bytes, b""
        if self._chunked:
            self._server.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
        else:
            self._server.write(head + data if head else data)
        return True

    def respond_whole(self, head: ResponseHead, data: bytes) -> bool:
        """``respond``, ``send(data)`` and ``finish()`` in one call, for a response whose
        whole body is at hand (ended, no trailers): the same bytes, no coroutine.  False
        when the socket is full after the write: then the caller drains, checks
        ``client_gone`` and finishes, as after ``send`` (also when the client has gone:
        the caller's check after ``send`` is what flags it)."""
        self._begin(head, not data)
        if data:
            wrote = self._body_bytes(data)
            if (wrote and self._server.writer.paused) or self._server.lost:
                return False
        self._finish_now(None)
        return True

    async def drain(self) -> None:
        """Wait while the client's socket is full."""
        await self._server.writer.drain()

    async def finish(self, trailers: Headers | None = None) -> None:
        self._finish_now(trailers)

    def _finish_now(self, trailers: Headers | None) -> None:
        if self.finished:
            return
        head, self._head_bytes = self._head_bytes, b""
        if head:
            self._server.write(head)
        if self._chunked:
            tail = b"".join(b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1"))
                            for n, v in trailers or ())
            self._server.write(b"0\r\n" + tail + b"\r\n")
        elif self._remaining:
            # Fewer bytes than the Content-Length announced: the client must not take a
            # truncated body for a whole one.
            self.reset()
            return
        self.finished = True
        self._server.exchange_done(self)

    def reset(self) -> None:
        self.finished = True
        self._server.abort()

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """An upgraded connection (WebSocket...) leaves HTTP: the raw transport and the bytes
        the client sent after the request head.  Call only after the upstream's 101; the
        caller owns the transport from now on and calls `released` when it has closed."""
        self.finished = True
        return self._server.detach()

    def released(self) -> None:
        """The taken-over connection has ended (its tracker may forget it)."""
        self._server.detached_closed()


class _ContinueBody(Body):
    """A body that answers ``Expect: 100-continue`` when it is first read."""

    def __init__(self, exchange: H1Exchange, on_consumed: Callable[[int], None]):
        super().__init__(on_consumed)
        self._exchange = exchange

    async def read(self) -> bytes:
        self._exchange.send_continue()
        return await super().read()


Handler = Callable[[H1Exchange], Awaitable[None]]


def _unfinished_field(in_head: bool, limit: int) -> BadRequest:
    """Over `limit` bytes fed with nothing handed over: one header field (or a trailer
    field, after the head) that does not end, which llhttp would buffer whole."""
    if in_head:
        return BadRequest(431, f"request header block over {limit} bytes",
                          "header_too_large")
    return BadRequest(400, f"trailer field over {limit} bytes", "trailer_too_large")


class H1Server:
    """A client connection speaking HTTP/1.x (see the module docstring).

    An asyncio protocol by its methods, not by its base class: uvloop and asyncio call
    a protocol's methods and never check its class, and without the Python base
    ``asyncio.Protocol`` mypyc compiles this as a native class (attributes in C slots,
    methods called directly; docs/benchmarks.md, "native protocol classes")."""

    def __init__(self, handler: Handler, *, max_header_bytes: int,
                 idle_timeout: float,
                 on_bad_request: Callable[[str], None] | None = None,
                 on_closed: Callable[[], None] | None = None,
                 request_headers_timeout: float | None = None,
                 on_timeout: Callable[[str], None] | None = None):
        self._handler = handler
        self._headers_timeout = request_headers_timeout
        self._on_timeout = on_timeout
        self._head_since: float | None = None  # loop time an unfinished head began
        self._head_empty = True  # nothing of that head has arrived yet (a new connection)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None  # the first head was awaited since
        self._max_header_bytes = max_header_bytes
        self._idle_timeout = idle_timeout
        self._on_bad_request = on_bad_request
        self._on_closed = on_closed
        self._parser = httptools.HttpRequestParser(self)
        self.writer = _Writer()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._queue: deque[H1Exchange] = deque()  # parsed, waiting their turn
        self._current: H1Exchange | None = None  # being answered
        self._parsing: H1Exchange | None = None  # its body is being parsed
        self._url = bytearray()
        self._headers: Headers = []
        self._header_bytes = 0
        self._quiet_bytes = 0  # fed since llhttp last handed anything over
        self._paused = False
        self._detached = False  # after a malformed request, or taken over: input ignored
        self._upgraded = False  # llhttp saw an upgrade: HTTP parsing has ended for good
        self._upgrade_rest = bytearray()  # held client bytes after the upgrade head
        self._idle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set when connected
        self._idle_since: float | None = None  # loop time the last request ended
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None  # serves the requests in turn
        self._wakeup: asyncio.Future[H1Exchange] | None = None  # the worker waits on it
        self._handoff: H1Exchange | None = None  # next, while the worker ends the last
        self._draining = False
        self._client_eof = False
        self.sent_heads = SentHeads()  # the last response head, encoded

    def attach(self, transport: asyncio.Transport, initial: bytes,
               waiting_since: float | None = None) -> None:
        """Take over a connected transport whose first bytes have already been read (the
        first request head has been awaited since `waiting_since`, loop time)."""
        transport.set_protocol(self)  # type: ignore[arg-type]  # a protocol by its methods
        self._waiting_since = waiting_since
        self.connection_made(transport)
        if initial:
            self.data_received(initial)

    # -- the asyncio protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream protocol's transport
        self.transport = stream
        self.writer.transport = stream
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        stream.resume_reading()
        self._loop = asyncio.get_running_loop()  # the idle and head timers' clock
        self._arm_idle()
        self._head_begins()  # the first request's head is awaited from now

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            self._hold(data)
            return
        if self._detached:
            return
        try:
            self._quiet_bytes += len(data)  # a callback resets it
            self._parser.feed_data(data)
            if self._quiet_bytes > self._max_header_bytes:
                raise _unfinished_field(self._parsing is None, self._max_header_bytes)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            self._upgraded = True
            self._pause()  # the rest belongs to the upgraded protocol, if the upstream agrees
            # Whatever the handler does, this connection never parses HTTP again: it ends
            # after the upgrade request (the last parsed), unless taken over.
            upgrading = self._queue[-1] if self._queue else self._current
            if upgrading is not None:
                upgrading.keep_alive = False
            self._hold(data[offset:])
        except BadRequest as e:
            self._bad_request(e.status, e.reason, e.label)
        except httptools.HttpParserError as e:
            # httptools wraps what a callback raises: our own refusals keep their status.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, BadRequest):
                self._bad_request(cause.status, cause.reason, cause.label)
            else:  # llhttp's messages are fixed texts ("Invalid header value char", ...)
                self._bad_request(400, str(e) or type(e).__name__)

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._parsing is not None:
            self._parsing.body.fail(BodyError("client closed during the request body"))
        # A half-closed client may still read the answers to what it sent; then we close.
        if self.idle:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writer.lost()
        if self._idle is not None:
            self._idle.cancel()
        if self._head_timer is not None:
            self._head_timer.cancel()
        for exchange in (self._parsing, self._current, *self._queue):
            if exchange is not None:
                exchange.body.fail(BodyError("client connection lost"))
        if not self._detached:
            # The client is gone: what its request set going upstream is given up (an
            # upstream connection mid-request is closed, a request not sent never is).
            for task in list(self._tasks):
                task.cancel()
        if self._on_closed is not None:
            self._on_closed()

    def pause_writing(self) -> None:
        self.writer.pause_writing()

    def resume_writing(self) -> None:
        self.writer.resume_writing()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._quiet_bytes = 0
        self._url.clear()
        self._headers = []
        self._header_bytes = 0
        self._head_begins()
        self._head_empty = False

    def on_url(self, url: bytes) -> None:
        self._quiet_bytes = 0
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._quiet_bytes = 0
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            self._count_header_bytes(0)  # raises the 431
        # RFC 9110 5.5: whitespace around a value is not part of it (llhttp leaves the
        # trailing part); policy must see the value the backend will.
        lowered = _NAMES.get(name)
        self._headers.append((lowered if lowered is not None
                              else name.decode("latin-1").lower(),
                              value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        method = parser.get_method().decode()
        headers: Headers = []
        authority = ""
        connection: set[str] = set()
        expect_continue = upgrade = framed = False
        hosts = 0
        for name, value in self._headers:
            if name == "host":
                authority = value
                hosts += 1
            elif name == "connection":
                connection.update(t.strip().lower() for t in value.split(","))
            elif name == "content-length":
                framed = True
                headers.append((name, value))
            elif name == "transfer-encoding":
                framed = True
                if value.strip().lower() != "chunked":
                    raise BadRequest(501, f"transfer coding {value!r} not supported",
                                     "transfer_coding")
            elif name == "expect":
                if value.strip().lower() != "100-continue":
                    raise BadRequest(417, f"unsupported expectation {value!r}", "expectation")
                expect_continue = version == "1.1"
            elif name == "upgrade":
                upgrade = True
                headers.append((name, value))
            elif name not in HOP_BY_HOP:
                headers.append((name, value))
        if version == "1.1" and not authority:
            raise BadRequest(400, "HTTP/1.1 request without Host", "no_host")
        if hosts > 1:
            raise BadRequest(400, f"Host sent {hosts} times", "repeated_host")
        # RFC 9110 7.6.1: the fields Connection names are hop-by-hop too.
        named = connection - {"close", "keep-alive", "upgrade"}
        if named:
            headers = [(n, v) for n, v in headers if n not in named]
        upgrade = upgrade and "upgrade" in connection and parser.should_upgrade()
        url = bytes(self._url).decode("latin-1")
        if method == "CONNECT":
            upgrade = True  # llhttp ends HTTP parsing after it; the handler refuses it
        else:
            try:  # RFC 9112 3.2 and 3.2.2; normalizing is the manager's (request_target.py)
                check_authority(authority)
                check_target(method, url)
            except Refusal as e:
                bad = BadRequest(400, str(e), e.reason)
                bad.__cause__ = e  # not `from e`: see message.caused_by
                raise bad  # noqa: B904 - chained above
        keep_alive = parser.should_keep_alive() and not upgrade
        exchange = H1Exchange(
            self, RequestHead(method, url, authority, headers, version=version),
            keep_alive=keep_alive and not self._draining, expect_continue=expect_continue,
            upgrade=upgrade, header_bytes=self._header_bytes, has_body=framed)
        if upgrade:
            exchange.declares_body = any(
                n == "transfer-encoding" or (n == "content-length" and v.strip() != "0")
                for n, v in self._headers)
        self._parsing = exchange
        self._queue.append(exchange)
        if len(self._queue) > MAX_PIPELINED:
            self._pause()
        self._next()

    def on_body(self, body: bytes) -> None:
        self._quiet_bytes = 0
        if self._parsing is not None:
            if self._parsing.body is NO_BODY:
                # Body bytes for a request whose head declared none: llhttp and this codec
                # disagree on where the request ends, which is where requests hide.
                raise BadRequest(400, "body bytes for a request without one", "unframed_body")
            self._parsing.body.feed(body)
            if self._parsing.body.over_high_water:
                self._pause()

    def on_message_complete(self) -> None:
        self._quiet_bytes = 0
        if self._parsing is not None:
            self._parsing.body.end()
            self._parsing = None

    # -- internals ---------------------------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        """Client bytes after an upgrade request: kept for the upgraded protocol, bounded."""
        self._upgrade_rest += data
        if len(self._upgrade_rest) > MAX_UPGRADE_EARLY_BYTES:
            log.info("client sent over %d bytes before its upgrade was answered: reset",
                     MAX_UPGRADE_EARLY_BYTES)
            if self._on_bad_request is not None:
                self._on_bad_request("early upgrade data over limit")
            self._upgrade_rest.clear()
            self.abort()

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._max_header_bytes:
            raise BadRequest(431, f"request header block over {self._max_header_bytes} bytes",
                             "header_too_large")

    def _next(self) -> None:
        if self._current is not None or not self._queue or self.lost:
            return
        exchange = self._current = self._queue.popleft()
        self._idle_since = None
        self._start(exchange)
        self._maybe_resume()

    def _start(self, exchange: H1Exchange) -> None:
        """Hand the exchange whose turn it is to the connection's worker task, which serves
        the connection's requests one after another (a task per request costs more than
        parsing the request): wake it if it waits, leave it to take this one next if it is
        still finishing the previous request, start it if there is none."""
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(exchange)
        elif self._worker is not None:
            self._handoff = exchange
        else:
            task = self._worker = asyncio.get_running_loop().create_task(self._work(exchange))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _work(self, exchange: H1Exchange) -> None:
        """The worker: each exchange handed to it, in order, until the connection is lost
        (connection_lost cancels it) or leaves HTTP (detached: taken over or refused)."""
        handler = self._handler
        try:
            while True:
                try:  # (inline, not a coroutine of its own per request)
                    await handler(exchange)
                except Exception:
                    log.exception("HTTP/1.1 request handler failed")
                    exchange.reset()
                if not exchange.finished:
                    exchange.reset()
                following, self._handoff = self._handoff, None
                if following is None:
                    if self.lost or self._detached:
                        return
                    self._wakeup = (self._loop or asyncio.get_running_loop()).create_future()
                    following = await self._wakeup
                exchange = following
        finally:
            self._worker = self._wakeup = self._handoff = None

    def exchange_done(self, exchange: H1Exchange) -> None:
        if exchange is not self._current:
            return
        self._current = None
        if not exchange.keep_alive or (exchange.body.error is None and not exchange.body.ended
                                       and exchange is self._parsing):
            # Not keeping the connection, or the response ended before the request body:
            # what follows on the socket cannot be parsed as the next request.
            self._close()
            return
        if self._queue:
            self._next()
        elif self._client_eof:
            self._close()
        else:
            self._arm_idle()

    def body_consumed(self, n: int) -> None:
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        """Read again once nothing holds the socket back: the body being parsed is below
        its high-water mark (or there is none) and few requests wait their turn."""
        if not self._paused or self._detached or self._upgraded \
                or len(self._queue) > MAX_PIPELINED:
            return
        if self._parsing is not None and self._parsing.body.over_high_water:
            return
        self._resume()

    # -- request-header timeout --------------------------------------------------------------

    def _head_begins(self) -> None:
        if self._headers_timeout is None or self._head_since is not None:
            return
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        since, self._waiting_since = self._waiting_since, None
        self._head_since = min(since, now) if since is not None else now
        self._head_empty = True
        if self._head_timer is None:
            self._head_timer = loop.call_later(
                max(0.0, self._head_since + self._headers_timeout - now), self._head_check)

    def head_received(self) -> None:
        """A request head is complete (its exchange is being made)."""
        self._head_since = None

    def _head_check(self) -> None:
        self._head_timer = None
        if self._head_since is None or self.lost or self._detached \
                or self._headers_timeout is None:
            return  # no head pending: the next one arms the timer again
        loop = asyncio.get_running_loop()
        left = self._head_since + self._headers_timeout - loop.time()
        if left > 0:
            self._head_timer = loop.call_later(left, self._head_check)
            return
        self._head_since = None
        if self._on_timeout is not None:
            self._on_timeout("request_headers")
        log.info("HTTP/1.1 request head from %s not complete within %.1fs: closing",
                 self.transport.get_extra_info("peername") if self.transport else "?",
                 self._headers_timeout)
        if self._head_empty and self.idle:
            self._close()  # nothing sent at all: no response to misread
        else:
            self._answer_and_close(408, "request header timeout")

    def _bad_request(self, status: int, reason: str, label: str | None = None) -> None:
        if self._on_bad_request is not None:
            self._on_bad_request(label or reason)
        log.info("bad HTTP/1.1 request from %s: %s",
                 self.transport.get_extra_info("peername") if self.transport else "?", reason)
        self._answer_and_close(status, reason)

    def _answer_and_close(self, status: int, reason: str) -> None:
        """Answer `status` and close, after the requests before this one are answered."""
        if self._parsing is not None:
            self._parsing.body.fail(MalformedRequest(status, reason))
        if self._current is None and not self._queue:
            body = (REASONS.get(status, "Bad Request") + "\n").encode()
            self.write(b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                       % (status, _reason(status), len(body), body))
            self._close()
        else:
            # Requests before the bad one are answered first; then the connection closes.
            for exchange in self._queue:
                exchange.keep_alive = False
            if self._current is not None:
                self._current.keep_alive = False
            self._pause()
            self._parser = httptools.HttpRequestParser(self)
            self._detached = True  # ignore anything further

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def _arm_idle(self) -> None:
        """Idle from now on.  One timer serves many requests: it is re-armed only when it
        fires before the connection has been idle long enough (a timer per response costs
        more than the request's parsing)."""
        loop = self._loop or asyncio.get_running_loop()
        self._idle_since = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        if self._idle_since is None:
            if not self.lost:  # busy now: look again a full timeout later
                self._idle = asyncio.get_running_loop().call_later(
                    self._idle_timeout, self._idle_check)
            return
        left = self._idle_since + self._idle_timeout - asyncio.get_running_loop().time()
        if left <= 0:
            self._close()
        else:
            self._idle = asyncio.get_running_loop().call_later(left, self._idle_check)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        from nodeproxy.tcp.relay import reset
        reset(self.transport)

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        assert self.transport is not None
        self._detached = True
        if self._idle is not None:
            self._idle.cancel()
        if self._head_timer is not None:
            self._head_timer.cancel()
        rest = bytes(self._upgrade_rest)
        self._upgrade_rest.clear()
        return self.transport, rest

    def detached_closed(self) -> None:
        """The connection taken over by detach has closed."""
        self.lost = True
        if self._on_closed is not None:
            self._on_closed()

    @property
    def idle(self) -> bool:
        return self._current is None and not self._queue

    def drain(self) -> None:
        """The proxy is stopping: close now if idle, else after the response in flight."""
        self._draining = True
        if self.idle:
            self._close()
        elif self._current is not None:
            self._current.keep_alive = False
            for exchange in self._queue:
                exchange.keep_alive = False


# --- upstream ----------------------------------------------------------------------------


def encode_request(head: RequestHead, *, chunked: bool, upgrade: str | None = None) -> bytes:
    """The request head for an upstream; hop-by-hop headers are the proxy's own, so only
    an `upgrade` offer (a token the proxy allowed) brings Upgrade and Connection back."""
    text = f"{head.method} {head.path} HTTP/1.1\r\nhost: {head.authority}\r\n" + \
        "".join([f"{name}: {value}\r\n" for name, value in head.headers
                 if name not in HOP_BY_HOP and name != "host"])
    if chunked:
        text += "transfer-encoding: chunked\r\n"
    if upgrade is not None:
        text += f"upgrade: {upgrade}\r\nconnection: upgrade\r\n"
    return (text + "\r\n").encode("latin-1")


class H1Client:
    """One upstream HTTP/1.1 connection (the UpstreamConnection interface of message.py).
    An asyncio protocol by its methods, native when compiled (see H1Server)."""

    def __init__(self, on_idle: Callable[[H1Client], None] | None = None, *,
                 max_header_bytes: int = MAX_HEADER_BYTES):
        self._on_idle = on_idle
        self._max_header_bytes = max_header_bytes
        self._header_bytes = 0
        self._quiet_bytes = 0  # fed since llhttp last handed anything over
        self.transport: asyncio.Transport | None = None
        self.writer = _Writer()
        self._parser = httptools.HttpResponseParser(self)
        self._busy = False
        self._closed = False
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._body: Body | None = None
        self._method = "GET"
        self._status = 0
        self._headers: Headers = []
        self._framed = False
        self._keep_alive = True
        self._sender: asyncio.Task[None] | None = None
        self._held = False  # reading was paused for a body over its high-water mark
        self._loop: asyncio.AbstractEventLoop | None = None  # set when connected
        self.requests = 0
        self._offered: str | None = None  # the Upgrade token of the request in flight
        self.upgraded_to: str | None = None  # a 101's Upgrade header (None: none yet)
        self._switched = False  # a 101 arrived: what follows is not HTTP
        self._upgrade_rest = bytearray()

    # -- UpstreamConnection ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def can_take(self) -> bool:
        return not self._busy and not self._closed

    def send(self, head: RequestHead, body: OutgoingBody, *,
             upgrade: str | None = None) -> asyncio.Future[UpstreamResponse]:
        """Send one request now; await the result for its response head.  With `upgrade`
        (an Upgrade token) the request offers that upgrade and a 101 answers it (then see
        `detach`).  Not a coroutine: the future itself is returned, so a request makes no
        coroutine here (a compiled build's await of it is the same as of the
        coroutine).  Raises UpstreamError at once when the connection cannot take it."""
        if not self.can_take() or self.transport is None:
            raise UpstreamError("UC", "upstream connection is not available")
        self._busy = True
        self.requests += 1
        self._method = head.method
        self._offered = upgrade
        # The connection's loop, kept: get_running_loop() is a getpid system call on 3.11.
        loop = self._loop or asyncio.get_running_loop()
        waiter = self._head = loop.create_future()
        # (A body that has ended, NO_BODY's say, is never chunked: no header scan.)
        chunked = not body.ended and head.header("content-length") is None
        self.transport.write(encode_request(head, chunked=chunked, upgrade=upgrade))
        if not body.ended:
            self._sender = loop.create_task(self._send_body(body, chunked))
        return waiter

    def close(self) -> None:
        self._closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._closed = True
        from nodeproxy.tcp.relay import reset
        reset(self.transport)

    async def _send_body(self, body: OutgoingBody, chunked: bool) -> None:
        assert self.transport is not None
        try:
            while True:
                data = await body.read()
                if not data:
                    break
                if self._closed:
                    return
                self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await self.writer.drain()
            if chunked and not self._closed:
                tail = b"".join(b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1"))
                                for n, v in body.trailers or ())
                self.transport.write(b"0\r\n" + tail + b"\r\n")
        except BodyError as e:
            # The client's request broke off: the upstream must not see it as complete.
            self._fail(UpstreamError("DC", str(e)))
            self.abort()

    # -- the asyncio protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream protocol's transport
        self.transport = stream
        self.writer.transport = stream
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        stream.resume_reading()
        self._loop = asyncio.get_running_loop()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the raw transport (reading paused) and the bytes the upstream sent
        after the 101 head.  The caller owns the transport from now on."""
        assert self.transport is not None and self._switched
        self._closed = True  # never pooled again
        rest = bytes(self._upgrade_rest)
        self._upgrade_rest.clear()
        return self.transport, rest

    def data_received(self, data: bytes) -> None:
        if self._switched:
            self._upgrade_rest += data
            return
        try:
            self._quiet_bytes += len(data)  # a callback resets it
            self._parser.feed_data(data)
            if self._quiet_bytes > self._max_header_bytes:
                self._fail(UpstreamError("UC", "a response header or trailer field from "
                                               f"upstream over {self._max_header_bytes} bytes"))
                self.abort()
        except httptools.HttpParserUpgrade as e:
            # Only a 101 stops llhttp's response parser; on_headers_complete judged it.
            if self._switched:
                offset = e.args[0] if e.args else len(data)
                self._upgrade_rest += data[offset:]
        except httptools.HttpParserError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(UpstreamError("UC", f"malformed response from upstream: {e}"))
            self.abort()

    def eof_received(self) -> bool:
        if self._body is not None and not self._framed:
            self._body.end()  # a close-delimited body ends here
            self._body = None
        self._closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.writer.lost()
        self._fail(UpstreamError("UC", f"upstream connection closed ({exc or 'EOF'})"))
        if self._sender is not None:
            self._sender.cancel()

    def pause_writing(self) -> None:
        self.writer.pause_writing()

    def resume_writing(self) -> None:
        self.writer.resume_writing()

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._quiet_bytes = 0
        self._header_bytes = 0
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._quiet_bytes = 0
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise UpstreamError("UC", "response header block from upstream over "
                                      f"{self._max_header_bytes} bytes")
        lowered = _NAMES.get(name)
        self._headers.append((lowered if lowered is not None
                              else name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            self._switch_protocols()
            return
        if 100 <= status < 200:
            return  # 100 Continue and friends: the final response follows
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        # One pass: the fields passed on (hop-by-hop ones left out) and whether the
        # response is framed by a length or a transfer coding.
        framed = self._method == "HEAD" or _no_body_status(status)
        headers: Headers = []
        for n, v in self._headers:
            if n in HOP_BY_HOP:
                if n == "transfer-encoding":
                    framed = True
                continue
            if n == "content-length":
                framed = True
            headers.append((n, v))
        self._framed = framed
        self._body = Body(on_consumed=self._consumed)
        response = UpstreamResponse(ResponseHead(status, headers), self._body)
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        if self._method == "HEAD" or _no_body_status(status):
            # No body follows, whatever Content-Length says; llhttp cannot be told about
            # HEAD, so this parser is done and the next response gets a fresh one.
            self._parser = httptools.HttpResponseParser(self)
            self._complete()

    def _switch_protocols(self) -> None:
        """A 101: the answer to an upgrade offer, or an upstream protocol error."""
        if self._offered is None:
            self._fail(UpstreamError("UPE", "101 Switching Protocols to a request that "
                                            "offered no upgrade"))
            self._closed = True
            raise UpstreamError("UPE", "unexpected 101")  # ends parsing; data_received aborts
        self._switched = True
        if self.transport is not None:
            self.transport.pause_reading()  # what follows waits for its relay
        self.upgraded_to = next((v for n, v in self._headers if n == "upgrade"), "")
        headers = [(n, v) for n, v in self._headers if n not in HOP_BY_HOP]
        response = UpstreamResponse(ResponseHead(101, headers), Body.empty())
        if self._head is not None and not self._head.done():
            self._head.set_result(response)

    def on_body(self, body: bytes) -> None:
        self._quiet_bytes = 0
        if self._body is not None:
            self._body.feed(body)
            if self._body.over_high_water and self.transport is not None:
                self._held = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self._quiet_bytes = 0
        if self._status == 0 or self._switched:
            return  # an informational response, or a 101 (llhttp stops right after)
        self._complete()

    def _complete(self) -> None:
        if self._body is not None:
            self._body.end()
            self._body = None
        if self._held:
            # Reading paused for this body's sake must not outlive it: the next
            # response on this connection has to be read.
            self._held = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        self._status = 0
        sender_done = self._sender is None or self._sender.done()
        if not self._keep_alive or not sender_done:
            self.close()
            return
        self._busy = False
        self._sender = None
        if self._on_idle is not None and not self._closed:
            self._on_idle(self)

    def _consumed(self, n: int) -> None:
        if self._body is not None and not self._body.over_high_water and self.transport:
            self.transport.resume_reading()

    def _fail(self, error: UpstreamError) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._body is not None:
            self._body.fail(error)
            self._body = None

"""The daemon's own small HTTP/1.1 server: routes, requests and responses for the admin,
metrics and readiness ports and the control socket (server.py, daemon/control_api.py).

It replaced aiohttp's server in the daemon, whose package imports its client half
(connector, cookie jar, tracing, multipart, ...) on any import: aiohttp was about 11 MiB
of the daemon's resident set for four servers that answer a few GETs and POSTs
(docs/benchmarks.md, "Idle memory, eighth round").  Requests are parsed by httptools
(llhttp), which the L7 codec already loads.  What it keeps of aiohttp's behaviour: a GET
route answers HEAD too; an unknown path is 404 and a known path with another method 405
with ``Allow``; a handler that raises is 500; a body over 1 MiB is 413 (aiohttp's
``client_max_size``); a request the parser refuses is 400 and the connection closes;
keep-alive (HTTP/1.1, or ``Connection: keep-alive``) with pipelined requests answered in
order, an idle connection closed after 75 s, ``Expect: 100-continue`` answered.  Bounded
per connection: the request line and headers (64 KiB), the body (1 MiB), the requests
parsed ahead (reading pauses while one is answered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import httptools

from nodeproxy.log_limit import LogLimiter
from nodeproxy.tcp.token_bucket import TokenBucket

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # request line and headers, bytes
MAX_BODY = 1024 * 1024  # aiohttp's default client_max_size
MAX_BODY_FRAMED = 2 * MAX_BODY + 64 * 1024  # with chunk framing and trailers, bytes
KEEPALIVE_SECONDS = 75.0  # aiohttp's default keepalive_timeout
HEAD_SECONDS = 10.0  # a request's first byte to its head's end (the proxy's own default)
REQUEST_SECONDS = 30.0  # a request's first byte to its last
SEND_SECONDS = 30.0  # a client that takes no byte of its answers this long is cut
MAX_PIPELINE = 16  # requests parsed ahead of their answers
MAX_CONNECTIONS = 128  # per face; the four faces stay well inside limits.reservedFiles
MAX_PER_SOURCE = 16  # per face and client address (TCP)
FEED_SLICE = 1024  # bytes handed to the parser at a time
LINGER_SECONDS = 2.0  # after a refusal, what the client still sends is read and dropped
# Requests answered per second to one client address on a throttled face (the ones every
# pod reaches), with a burst; past it the next answer waits, reading stays paused, and
# the wait is counted (reason "throttled").  The node itself is never throttled.
RATE_PER_SOURCE = 10.0
RATE_BURST = 20
# loopback (also as a dual-stack socket shows it), and "" the Unix socket
NODE_SOURCES = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1", ""})
MAX_BUCKETS = 1024  # past it, buckets that refilled (carry no state) are dropped
TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: Mapping[str, str]  # the first value of each name
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    match_info: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # the client's address (TCP), "" on a Unix socket

    def json(self) -> Any:
        """The body as JSON (UTF-8); json.JSONDecodeError or UnicodeDecodeError if not."""
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True)
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(text.encode(), status)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        """Pretty JSON, as every face of the daemon answers."""
        return cls((json.dumps(data, indent=2, default=str) + "\n").encode(), status, JSON)


Handler = Callable[[Request], Awaitable[Response]]
_PARAM = re.compile(r"^\{(\w+)\}$")


def path_segments(raw_path: str) -> list[str] | None:
    """The segments of a request's path, each percent-decoded once as UTF-8; None for a
    path no route can name: not starting with ``/``, a segment that is not UTF-8 once
    decoded, or that decodes to ``.``, ``..`` or holds ``/`` or NUL (``%2F`` is not a
    separator, and nothing is normalized: a name means exactly one thing)."""
    if not raw_path.startswith("/"):
        return None
    out = []
    for part in raw_path[1:].split("/"):
        try:
            segment = unquote_to_bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "/" in segment or "\0" in segment or segment in (".", ".."):
            return None
        out.append(segment)
    return out


class PathTable:
    """Method and path to handler; ``{name}`` in a path matches one non-empty segment.
    Paths are matched segment by segment after path_segments decoded them."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, ...], dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        segments = tuple(path[1:].split("/"))
        if any(_PARAM.match(s) for s in segments):
            for known, methods in self._patterns:
                if known == segments:
                    methods[method] = handler
                    return
            self._patterns.append((segments, {method: handler}))
        else:
            self._exact.setdefault(segments, {})[method] = handler

    def add_get(self, path: str, handler: Handler) -> None:
        self.add("GET", path, handler)
        self.add("HEAD", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add("POST", path, handler)

    def add_delete(self, path: str, handler: Handler) -> None:
        self.add("DELETE", path, handler)

    def resolve(self, method: str, raw_path: str
                ) -> tuple[Handler | None, dict[str, str], Response | None]:
        """(handler, the path's named segments, None) or (None, {}, the 400, 404 or 405)."""
        segments = path_segments(raw_path)
        if segments is None:
            return None, {}, Response.text("400: Bad Request (path)", 400)
        methods = self._exact.get(tuple(segments))
        params: dict[str, str] = {}
        if methods is None:
            for template, candidate in self._patterns:
                found = _match(template, segments)
                if found is not None:
                    methods, params = candidate, found
                    break
        if methods is None:
            return None, {}, Response.text("404: Not Found", 404)
        handler = methods.get(method)
        if handler is None:
            return None, {}, Response(b"405: Method Not Allowed", 405, TEXT,
                                      {"Allow": ",".join(sorted(methods))})
        return handler, params, None


def _match(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params = {}
    for want, got in zip(template, segments, strict=True):
        param = _PARAM.match(want)
        if param is None:
            if want != got:
                return None
        elif not got:
            return None
        else:
            params[param.group(1)] = got
    return params


def _encode(response: Response, head_only: bool, keep_alive: bool) -> bytes:
    status = HTTPStatus(response.status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}",
             "Connection: " + ("keep-alive" if keep_alive else "close")]
    lines += [f"{k}: {v}" for k, v in response.headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


class _Refused(Exception):
    """Raised from a parser callback (httptools wraps it): the status is kept aside."""


class _CountedLog(LogLimiter):
    """The face's refusals and stalls: every occurrence counted in ``counts`` by reason
    (the daemon exports them), at most one log line per reason per interval (a hostile
    peer must not fill the daemon's log; its address is named in the line)."""

    def __init__(self) -> None:
        super().__init__(log)
        self.counts: dict[str, int] = {}

    def warn(self, kind: Hashable, message: str, *args: object) -> bool:
        assert isinstance(kind, str)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return super().warn(kind, message, *args)


# A queued item: a parsed request and whether the connection stays open after it, or the
# refusal that ends the connection (answered after the requests before it, in order).
_Item = tuple[Request, bool] | Response


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order.

    Bounds (each a module constant): the head's bytes, even of a field that never ends
    (MAX_HEAD); the body (MAX_BODY; with its chunk framing and trailers,
    MAX_BODY_FRAMED); the time from a request's first byte to its head's end
    (HEAD_SECONDS) and to its last byte (REQUEST_SECONDS), 408 and closed after; an idle
    connection (KEEPALIVE_SECONDS); requests parsed ahead of their answer (MAX_PIPELINE:
    the rest of what was read waits unparsed and reading pauses); answers the client does
    not read (writing waits while the transport's buffer is over its high mark, and a
    client that takes none for SEND_SECONDS is cut)."""

    def __init__(self, server: HttpServer):
        self._server = server
        self._transport: asyncio.Transport | None = None
        # The parser holds this protocol's callbacks: a cycle, broken when the connection
        # ends (connection_lost) so a closed connection is freed at once, not by the cyclic
        # collector.
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._queue: deque[_Item] = deque()
        self.busy = False
        self._closing = False
        self._refused = False  # a refusal is queued: nothing more is parsed
        self._timer: asyncio.TimerHandle | None = None  # idle, head or request deadline
        self._stall: asyncio.TimerHandle | None = None  # the client takes no answer
        self._writable: asyncio.Future[None] | None = None
        self.write_paused = False
        self.throttled = False  # an answer waits for its address's rate (evictable)
        self._closing_after = False  # the client half-closed: answer what came, then close
        self._refusal = 400  # the status for a request the parser stops on
        self._unparsed = b""  # read, not parsed yet (parsing waits while answering)
        self._in_head = False
        self._in_body = False
        self._head_raw = 0  # bytes fed while this head was arriving (slice granularity)
        self._body_raw = 0  # the same for its body, chunk framing and trailers
        self._started = 0.0  # when this request's first byte came
        self._task: asyncio.Task[None] | None = None
        self.peer = "?"
        self.source = ""  # the peer's address (TCP), "" for a Unix socket
        self.since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, list[str]] = {}
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._expect_continue = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.source = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}" if ":" not in str(peer[0]) \
                else f"[{peer[0]}]:{peer[1]}"
        else:
            self.peer = "the control socket"
        self.since = asyncio.get_running_loop().time()
        if not self._server.admit(self):
            self._closing = True
            self._transport.close()
            return
        self._arm(KEEPALIVE_SECONDS, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        self._closing = True
        self._parser = None
        self._cancel_timers()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(SEND_SECONDS, self._stalled)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._refused:
            return
        self._unparsed = self._unparsed + data if self._unparsed else data
        self._parse()

    def eof_received(self) -> bool:
        if not self.busy and not self._queue:
            return False  # close now
        self._closing_after = True
        return True

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self) -> None:
        """Feed what was read, a slice at a time, until MAX_PIPELINE requests wait."""
        data, offset, parser = self._unparsed, 0, self._parser
        while (parser is not None and offset < len(data) and not self._closing and not self._refused
               and len(self._queue) < MAX_PIPELINE):
            piece = data[offset:offset + FEED_SLICE]
            offset += len(piece)
            try:
                parser.feed_data(piece)
            except (httptools.HttpParserError, _Refused) as e:  # a callback's comes wrapped
                cause = e.__context__ if isinstance(e.__context__, _Refused) else e
                # Their tracebacks hold the frames, and the frames this connection: drop
                # them, or each refused connection lives until the cyclic collector runs.
                e.__traceback__ = cause.__traceback__ = None
                self._refuse(self._refusal, HTTPStatus(self._refusal).phrase
                             if isinstance(cause, _Refused) else str(cause))
                break
            except httptools.HttpParserUpgrade:
                # Upgrade (h2c, websocket) and CONNECT are not offered: a request is
                # answered over HTTP/1.1, as aiohttp did, and what follows it is not read.
                self._closing_after = True
                if not self.busy and not self._queue:
                    self._close()
                break
            # httptools holds a header or trailer field until it ends, out of the
            # callbacks' sight: count the bytes it was fed, too.
            if self._in_head:
                self._head_raw += len(piece)
                if self._head_raw > MAX_HEAD + FEED_SLICE:
                    self._refuse(431, "head over the limit")
                    break
            elif self._in_body:
                self._body_raw += len(piece)
                if self._body_raw > MAX_BODY_FRAMED:
                    self._refuse(413, "body and trailers over the limit")
                    break
        self._unparsed = data[offset:] if offset < len(data) and not self._closing_after \
            and not self._refused else b""
        if self._unparsed and self._transport is not None:
            self._transport.pause_reading()  # resumed once the queue is answered

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._in_head, self._in_body, self._head_raw = True, False, 0
        self._started = asyncio.get_running_loop().time()
        if not self.busy:
            self._arm(HEAD_SECONDS, self._late)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)  # ": " and CRLF
        key = name.decode("latin-1").lower()
        self._headers.setdefault(key, []).append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body, self._body_raw = False, True, 0
        assert self._parser is not None  # callbacks run inside feed_data
        if self._parser.get_http_version() not in ("1.1", "1.0"):
            self._stop(505)  # llhttp takes HTTP/0.9 and 2.0 request lines
        length = self._headers.get("content-length", ["0"])[0]
        if length.isdigit() and int(length) > MAX_BODY:
            self._stop(413)
        if not self.busy:
            self._arm(self._started + REQUEST_SECONDS - asyncio.get_running_loop().time(),
                      self._late)
        expect = self._headers.get("expect", [""])[-1].lower()
        if expect == "100-continue":
            self._expect_continue = True  # curl waits for it
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self._stop(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = self._in_body = False
        try:
            parsed = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._stop(400)
        raw_path = (parsed.path or b"/").decode("latin-1")
        query = {}
        for name, value in parse_qsl((parsed.query or b"").decode("latin-1"),
                                     keep_blank_values=True):
            query.setdefault(name, value)
        assert self._parser is not None  # callbacks run inside feed_data
        method = self._parser.get_method().decode("latin-1")
        headers = {k: ", ".join(v) for k, v in self._headers.items()}
        request = Request(method, raw_path, query, headers, b"".join(self._body))
        self._queue.append((request, self._parser.should_keep_alive()))
        self._reset()
        self._start_answering()

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            self._stop(431)

    def _stop(self, status: int) -> None:
        self._refusal = status
        raise _Refused(status)

    def _send_continue(self) -> None:
        """100 Continue for the request being read, only once every answer before it is
        sent (else it would come before them)."""
        if (self._expect_continue and not self.busy and not self._queue
                and self._transport is not None and not self._transport.is_closing()):
            self._expect_continue = False
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(seconds, 0.0), callback)

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._stall):
            if handle is not None:
                handle.cancel()
        self._timer = self._stall = None

    def _idle(self) -> None:
        if not self.busy and not self._queue:
            self._close()

    def _late(self) -> None:
        if self.busy or self._queue or self._closing:
            return  # re-armed once the answers in hand are sent
        what = "head" if self._in_head else "body"
        self._server.limiter.warn(f"late_{what}", "%s: %s: request %s not received in time; "
                                  "408, connection closed", self._server.name, self.peer, what)
        self._refuse(408, None)

    def _stalled(self) -> None:
        self._server.limiter.warn("stalled", "%s: %s takes no answer for %.0f s; connection "
                                  "cut", self._server.name, self.peer, SEND_SECONDS)
        self._closing = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    # -- answering -------------------------------------------------------------------------

    def _start_answering(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()
        if not self.busy:
            self.busy = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._task = asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        try:
            while self._queue and not self._closing:
                item = self._queue.popleft()
                if isinstance(item, Response):  # a refusal: the last answer
                    await self._write(_encode(item, False, False))
                    self._linger()
                    return
                request, keep_alive = item
                await self._take_turn()
                response = await self._respond(request)
                keep_alive = (keep_alive and not self._server.stopping
                              and not (self._closing_after and not self._queue))
                if self._transport is None or self._transport.is_closing():
                    return
                await self._write(_encode(response, request.method == "HEAD", keep_alive))
                if not keep_alive:
                    self._close()
                    return
        finally:
            self.busy = False
            self._task = None
        if self._closing:
            return
        if self._closing_after or self._server.stopping:
            self._close()
            return
        if self._unparsed:
            self._parse()  # what was read while answering
            if self.busy or self._closing:
                return
        self._send_continue()
        loop = asyncio.get_running_loop()
        if self._in_head:
            self._arm(HEAD_SECONDS, self._late)  # counted again from the last answer
        elif self._in_body:
            self._started = loop.time()
            self._arm(REQUEST_SECONDS, self._late)
        else:
            self._arm(KEEPALIVE_SECONDS, self._idle)
        if self._transport is not None and not self._closing and not self._unparsed:
            self._transport.resume_reading()

    async def _take_turn(self) -> None:
        """Wait while this client's address is over its rate (throttled faces only)."""
        counted = False
        while not self._closing:
            wait = self._server.wait_for_turn(self.source)
            if wait <= 0.0:
                break
            if not counted:
                counted = True
                self._server.limiter.warn("throttled", "%s: %s asks faster than %.0f "
                                          "requests/s; its answers wait", self._server.name,
                                          self.peer, self._server.rate)
            self.throttled = True
            try:
                await asyncio.sleep(wait)
            finally:
                self.throttled = False

    async def _respond(self, request: Request) -> Response:
        handler, params, response = self._server.routes.resolve(request.method, request.path)
        if handler is None:
            assert response is not None
            return response
        segments = path_segments(request.path) or []
        try:
            return await handler(Request(request.method, "/" + "/".join(segments),
                                         request.query, request.headers, request.body,
                                         params, self.source))
        except Exception:
            log.exception("%s: %s %s failed", self._server.name, request.method, request.path)
            return Response.text("500: Internal Server Error", 500)

    async def _write(self, data: bytes) -> None:
        """Write, then wait while the client has not taken what is buffered."""
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        while self.write_paused and not self._closing:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def _refuse(self, status: int, reason: str | None) -> None:
        """Answer ``status`` after the answers already queued, then close."""
        if reason is not None:
            self._server.limiter.warn(f"refused_{status}", "%s: %s sent what is not a request "
                                      "this server takes (%s); %d, connection closed",
                                      self._server.name, self.peer, reason, status)
        self._refused = True
        self._unparsed = b""
        phrase = HTTPStatus(status).phrase
        self._queue.append(Response.text(f"{status}: {phrase}", status))
        self._start_answering()

    def _linger(self) -> None:
        """Close after a refusal without losing it: closing a socket with unread bytes
        sends a reset, and the client may drop the answer with it.  Our side is shut, what
        the client still sends is read and dropped for LINGER_SECONDS, then it closes."""
        self._closing = True  # data_received drops everything from now on
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._cancel_timers()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()  # what was written is sent first

    def evict(self) -> None:
        """Cut to make room for another source's connection (HttpServer.admit): at once,
        even with answers its client has not taken."""
        self._server.forget(self)
        self._closing = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    def shut_down(self) -> None:
        """The server stops: close now if idle, else after the answer in hand."""
        if not self.busy:
            self._close()


class HttpServer:
    """One listening socket (TCP or Unix) serving ``routes``, holding at most
    MAX_CONNECTIONS connections and MAX_PER_SOURCE from one address (TCP); with
    ``throttle``, answering each address other than the node's at most RATE_PER_SOURCE
    requests a second (burst RATE_BURST)."""

    def __init__(self, routes: PathTable, name: str = "http", *, throttle: bool = False,
                 rate: float = RATE_PER_SOURCE, burst: int = RATE_BURST,
                 node_sources: frozenset[str] = NODE_SOURCES):
        self.routes = routes
        self.name = name
        self.throttle = throttle
        self.rate = rate
        self._burst = burst
        self._node_sources = node_sources
        self._buckets: dict[str, TokenBucket] = {}
        self.connections: set[_Connection] = set()
        self.by_source: dict[str, list[_Connection]] = {}
        self.limiter = _CountedLog()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None

    def admit(self, connection: _Connection) -> bool:
        """Whether a new connection is kept.  A source over MAX_PER_SOURCE is refused; when
        the face is full, the oldest connection of the source holding the most that is
        idle or waits for its client to take an answer goes
        if that source holds more than the newcomer's would, else the newcomer is refused
        (so one address cannot keep another out: a kubelet probe, a Prometheus scrape)."""
        source = connection.source
        same = self.by_source.get(source, [])
        if source and len(same) >= MAX_PER_SOURCE:
            self.limiter.warn("per_source", "%s: refused a connection from %s: it holds %d "
                              "(the most one address may)", self.name, connection.peer,
                              len(same))
            return False
        if len(self.connections) >= MAX_CONNECTIONS:
            heaviest = max(self.by_source.values(), key=len)
            idle = [c for c in heaviest if not c.busy or c.write_paused or c.throttled]
            if len(heaviest) <= len(same) + 1 or not idle:
                self.limiter.warn("full", "%s: refused a connection from %s: %d connections "
                                  "open (the most this face holds)", self.name,
                                  connection.peer, len(self.connections))
                return False
            victim = min(idle, key=lambda c: c.since)
            self.limiter.warn("evicted", "%s: closed an idle connection from %s for one "
                              "from %s (the face is full)", self.name, victim.peer,
                              connection.peer)
            victim.evict()
        self.connections.add(connection)
        self.by_source.setdefault(source, []).append(connection)
        return True

    def wait_for_turn(self, source: str) -> float:
        """0.0 if a request from ``source`` may be answered now, else the seconds until it
        may (a token of its address's bucket is spent when 0.0)."""
        if not self.throttle or source in self._node_sources:
            return 0.0
        now = asyncio.get_running_loop().time()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[source] = TokenBucket(self.rate, self._burst, now)
        return bucket.take(now)

    def forget(self, connection: _Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            same = self.by_source.get(connection.source, [])
            if connection in same:
                same.remove(connection)
            if not same:
                self.by_source.pop(connection.source, None)

    async def start_tcp(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True,
            reuse_port=reuse_port or None, backlog=128)

    async def start_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path,
                                                     backlog=128)

    @property
    def port(self) -> int:
        """The TCP port it listens on (for a server started on port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their answer."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.connections):
            connection.shut_down()

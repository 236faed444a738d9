"""Protocol-neutral HTTP messages: request and response heads, streamed bodies, and the
two interfaces every codec implements (the downstream exchange and the upstream connection).

HTTP/1.1 (h1.py) and HTTP/2 (h2.py) both turn wire bytes into these objects, so routing,
retries, balancing, authorization and telemetry (http/handler.py, http/router.py) never
see a protocol.
Header names are lowercase; hop-by-hop headers and HTTP/2 pseudo-headers are not in
``headers`` (the head's own fields carry method, path, authority, scheme and status).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from mypy_extensions import mypyc_attr

Headers = list[tuple[str, str]]

# A header block's bound where no setting gives one (an upstream's response head):
# Envoy's max_request_headers_kb and max_response_headers_kb default.
MAX_HEADER_BYTES = 60 * 1024

# Hop-by-hop headers (RFC 9110 7.6.1) never cross the proxy; HTTP/2 forbids them outright.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
    "trailer", "proxy-authenticate", "proxy-authorization",
})


def caused_by(error: BodyError, cause: BaseException | None) -> BodyError:
    """`error` with `cause` as its __cause__: ``raise caused_by(e, c)`` is ``raise e from c``,
    which a mypyc build compiles without setting __cause__ (mypy 2.4)."""
    error.__cause__ = cause
    return error


def header_value(headers: Headers, name: str) -> str | None:
    """The first value of a (lowercase) header name, None when absent."""
    for key, value in headers:
        if key == name:
            return value
    return None


def grpc_status_of(headers: Headers | None) -> int | None:
    """The grpc-status a response head or trailers carry; None if absent or not a number."""
    for name, value in headers or ():
        if name == "grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# The per-request records below keep @dataclass for __eq__ and __repr__ but write their
# own __init__ (init=False): a compiled build (nodeproxy/native.py) compiles a written
# __init__, while the one dataclasses generates stays interpreted Python, several calls
# per request (docs/benchmarks.md, "L7 per-request cost, tenth round").


@dataclass(init=False)
class RequestHead:
    method: str
    path: str  # origin form: /path?query
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    headers: Headers
    scheme: str
    version: str  # "1.0", "1.1" or "2"

    def __init__(self, method: str, path: str, authority: str,
                 headers: Headers | None = None, scheme: str = "http",
                 version: str = "1.1"):
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers if headers is not None else []
        self.scheme = scheme
        self.version = version

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def protocol(self) -> str:
        """request_protocol as Istio labels it."""
        return "grpc" if self.is_grpc else ("http/2" if self.version == "2" else "http")

    @property
    def is_grpc(self) -> bool:
        return (self.header("content-type") or "").startswith("application/grpc")


@dataclass(init=False)
class ResponseHead:
    status: int
    headers: Headers

    def __init__(self, status: int, headers: Headers | None = None):
        self.status = status
        self.headers = headers if headers is not None else []

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


class BodyError(Exception):
    """The body stopped before its end: the sender reset or the connection broke."""


class MalformedRequest(BodyError):
    """The client's request turned out malformed after its head was passed on (a bad
    chunk, say): `status` is what the client gets if nothing was answered yet."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


# HTTP/2's UpstreamBody (codec/h2.py, interpreted) extends it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Body:
    """One message body, streamed: a codec feeds chunks, one reader takes them.

    ``on_consumed(n)`` runs as the reader takes n bytes; a codec uses it to resume a
    paused socket (HTTP/1.1) or to open the flow-control window (HTTP/2), so a slow
    reader holds the sender back instead of the proxy buffering the body.
    """

    HIGH_WATER: Final = 256 * 1024

    def __init__(self, on_consumed: Callable[[int], None] | None = None):
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_consumed = on_consumed
        self.buffered = 0
        self.received = 0  # body bytes fed so far
        self.ended = False
        self.error: BaseException | None = None
        self.trailers: Headers | None = None

    @classmethod
    def empty(cls) -> Body:
        body = cls()
        body.end()
        return body

    @classmethod
    def of(cls, data: bytes) -> Body:
        body = cls()
        if data:
            body.feed(data)
        body.end()
        return body

    @property
    def over_high_water(self) -> bool:
        return self.buffered >= self.HIGH_WATER

    def feed(self, data: bytes) -> None:
        if self.ended or self.error is not None or not data:
            return
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._wake()

    def end(self, trailers: Headers | None = None) -> None:
        if self.ended or self.error is not None:
            return
        self.trailers = trailers
        self.ended = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.ended or self.error is not None:
            return
        self.error = exc
        self._wake()

    async def read(self) -> bytes:
        """The next chunk; b"" at the end.  Raises BodyError if the body broke off."""
        while not self._chunks:
            if self.error is not None:
                raise caused_by(BodyError(str(self.error)), self.error)
            if self.ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self.buffered -= len(data)
        if self._on_consumed is not None:
            self._on_consumed(len(data))
        return data

    def take(self) -> bytes:
        """Everything buffered, at once (b"" if nothing is), without waiting: for a
        reader that found the body ended.  Raises BodyError if the body broke off."""
        if self.error is not None and not self._chunks:
            raise caused_by(BodyError(str(self.error)), self.error)
        if not self._chunks:
            return b""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._on_consumed is not None:
            self._on_consumed(len(data))
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# The body of every request whose head ends it (HTTP/1.1: neither Content-Length nor
# Transfer-Encoding; a GET, say): one shared object, already ended, instead of a Body and
# its deque per request.  An ended body never changes again (feed, end and fail do
# nothing once it has ended; read and take give b""), so sharing it is safe.  Nothing may
# assign its attributes: tests/unit/test_http_no_body.py keeps it ended and empty.
NO_BODY: Final = Body.empty()


class BodySource(Protocol):
    """What a ReplayableBody reads from: the client's Body, or the mirrors' tap over it
    (http/body_tap.py's BodyTap).  A protocol, so a compiled build takes either."""

    @property
    def ended(self) -> bool: ...

    @property
    def buffered(self) -> int: ...

    @property
    def trailers(self) -> Headers | None: ...

    async def read(self) -> bytes: ...


class ReplayableBody:
    """A request body an attempt can be re-sent from, while it stays small.

    Each attempt reads through its own ``reader()``: what was recorded first (at once),
    then new chunks from the source, recorded while the total stays within ``limit``
    (Envoy and Linkerd retry only bodies they could keep: 64 KiB by default).  Past the
    limit the record is dropped and ``replayable`` turns False: no further attempt may
    start.  Chunks of SMALL_CHUNK bytes or more are recorded as they are (no copy); smaller
    ones are gathered into one buffer (flushed into the record at SMALL_RUN bytes or
    before a large chunk): a client's body in 2-byte chunks (HTTP/1.1 chunks and HTTP/2
    DATA frames are fed one by one) kept a bytes object and a list slot per chunk, ~21
    bytes per byte counted (review8).  A retry reads the record at once, by byte offset.
    """

    SMALL_CHUNK: Final = 1024
    SMALL_RUN: Final = 16 * 1024

    def __init__(self, source: BodySource, limit: int):
        self.source = source
        self._limit = limit
        self._recorded: list[bytes] = []
        self._run = bytearray()  # small chunks after the last recorded one
        self._pulled = 0  # bytes taken from the source so far
        self.replayable = True

    @property
    def trailers(self) -> Headers | None:
        return self.source.trailers

    def reader(self) -> BodyReader:
        if not self.replayable:
            raise BodyError("the request body outgrew the retry buffer")
        return BodyReader(self)

    async def chunk(self, offset: int) -> bytes:
        """What follows byte `offset` of the body (b"" at the end)."""
        if offset != self._pulled:
            if offset < self._pulled and self.replayable:
                return b"".join([*self._recorded, self._run])[offset:]
            raise BodyError("the request body outgrew the retry buffer")
        data = await self.source.read()
        if not data:
            return data
        self._pulled += len(data)
        if self.replayable:
            if self._pulled > self._limit:
                self.replayable = False
                self._recorded.clear()
                self._run = bytearray()
            elif len(data) >= self.SMALL_CHUNK:
                if self._run:
                    self._recorded.append(bytes(self._run))
                    self._run = bytearray()
                self._recorded.append(data)
            else:
                self._run += data
                if len(self._run) >= self.SMALL_RUN:
                    self._recorded.append(bytes(self._run))
                    self._run = bytearray()
        return data

    def complete(self, offset: int) -> bool:
        """Has a reader at `offset` seen the whole body?"""
        return self.source.ended and self.source.buffered == 0 and offset >= self._pulled


class BodyReader:
    """One attempt's view of a ReplayableBody."""

    def __init__(self, body: ReplayableBody):
        self._body = body
        self.sent = 0  # bytes read so far: where the next read starts

    @property
    def trailers(self) -> Headers | None:
        return self._body.trailers

    @property
    def ended(self) -> bool:
        return self._body.complete(self.sent)

    async def read(self) -> bytes:
        """The next chunk for this attempt; b"" at the end."""
        data = await self._body.chunk(self.sent)
        self.sent += len(data)
        return data


class OutgoingBody(Protocol):
    """What a codec sends a request body from: a BodyReader (one attempt's view of a
    ReplayableBody) or a plain Body.  A protocol, not a class: a compiled codec (mypyc
    checks annotations at run time) takes either."""

    @property
    def ended(self) -> bool: ...

    @property
    def trailers(self) -> Headers | None: ...

    async def read(self) -> bytes: ...


# --- the two codec interfaces -------------------------------------------------------------


class Exchange(Protocol):
    """One request as a downstream (server-side) codec hands it to the manager."""

    request: RequestHead
    body: Body

    @property
    def client_gone(self) -> bool:
        """The client closed or reset before the response ended (Envoy's DC)."""
        ...

    @property
    def responded(self) -> bool:
        """The response head has been sent (a retry is no longer possible)."""
        ...

    async def respond(self, head: ResponseHead, *, end: bool = False) -> None: ...
    async def send(self, data: bytes) -> None: ...
    async def finish(self, trailers: Headers | None = None) -> None: ...

    def reset(self) -> None:
        """Break the exchange off: HTTP/1.1 closes the connection, HTTP/2 resets the stream."""
        ...


class UpstreamError(Exception):
    """An attempt failed before a complete response: `flag` is Envoy's response flag
    (UF connect failure, UC upstream connection termination/reset)."""

    def __init__(self, flag: str, message: str, *, refused_stream: bool = False):
        super().__init__(message)
        self.flag = flag
        self.refused_stream = refused_stream


@dataclass(init=False)
class UpstreamResponse:
    head: ResponseHead
    body: Body

    def __init__(self, head: ResponseHead, body: Body):
        self.head = head
        self.body = body


class UpstreamConnection(Protocol):
    """A connection (TCP or HBONE stream) to one endpoint, kept in a pool."""

    @property
    def closed(self) -> bool: ...

    def can_take(self) -> bool:
        """May another request be sent now (HTTP/1.1: idle; HTTP/2: a stream is free)?"""
        ...

    def send(self, head: RequestHead, body: OutgoingBody) -> Awaitable[UpstreamResponse]:
        """Send a request; awaited, the response head when it arrives.  The body keeps
        streaming in the background.  Raises UpstreamError (at the call or the await).
        A coroutine function is one (HTTP/2's); HTTP/1.1's returns its future."""
        ...

    def close(self) -> None: ...

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # request line and headers, bytes
MAX_BODY = 1024 * 1024  # aiohttp's default client_max_size
KEEPALIVE_SECONDS = 75.0  # aiohttp's default keepalive_timeout
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
_SEGMENT = re.compile(r"\{(\w+)\}")


class PathTable:
    """Method and path to handler; ``{name}`` in a path matches one non-empty segment."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" in path:
            pattern = re.compile(
                "^" + _SEGMENT.sub(r"(?P<\1>[^/]+)", re.escape(path).replace(r"\{", "{")
                                   .replace(r"\}", "}")) + "$")
            for known, methods in self._patterns:
                if known.pattern == pattern.pattern:
                    methods[method] = handler
                    return
            self._patterns.append((pattern, {method: handler}))
        else:
            self._exact.setdefault(path, {})[method] = handler

    def add_get(self, path: str, handler: Handler) -> None:
        self.add("GET", path, handler)
        self.add("HEAD", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add("POST", path, handler)

    def add_delete(self, path: str, handler: Handler) -> None:
        self.add("DELETE", path, handler)

    def resolve(self, method: str, raw_path: str
                ) -> tuple[Handler | None, dict[str, str], Response | None]:
        """(handler, the path's named segments, None) or (None, {}, the 404 or 405)."""
        methods = self._exact.get(unquote(raw_path))
        params: dict[str, str] = {}
        if methods is None:
            for pattern, candidate in self._patterns:
                found = pattern.match(raw_path)
                if found:
                    methods = candidate
                    params = {k: unquote(v) for k, v in found.groupdict().items()}
                    break
        if methods is None:
            return None, {}, Response.text("404: Not Found", 404)
        handler = methods.get(method)
        if handler is None:
            return None, {}, Response(b"405: Method Not Allowed", 405, TEXT,
                                      {"Allow": ",".join(sorted(methods))})
        return handler, params, None


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


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, server: HttpServer):
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[tuple[Request, bool]] = deque()
        self._busy = False
        self._closing = False
        self._idle: asyncio.TimerHandle | None = None
        self._closing_after = False  # the client half-closed: answer what came, then close
        self._refusal = 400  # the status for a request the parser stops on
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, _Refused):  # a callback's _Refused comes wrapped
            self._refuse(self._refusal)
        except httptools.HttpParserUpgrade:
            # Upgrade (h2c, websocket) is not offered: the request is answered over
            # HTTP/1.1, as aiohttp did, and what follows it is not read.
            self._closing_after = True
            if not self._busy and not self._queue:
                self._close()

    def eof_received(self) -> bool:
        if not self._busy and not self._queue:
            return False  # close now
        self._closing_after = True
        return True

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            self._stop(413)
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self._stop(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        raw_path = (parsed.path or b"/").decode("latin-1")
        query = {}
        for name, value in parse_qsl((parsed.query or b"").decode("latin-1"),
                                     keep_blank_values=True):
            query.setdefault(name, value)
        method = self._parser.get_method().decode("latin-1")
        request = Request(method, raw_path, query, self._headers, b"".join(self._body))
        self._queue.append((request, self._parser.should_keep_alive()))
        self._reset()
        if self._transport is not None:
            self._transport.pause_reading()
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._answer())

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            self._stop(431)

    def _stop(self, status: int) -> None:
        self._refusal = status
        raise _Refused(status)

    # -- answering -------------------------------------------------------------------------

    async def _answer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        try:
            while self._queue and not self._closing:
                request, keep_alive = self._queue.popleft()
                handler, params, response = self._server.routes.resolve(request.method,
                                                                        request.path)
                if handler is not None:
                    try:
                        response = await handler(Request(
                            request.method, unquote(request.path), request.query,
                            request.headers, request.body, params))
                    except Exception:
                        log.exception("%s: %s %s failed", self._server.name, request.method,
                                      request.path)
                        response = Response.text("500: Internal Server Error", 500)
                assert response is not None
                keep_alive = (keep_alive and not self._server.stopping
                              and not (self._closing_after and not self._queue))
                if self._transport is None or self._transport.is_closing():
                    return
                self._transport.write(_encode(response, request.method == "HEAD",
                                              keep_alive))
                if not keep_alive:
                    self._close()
                    return
        finally:
            self._busy = False
        if self._closing_after or self._server.stopping:
            self._close()
        elif self._transport is not None and not self._closing:
            self._transport.resume_reading()
            self._arm_idle()

    def _refuse(self, status: int) -> None:
        if self._transport is not None and not self._transport.is_closing():
            phrase = HTTPStatus(status).phrase
            self._transport.write(_encode(Response.text(f"{status}: {phrase}", status),
                                          False, False))
        self._close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(KEEPALIVE_SECONDS, self._close)

    def _close(self) -> None:
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is not None:
            self._transport.close()  # what was written is sent first

    def shut_down(self) -> None:
        """The server stops: close now if idle, else after the answer in hand."""
        if not self._busy:
            self._close()


class HttpServer:
    """One listening socket (TCP or Unix) serving ``routes``."""

    def __init__(self, routes: PathTable, name: str = "http"):
        self.routes = routes
        self.name = name
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None

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

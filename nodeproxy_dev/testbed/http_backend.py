"""HTTP/1.1 test backend for the L7 tests: one server whose behaviour each request chooses.

Run inside pods as ``python -m nodeproxy_dev.testbed.http_backend --port P --name NAME``
(``--host ::``, the default, is dual stack; ``--port 0`` picks a free port; ``--log FILE``
appends one JSON line per request).  Once listening it prints one JSON line, like
``peer serve``: ``{"listening": "[::]:P", "name": ..., "pid": ..., "ready": true}``.

Every response carries ``x-backend: NAME``.  The behaviour is chosen by the last
segments of the path, so any prefix may come before them (``/api/v1/status/503``
behaves as ``/status/503``; route tests can put their own prefixes in front):

- ``/status/<code>``: that status (200-599; no body for 204 and 304).
- ``/delay/<ms>``: sleeps, then 200.
- ``/fail/<key>/<n>/<code>``: the first n requests with that key get <code>, later ones
  200 (a count per key in the server: retry tests).
- ``/reset/<key>/<n>``: the first n requests with that key get the TCP connection reset
  (SO_LINGER 0 + close) before any response byte, later ones 200.
- ``/reset-mid/<bytes>``: response headers declaring a Content-Length 1024 bytes larger
  than what is sent, <bytes> bytes of the deterministic stream of seed ``reset-mid``
  (once the peer has acknowledged them), then a reset: a backend dying mid-response.
- ``/bytes/<n>``: n bytes of the deterministic stream of ``peer.Stream`` (seed ``?seed=``,
  default ``bytes``), streamed in chunks, with ``x-sha256`` and ``x-length`` of it.
- ``/echo`` (any method): the request body sent back unchanged, in chunks, with
  ``x-sha256`` and ``x-length`` of it.  ``?stream=1`` sends each piece back as it
  arrives instead (no ``x-sha256``: it is only known at the end).
- ``/stats``: ``{name, requests_total, by_path, connections_total, bodies}``;
  connections_total counts accepted TCP connections, including connections that sent no
  request (a readiness probe) and the one asking; bodies counts the request bodies read
  whole, by SHA-256 (mirroring tests); compare two readings.
- ``/ws``: a WebSocket echo (text as text, binary as binary).
- ``/switch/<token>``: ``101 Switching Protocols`` with ``Upgrade: <token>`` whatever the
  request offered (a backend that switches unasked, or to another protocol), then the
  bytes ``switched:<token>\n``; the connection closes a second later.
- anything else: 200.

``--status CODE`` answers every request with that status instead (after reading its
body): an endpoint that always fails, whatever the path.

Other responses have a JSON body describing the request: name, method, path, query
(raw), args (parsed), http_version, headers (lower-case names, repeated ones joined
with ", "), header_list (name/value pairs as received), body_sha256, body_length, peer,
local, served (requests this server has served, this one included), connection (the
number of the TCP connection it came on, in accept order) and connection_requests
(requests so far on that connection: above 1 means keep-alive).  Query options for
every path: ``header=Name:Value`` (repeatable) adds a response header; ``chunked=1``
makes /bytes and /echo use chunked transfer encoding instead of a Content-Length.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import IO, Any

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler

from nodeproxy_dev.testbed.peer import Stream, emit, format_address, listen_socket, reset_transport

CHUNK = 64 * 1024
RESET_MID_EXTRA = 1024  # the declared Content-Length exceeds what /reset-mid sends by this
MAX_BODY = 1 << 34
HANDLER_ARGS: dict[str, Any] = {
    "access_log": None,
    "max_line_size": 65536,
    "max_field_size": 65536,
    "max_headers": 1024,
    "keepalive_timeout": 300.0,
}

ROUTES: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(pattern)) for name, pattern in (
    ("status", r"(?:^|/)status/(\d+)$"),
    ("delay", r"(?:^|/)delay/(\d+)$"),
    ("fail", r"(?:^|/)fail/([^/]+)/(\d+)/(\d+)$"),
    ("reset", r"(?:^|/)reset/([^/]+)/(\d+)$"),
    ("reset_mid", r"(?:^|/)reset-mid/(\d+)$"),
    ("bytes", r"(?:^|/)bytes/(\d+)$"),
    ("echo", r"(?:^|/)echo$"),
    ("stats", r"(?:^|/)stats$"),
    ("ws", r"(?:^|/)ws$"),
    ("switch", r"(?:^|/)switch/([!#$%&'*+.^_`|~0-9A-Za-z-]+)$"),
)]


def match_route(path: str) -> tuple[str, tuple[str, ...]]:
    """The behaviour a path asks for and its parameters (("info", ()) for none)."""
    for name, pattern in ROUTES:
        m = pattern.search(path)
        if m:
            return name, m.groups()
    return "info", ()


def stream_sha256(seed: bytes, length: int) -> str:
    digest = hashlib.sha256()
    for chunk in Stream(seed, length).chunks():
        digest.update(chunk)
    return digest.hexdigest()


def pieces(data: bytes, size: int = CHUNK) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start:start + size])


class Connection(RequestHandler):
    """aiohttp's per-connection protocol, numbered in accept order, counting its requests."""

    def __init__(self, manager: web.Server, number: int, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self.number = number
        self.requests = 0


class Backend:
    """The server's state (counters, per-key attempts, the request log) and its handler."""

    def __init__(self, name: str, log: IO[str] | None = None, delay: float = 0.0,
                 status: int | None = None):
        self.name = name
        self.log = log
        self.delay = delay  # added to every request: a slow endpoint for balancing tests
        self.status = status  # every request gets it: an always-failing endpoint
        self.requests_total = 0
        self.connections_total = 0
        self.by_path: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()  # request bodies read whole, by SHA-256
        self.attempts: Counter[tuple[str, str]] = Counter()
        self._digests: dict[tuple[bytes, int], str] = {}

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_response_prepare.append(self._response_headers)
        return app

    def protocol_factory(self, server: web.Server,
                         loop: asyncio.AbstractEventLoop) -> Callable[[], Connection]:
        """The protocol factory for loop.create_server: counts accepted connections."""

        def factory() -> Connection:
            self.connections_total += 1
            return Connection(server, self.connections_total, loop=loop, **HANDLER_ARGS)

        return factory

    async def _response_headers(self, request: web.Request,
                                response: web.StreamResponse) -> None:
        response.headers["x-backend"] = self.name
        for spec in request.query.getall("header", []):
            name, sep, value = spec.partition(":")
            if sep and name.strip():
                response.headers.add(name.strip(), value.strip())

    # -- the request -------------------------------------------------------------

    def describe(self, request: web.Request, served: int) -> dict[str, Any]:
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            name = key.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        args: dict[str, str | list[str]] = {}
        for key in request.query:
            values = request.query.getall(key)
            args[key] = values[0] if len(values) == 1 else values
        protocol = request.protocol
        peer = request.transport.get_extra_info("peername") if request.transport else None
        local = request.transport.get_extra_info("sockname") if request.transport else None
        return {
            "name": self.name,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "args": args,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "headers": headers,
            "header_list": [[k.decode("latin-1"), v.decode("latin-1")]
                            for k, v in request.raw_headers],
            "peer": format_address(*peer[:2]) if peer else None,
            "local": format_address(*local[:2]) if local else None,
            "served": served,
            "connection": protocol.number if isinstance(protocol, Connection) else None,
            "connection_requests": (protocol.requests if isinstance(protocol, Connection)
                                    else None),
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests_total += 1
        self.by_path[request.path] += 1
        if isinstance(request.protocol, Connection):
            request.protocol.requests += 1
        info = self.describe(request, self.requests_total)
        if self.log is not None:
            line = {k: info[k] for k in ("name", "method", "path", "query", "headers",
                                         "header_list", "peer", "served", "connection")}
            line["time"] = time.time()
            self.log.write(json.dumps(line, sort_keys=True) + "\n")
            self.log.flush()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            await self._read_body(request, info)
            return self._json(info, self.status)
        route, params = match_route(request.path)
        handler = getattr(self, f"_{route}")
        response: web.StreamResponse = await handler(request, info, *params)
        return response

    async def _read_body(self, request: web.Request, info: dict[str, Any]) -> bytes:
        body = await request.read()
        info["body_sha256"] = digest = hashlib.sha256(body).hexdigest()
        info["body_length"] = len(body)
        self.bodies[digest] += 1
        return body

    def _json(self, info: dict[str, Any], status: int = 200) -> web.Response:
        if status in (204, 304):
            return web.Response(status=status)
        return web.json_response(info, status=status)

    # -- behaviours (one method per route name) ------------------------------------

    async def _info(self, request: web.Request, info: dict[str, Any]) -> web.StreamResponse:
        await self._read_body(request, info)
        return self._json(info)

    async def _status(self, request: web.Request, info: dict[str, Any],
                      code: str) -> web.StreamResponse:
        await self._read_body(request, info)
        if not 200 <= int(code) <= 599:
            info["error"] = f"status {code} is not 200-599"
            return self._json(info, 400)
        return self._json(info, int(code))

    async def _delay(self, request: web.Request, info: dict[str, Any],
                     ms: str) -> web.StreamResponse:
        await self._read_body(request, info)
        await asyncio.sleep(int(ms) / 1000)
        info["delayed_ms"] = int(ms)
        return self._json(info)

    async def _fail(self, request: web.Request, info: dict[str, Any], key: str, n: str,
                    code: str) -> web.StreamResponse:
        await self._read_body(request, info)
        self.attempts["fail", key] += 1
        info["attempt"] = attempt = self.attempts["fail", key]
        if attempt <= int(n) and 200 <= int(code) <= 599:
            return self._json(info, int(code))
        return self._json(info)

    async def _reset(self, request: web.Request, info: dict[str, Any], key: str,
                     n: str) -> web.StreamResponse:
        self.attempts["reset", key] += 1
        info["attempt"] = attempt = self.attempts["reset", key]
        if attempt <= int(n):
            return self._reset_now(request)
        await self._read_body(request, info)
        return self._json(info)

    def _reset_now(self, request: web.Request) -> web.StreamResponse:
        """Reset the connection; the response returned is never sent (aiohttp's write
        fails with a ConnectionError, which it ignores as a client disconnect)."""
        if request.transport is not None:
            reset_transport(request.transport)
        return web.Response(status=500)

    async def _reset_mid(self, request: web.Request, info: dict[str, Any],
                         size: str) -> web.StreamResponse:
        await self._read_body(request, info)
        n = int(size)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = n + RESET_MID_EXTRA
        await response.prepare(request)
        await response.write(b"")  # the headers go out even when n is 0
        for chunk in Stream(b"reset-mid", n).chunks():
            await response.write(chunk)
        if request.transport is not None:
            await wait_sent(request.transport, timeout=5.0)
        return self._reset_now(request)

    async def _bytes(self, request: web.Request, info: dict[str, Any],
                     size: str) -> web.StreamResponse:
        await self._read_body(request, info)
        n = int(size)
        seed = request.query.get("seed", "bytes").encode()
        if (seed, n) not in self._digests:
            self._digests[seed, n] = await asyncio.get_running_loop().run_in_executor(
                None, stream_sha256, seed, n)
        response = self._octets(request, n, self._digests[seed, n])
        await response.prepare(request)
        for chunk in Stream(seed, n).chunks():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _echo(self, request: web.Request, info: dict[str, Any]) -> web.StreamResponse:
        if request.query.get("stream") == "1":
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            async for data in request.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()
        self.bodies[digest] += 1
        response = self._octets(request, len(body), digest)
        await response.prepare(request)
        for chunk in pieces(body):
            await response.write(chunk)
        await response.write_eof()
        return response

    def _octets(self, request: web.Request, length: int, sha256: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "x-sha256": sha256, "x-length": str(length)})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = length
        return response

    async def _stats(self, request: web.Request, info: dict[str, Any]) -> web.StreamResponse:
        await self._read_body(request, info)
        return self._json({"name": self.name, "requests_total": self.requests_total,
                           "by_path": dict(self.by_path),
                           "connections_total": self.connections_total,
                           "bodies": dict(self.bodies)})

    async def _ws(self, request: web.Request, info: dict[str, Any]) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            info["error"] = "not a WebSocket upgrade"
            await self._read_body(request, info)
            return self._json(info, 400)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws


    async def _switch(self, request: web.Request, info: dict[str, Any],
                      token: str) -> web.StreamResponse:
        """A raw 101 naming `token` (see the module docstring); the response returned is
        never sent (the connection is closed by then)."""
        transport = request.transport
        if transport is not None:
            name = token.encode()
            transport.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: %s\r\n"
                            b"connection: upgrade\r\n\r\nswitched:%s\n" % (name, name))
            await asyncio.sleep(1.0)
            transport.close()
        return web.Response(status=500)


async def wait_sent(transport: asyncio.BaseTransport, timeout: float) -> None:
    """Wait until what was written has left the transport's buffer and the peer has
    acknowledged it (the kernel send queue is empty), or until timeout."""
    deadline = time.monotonic() + timeout
    sock = transport.get_extra_info("socket")
    while time.monotonic() < deadline:
        buffered = getattr(transport, "get_write_buffer_size", lambda: 0)()
        queued = 0
        if sock is not None:
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
            queued = struct.unpack("i", raw)[0]
        if buffered == 0 and queued == 0:
            return
        await asyncio.sleep(0.005)


async def serve(args: argparse.Namespace) -> int:
    log = open(args.log, "a", buffering=1) if args.log else None  # noqa: SIM115
    backend = Backend(args.name, log, args.delay_ms / 1000.0, args.status)
    runner = web.AppRunner(backend.application(), access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    sock = listen_socket(args.host, args.port)
    server = await loop.create_server(backend.protocol_factory(runner.server, loop), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"listening": format_address(*sock.getsockname()[:2]), "name": args.name,
          "pid": os.getpid(), "ready": True})
    try:
        await stop.wait()
    finally:
        server.close()
        await runner.cleanup()
        if log is not None:
            log.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.testbed.http_backend",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="0: a free port")
    parser.add_argument("--host", default="::", help="address to bind ('::' = dual stack)")
    parser.add_argument("--name", default=os.environ.get("PEER_NAME") or socket.gethostname(),
                        help="sent as x-backend and in every JSON body")
    parser.add_argument("--log", default=None,
                        help="append one JSON line per request (method, path, headers...)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="answer every request this much later (a slow endpoint)")
    parser.add_argument("--status", type=int, default=None,
                        help="answer every request with this status (a failing endpoint)")
    return parser


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is importable (like the peer tool)."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


def main(argv: list[str] | None = None) -> int:
    return run(serve(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

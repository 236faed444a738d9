"""A header or trailer field that never ends, from a client or from an upstream.

llhttp hands a field to the codec only when the field ends and buffers it until then, so
counting the fields it hands over (the header-block limit) cannot stop one endless field:
before the backstop, one client made the proxy hold 24 MB of a single header value, and
an upstream 26 MB.  These tests stream such fields over real loopback sockets and check
what a user notices: the refusal (431, 400, an upstream error), that the handler never
saw the request, and that the codec took in no more than the limit plus one read before
refusing.  Legitimate traffic near the limits (a large body in one write, pipelined
requests behind it, a header block just under the limit sent a byte at a time) passes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.message import (
    Body,
    BodyError,
    MalformedRequest,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamError,
)

LIMIT = 8192
ONE_READ = 256 * 1024  # the most one read hands the codec (uvloop reads 256 KiB)
STREAMED = 8 * 1024 * 1024  # what the hostile side offers at most: bounded
PIECE = 16 * 1024


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


class Counting(asyncio.Protocol):
    """An H1Server or H1Client with the bytes it was handed counted.  A wrapper, not a
    subclass: the compiled build's classes (nodeproxy/native.py) take no Python
    subclasses."""

    def __init__(self, inner: H1Server | H1Client):
        self.inner = inner
        self.taken = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.taken += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def CountingServer(handler: Callable[[H1Exchange], Awaitable[None]]) -> Counting:  # noqa: N802
    return Counting(H1Server(handler, max_header_bytes=LIMIT, idle_timeout=5))


def CountingClient() -> Counting:  # noqa: N802
    return Counting(H1Client(max_header_bytes=LIMIT))


async def _stream_until_answered(port: int, head: bytes, filler: bytes) -> bytes:
    """Send `head`, then `filler` repeated (never a line end) until the server answers or
    closes, at most STREAMED bytes; what the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    answer = b""
    read = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        while sent < STREAMED and not read.done():
            writer.write(filler * (PIECE // len(filler)))
            sent += PIECE
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0)
        answer = await asyncio.wait_for(read, 5)
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return answer


@pytest.mark.parametrize("head,filler", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ", b"a"),            # a value
    (b"GET / HTTP/1.1\r\nHost: a\r\n", b"X"),                    # a name
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ", b"a \t"),         # value with blanks
    (b"GET / HTTP/1.1\r\nHost: ", b"h"),                         # the Host value
    (b"GET /", b"p"),                                           # the target
], ids=["value", "name", "value-with-blanks", "host", "target"])
def test_a_header_field_that_never_ends_gets_431_within_the_limit(head: bytes,
                                                                  filler: bytes):
    async def main() -> None:
        handled: list[str] = []
        servers: list[Counting] = []

        async def handler(exchange: H1Exchange) -> None:
            handled.append(exchange.request.path)
            await exchange.respond(ResponseHead(200, [("content-length", "0")]), end=True)

        def make() -> Counting:
            servers.append(CountingServer(handler))
            return servers[-1]

        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        answer = await _stream_until_answered(server.sockets[0].getsockname()[1], head,
                                              filler)
        server.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        assert handled == []
        assert servers[0].taken <= LIMIT + ONE_READ + len(head), servers[0].taken
    run(main())


def test_a_trailer_field_that_never_ends_fails_the_body_within_the_limit():
    async def main() -> None:
        outcomes: list[str] = []
        servers: list[Counting] = []

        async def handler(exchange: H1Exchange) -> None:
            status = 200
            try:
                while await exchange.body.read():
                    pass
                outcomes.append("ended")
            except BodyError as e:  # answered as the router answers it
                outcomes.append(f"failed: {e}")
                assert isinstance(exchange.body.error, MalformedRequest)
                status = exchange.body.error.status
            await exchange.respond(ResponseHead(status, [("content-length", "0")]), end=True)

        def make() -> Counting:
            servers.append(CountingServer(handler))
            return servers[-1]

        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        head = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Trailer: ")
        answer = await _stream_until_answered(server.sockets[0].getsockname()[1], head, b"t")
        server.close()
        assert outcomes and outcomes[0].startswith("failed"), outcomes
        assert "trailer field over" in outcomes[0]
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"connection: close" in answer
        assert servers[0].taken <= LIMIT + ONE_READ + len(head), servers[0].taken
    run(main())


def test_large_bodies_and_slow_heads_near_the_limit_still_pass():
    """No false refusal: a 1 MiB body in one write followed by a pipelined request, a
    chunked body in 200 KiB chunks, and a header block just under the limit sent one
    byte per write."""
    async def main() -> None:
        async def echo_digest(exchange: H1Exchange) -> None:
            digest = hashlib.sha256()
            while data := await exchange.body.read():
                digest.update(data)
            body = digest.hexdigest().encode()
            await exchange.respond(ResponseHead(200, [("content-length", str(len(body)))]))
            await exchange.send(body)
            await exchange.finish()

        server = await asyncio.get_running_loop().create_server(
            lambda: CountingServer(echo_digest), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = bytes(range(256)) * 4096  # 1 MiB
        chunk = big[:200 * 1024]
        near = b"x" * (LIMIT - 200)
        requests = [
            (b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(big) + big
             + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n",
             [hashlib.sha256(big).hexdigest(), hashlib.sha256(b"").hexdigest()], False),
            (b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
             + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n",
             [hashlib.sha256(chunk * 3).hexdigest()], False),
            (b"GET /near HTTP/1.1\r\nHost: a\r\nX-Near: " + near + b"\r\n\r\n",
             [hashlib.sha256(b"").hexdigest()], True),
        ]
        for data, digests, bytewise in requests:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if bytewise:
                for i in range(len(data)):
                    writer.write(data[i:i + 1])
                    if i % 512 == 0:
                        await writer.drain()
                        await asyncio.sleep(0)
            else:
                writer.write(data)
            for digest in digests:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert await asyncio.wait_for(reader.readexactly(64), 5) == digest.encode()
            writer.close()
        server.close()
    run(main())


async def _upstream(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]
                    ) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await answer(writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _endless(writer: asyncio.StreamWriter, head: bytes, filler: bytes) -> None:
    writer.write(head)
    for _ in range(STREAMED // PIECE):
        writer.write(filler * PIECE)
        await asyncio.wait_for(writer.drain(), 5)


async def _send(client: H1Client) -> asyncio.Future:
    return await asyncio.wait_for(client.send(
        RequestHead("GET", "/", "a", []), ReplayableBody(Body.of(b""), 16).reader()), 10)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-Long: ",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Long: ",
], ids=["value", "name", "after-100-continue"])
def test_an_upstream_header_field_that_never_ends_fails_the_response(head: bytes):
    async def main() -> None:
        upstream, port = await _upstream(lambda w: _endless(w, head, b"u"))
        _, client = await asyncio.get_running_loop().create_connection(
            CountingClient, "127.0.0.1", port)
        with pytest.raises(UpstreamError) as failed:
            await _send(client)
        assert failed.value.flag == "UC" and "over 8192 bytes" in str(failed.value)
        assert client.taken <= LIMIT + ONE_READ + len(head), client.taken
        assert client.closed
        upstream.close()
    run(main())


def test_an_upstream_header_block_over_the_limit_fails_and_one_under_it_passes():
    async def main() -> None:
        for count, ok in ((100, False), (60, True)):  # 100-byte fields: 10,000 / 6,000
            fields = b"".join(b"X-F%03d: %s\r\n" % (i, b"v" * 92) for i in range(count))

            async def answer(writer: asyncio.StreamWriter, fields: bytes = fields) -> None:
                writer.write(b"HTTP/1.1 200 OK\r\n" + fields
                             + b"content-length: 2\r\n\r\nok")
                await writer.drain()

            upstream, port = await _upstream(answer)
            _, client = await asyncio.get_running_loop().create_connection(
                CountingClient, "127.0.0.1", port)
            if ok:
                response = await _send(client)
                assert response.head.status == 200
                assert len([n for n, _ in response.head.headers if n.startswith("x-f")]) \
                    == count
                assert await response.body.read() == b"ok"
            else:
                with pytest.raises(UpstreamError, match="header block from upstream over"):
                    await _send(client)
            client.close()
            upstream.close()
    run(main())


def test_an_upstream_trailer_field_that_never_ends_fails_the_body():
    async def main() -> None:
        head = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\nX-Trailer: ")
        upstream, port = await _upstream(lambda w: _endless(w, head, b"t"))
        _, client = await asyncio.get_running_loop().create_connection(
            CountingClient, "127.0.0.1", port)
        response = await _send(client)
        received = b""
        with pytest.raises((BodyError, UpstreamError)):
            while data := await asyncio.wait_for(response.body.read(), 10):
                received += data
        assert received == b"ok"
        assert client.taken <= LIMIT + ONE_READ + len(head), client.taken
        upstream.close()
    run(main())

"""The HTTP/1.1 codec over real loopback sockets: keep-alive, pipelining, bodies with
backpressure, 100-continue, refusals, and the upstream side's reuse."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.message import Body, ReplayableBody, RequestHead, ResponseHead

Handler = Callable[[H1Exchange], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: H1Server(handler, max_header_bytes=8192, idle_timeout=5), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo(exchange: H1Exchange) -> None:
    """Streams the request body back, with its SHA-256 as a trailer."""
    digest = hashlib.sha256()
    await exchange.respond(ResponseHead(200, [("x-path", exchange.request.path)]))
    while data := await exchange.body.read():
        digest.update(data)
        await exchange.send(data)
    await exchange.finish([("x-sha256", digest.hexdigest())])


async def exchange_raw(port: int, data: bytes, until: bytes, count: int = 1) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    while received.count(until) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        received += chunk
    writer.close()
    return received


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_pipelined_requests_are_answered_in_order():
    async def main() -> None:
        async def status(exchange: H1Exchange) -> None:
            code = int(exchange.request.path.rsplit("/", 1)[1])
            await asyncio.sleep(0.01 * (205 - code))  # the first takes longest
            await exchange.respond(ResponseHead(code, [("content-length", "0")]), end=True)

        server, port = await serve(status)
        data = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % c for c in (201, 202, 203))
        reply = await exchange_raw(port, data, b"HTTP/1.1 ", 3)
        assert [line[9:12] for line in reply.split(b"\r\n") if line.startswith(b"HTTP/")] \
            == [b"201", b"202", b"203"]
        server.close()
    run(main())


def test_a_large_body_then_the_next_request_on_the_same_connection():
    """Reading paused for a big body must resume for the next request (a regression)."""
    async def main() -> None:
        server, port = await serve(echo)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = bytes(range(256)) * 8192  # 2 MiB: far above the body's high-water mark
        for path in (b"/big", b"/small"):
            payload = body if path == b"/big" else b"x"
            writer.write(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                         % (path, len(payload)) + payload)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"x-path: " + path in head and b"transfer-encoding: chunked" in head
            received = b""
            while True:
                size = int(await asyncio.wait_for(reader.readline(), 5), 16)
                if size == 0:
                    break
                received += await reader.readexactly(size + 2)
                received = received[:-2]
            trailer = await reader.readuntil(b"\r\n\r\n")
            assert received == payload
            assert hashlib.sha256(payload).hexdigest().encode() in trailer
        writer.close()
        server.close()
    run(main())


def test_expect_continue_is_answered_only_when_the_body_is_read():
    async def main() -> None:
        async def refuse(exchange: H1Exchange) -> None:
            await exchange.respond(ResponseHead(403, [("content-length", "0")]), end=True)

        async def upload(exchange: H1Exchange) -> None:
            while await exchange.body.read():
                pass
            await exchange.respond(ResponseHead(204, []), end=True)

        for handler, expected in ((refuse, b"HTTP/1.1 403"),
                                  (upload, b"HTTP/1.1 100 Continue")):
            server, port = await serve(handler)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert first.startswith(expected), first
            writer.close()
            server.close()
    run(main())


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),                                   # no Host
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"501"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", b"417"),
    (b"GET http://elsewhere/ HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),         # absolute form
])
def test_refusals(data: bytes, status: bytes):
    async def main() -> None:
        server, port = await serve(echo)
        reply = await exchange_raw(port, data, b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 " + status), reply
        assert b"connection: close" in reply
        server.close()
    run(main())


def test_upstream_client_reuses_its_connection_and_skips_head_bodies():
    async def main() -> None:
        connections = 0

        async def answer(exchange: H1Exchange) -> None:
            size = 3_000_000 if exchange.request.path == "/big" else 5
            await exchange.respond(ResponseHead(200, [("content-length", str(size))]))
            if exchange.request.method != "HEAD":
                await exchange.send(b"y" * size)
            await exchange.finish()

        loop = asyncio.get_running_loop()

        def factory() -> H1Server:
            nonlocal connections
            connections += 1
            return H1Server(answer, max_header_bytes=8192, idle_timeout=5)

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client = await loop.create_connection(H1Client, "127.0.0.1", port)
        for method, path, size in (("GET", "/big", 3_000_000), ("HEAD", "/", 0),
                                   ("GET", "/", 5), ("POST", "/", 5)):
            assert client.can_take()
            body = ReplayableBody(Body.of(b"abc" if method == "POST" else b""), 1024)
            response = await asyncio.wait_for(
                client.send(RequestHead(method, path, "a", []), body.reader()), 5)
            received = b""
            while data := await asyncio.wait_for(response.body.read(), 5):
                received += data
            assert response.head.status == 200 and len(received) == size
            await asyncio.sleep(0)
        assert connections == 1
        client.close()
        server.close()
    run(main())


def test_one_worker_task_serves_a_connections_requests_and_ends_with_it():
    """Requests of one keep-alive connection are served by one task, in turn, with work
    left after the response (the record) finished before the next request starts; the
    task ends when the client goes, also while it waits for a next request."""
    async def main() -> None:
        tasks: list[asyncio.Task[None] | None] = []
        events: list[str] = []
        servers: list[H1Server] = []

        async def handler(exchange: H1Exchange) -> None:
            path = exchange.request.path
            tasks.append(asyncio.current_task())
            events.append("start " + path)
            await exchange.respond(ResponseHead(200, [("content-length", "2")]))
            await exchange.send(b"ok")
            await exchange.finish()
            await asyncio.sleep(0.02)  # after the response: the next waits for this
            events.append("end " + path)

        loop = asyncio.get_running_loop()

        def make() -> H1Server:
            servers.append(H1Server(handler, max_header_bytes=8192, idle_timeout=5))
            return servers[-1]
        server = await loop.create_server(make, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in (b"/a", b"/b", b"/c"):
            writer.write(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        # Pipelined: both answered, in order, by the same task.
        writer.write(b"GET /d HTTP/1.1\r\nHost: a\r\n\r\nGET /e HTTP/1.1\r\nHost: a\r\n\r\n")
        for _ in range(2):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await asyncio.wait_for(reader.readexactly(2), 5)
        await asyncio.sleep(0.05)
        assert len(tasks) == 5 and len(set(tasks)) == 1
        assert events == [e for p in "abcde" for e in ("start /" + p, "end /" + p)]
        worker = tasks[0]
        assert worker is not None and not worker.done()  # waiting for the next request
        writer.close()
        await asyncio.wait_for(asyncio.wait([worker]), 5)
        assert worker.cancelled() and not servers[0]._tasks
        server.close()
    run(main())


def test_a_client_gone_mid_request_cancels_its_handler_and_a_new_connection_gets_a_new_task():
    async def main() -> None:
        started: list[asyncio.Task[None] | None] = []
        cancelled = asyncio.Event()

        async def handler(exchange: H1Exchange) -> None:
            started.append(asyncio.current_task())
            if exchange.request.path == "/hang":
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            await exchange.respond(ResponseHead(204, []), end=True)

        server, port = await serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        while not started:
            await asyncio.sleep(0.01)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset: the connection is lost, not half-closed
        await asyncio.wait_for(cancelled.wait(), 5)
        reply = await exchange_raw(port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 204")
        assert len(started) == 2 and started[0] is not started[1]
        server.close()
    run(main())

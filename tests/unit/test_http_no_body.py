"""The shared body of requests their head ends (codec/message.py's NO_BODY) and the
connection's re-used response heads (codec/h1.py's SentHeads), against hostile input.

A request without Content-Length or Transfer-Encoding gets the one ended NO_BODY; any
other gets a Body of its own.  What a backend receives must be exactly the requests the
proxy's handler saw (each head, each body, nothing between or after), whatever a client
hides behind a body-less head; and NO_BODY must stay ended and empty through all of it.
A response head made of the same status, fields and framing as the connection's last
one goes out as the same bytes; anything else in it changes the bytes, as a fresh
encoding would."""

from __future__ import annotations

import asyncio
import random

import httptools
import pytest

from nodeproxy.codec.h1 import (
    H1Client,
    H1Exchange,
    H1Server,
    SentHeads,
    _header_lines,
    _status_line,
)
from nodeproxy.codec.message import (
    HOP_BY_HOP,
    NO_BODY,
    Body,
    OutgoingBody,
    ReplayableBody,
    RequestHead,
)

Seen = list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]


def pristine() -> None:
    assert NO_BODY.ended and NO_BODY.error is None and NO_BODY.trailers is None
    assert NO_BODY.buffered == 0 and NO_BODY.received == 0
    assert NO_BODY.take() == b""


class Backend(asyncio.Protocol):
    """A raw backend: records every byte, answers each request (counted by an
    independent parser) with a fixed response."""

    def __init__(self, log: bytearray, seen: Seen):
        self.log = log
        self.seen = seen
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.log += data
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.seen.append((self.parser.get_method(), self.url, self.headers, self.body))
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def proxy_once(data: bytes
                     ) -> tuple[list[tuple[RequestHead, bool, bytes]], bytes, Seen, bytes]:
    """`data` from a client through an H1Server whose handler forwards each request as
    it judged it (its head, its body) over one H1Client: what the handler saw, the bytes
    the backend received, the requests an independent parser found in them, and what
    the client got back."""
    loop = asyncio.get_running_loop()
    log = bytearray()
    seen: Seen = []
    backend = await loop.create_server(lambda: Backend(log, seen), "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    judged: list[tuple[RequestHead, bool, bytes]] = []
    clients: list[H1Client] = []

    async def forward(exchange: H1Exchange) -> None:
        head = exchange.request
        snapshot = RequestHead(head.method, head.path, head.authority, list(head.headers),
                               head.scheme, head.version)
        shared = exchange.body is NO_BODY
        chunks = []
        body: OutgoingBody = exchange.body
        if not shared:  # read it here, as policy would see it, then send what was read
            while data := await exchange.body.read():
                chunks.append(data)
            body = ReplayableBody(Body.of(b"".join(chunks)), 1 << 20).reader()
        judged.append((snapshot, shared, b"".join(chunks)))
        if not clients or not clients[0].can_take():
            _, client = await loop.create_connection(H1Client, "127.0.0.1", bport)
            clients[:] = [client]
        response = await clients[0].send(snapshot, body)
        exchange.respond_whole(response.head, response.body.take() if response.body.ended
                               else b"")

    server = await loop.create_server(
        lambda: H1Server(forward, max_header_bytes=8192, idle_timeout=5), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    reply = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            if not chunk:
                break
            reply += chunk
    except TimeoutError:
        pass
    writer.close()
    for client in clients:
        client.close()
    server.close()
    backend.close()
    await asyncio.sleep(0.05)
    return judged, bytes(log), seen, reply


GET = b"GET /a HTTP/1.1\r\nHost: svc\r\nX-Id: 1\r\n\r\n"

# Requests a client may try to hide behind a body-less head, each with the requests the
# proxy must see: (method, path, declared body) in order.  Whatever follows a head
# without Content-Length or Transfer-Encoding is the next request, for the proxy and the
# backend alike.
HIDING = [
    (GET + b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n", [("GET", "/a", False), ("GET", "/b", False)]),
    (b"GET /a HTTP/1.1\r\nHost: svc\r\ncontent-LENGTH: 5\r\n\r\nhello" + GET,
     [("GET", "/a", True), ("GET", "/a", False)]),
    (b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: Chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n" + GET, [("POST", "/a", True), ("GET", "/a", False)]),
    (b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n" + GET,
     [("GET", "/a", True), ("GET", "/a", False)]),
    (b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n" + GET, [("HEAD", "/h", False), ("GET", "/a", False)]),
    (b"GET /a HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n" + GET,
     [("GET", "/a", False), ("GET", "/a", False)]),
    (b"DELETE /d HTTP/1.1\r\nHost: svc\r\nX-Content-Length: 7\r\n\r\n" + GET,
     [("DELETE", "/d", False), ("GET", "/a", False)]),
    (b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close, content-length\r\n"
     b"Content-Length: 4\r\n\r\nabcd", [("GET", "/a", True)]),
]


@pytest.mark.parametrize("data,expected", HIDING)
def test_the_backend_gets_exactly_the_requests_the_handler_judged(data, expected) -> None:
    async def main() -> None:
        judged, log, seen, reply = await proxy_once(data)
        assert [(h.method, h.path, not shared) for h, shared, _ in judged] == expected
        # Each request as the handler saw it is what the backend's own parser found,
        # head field by field and body byte by byte, and nothing else arrived.
        assert len(seen) == len(judged)
        for (head, shared, body), (method, url, headers, got) in zip(judged, seen, strict=True):
            assert method.decode() == head.method and url.decode() == head.path
            sent = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
            assert sent[0] == ("host", head.authority)
            assert [f for f in sent[1:] if f[0] != "transfer-encoding"] == head.headers
            assert got == body
            if shared:
                assert body == b"" and ("transfer-encoding", "chunked") not in sent
        assert reply.count(b"HTTP/1.1 200 OK") == len(judged)
        assert log.count(b" HTTP/1.1\r\n") == len(judged)
        pristine()
    asyncio.run(main())


@pytest.mark.parametrize("data", [
    # llhttp refuses these before any of them could reach a backend.
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length : 3\r\n\r\nabc",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: -1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1_0\r\n\r\n",
])
def test_a_request_whose_framing_is_refused_reaches_no_backend(data: bytes) -> None:
    async def main() -> None:
        judged, log, seen, reply = await proxy_once(data)
        assert judged == [] and log == b"" and seen == []
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 501"))
        pristine()
    asyncio.run(main())


def test_body_bytes_for_a_request_without_one_are_refused_not_fed() -> None:
    """Should llhttp ever hand over body bytes for a request whose head declared none,
    the codec refuses the request instead of dropping them into the shared body."""
    server = H1Server(lambda exchange: asyncio.sleep(0), max_header_bytes=8192, idle_timeout=5)
    exchange = H1Exchange(server, RequestHead("GET", "/", "a"), keep_alive=True,
                          expect_continue=False, upgrade=False, header_bytes=0,
                          has_body=False)
    assert exchange.body is NO_BODY
    server._parsing = exchange
    with pytest.raises(Exception) as refused:
        server.on_body(b"smuggled")
    assert getattr(refused.value, "status", None) == 400
    pristine()


def test_each_request_with_a_body_or_an_expectation_gets_its_own() -> None:
    server = H1Server(lambda exchange: asyncio.sleep(0), max_header_bytes=8192, idle_timeout=5)
    bodies = [H1Exchange(server, RequestHead("POST", "/", "a"), keep_alive=True,
                         expect_continue=expect, upgrade=False, header_bytes=0,
                         has_body=framed).body
              for framed, expect in ((True, False), (True, True), (False, True), (True, False))]
    assert all(b is not NO_BODY for b in bodies) and len({id(b) for b in bodies}) == 4
    bodies[0].feed(b"x")
    bodies[0].fail(ConnectionError("gone"))
    NO_BODY.feed(b"y")
    NO_BODY.fail(ConnectionError("gone"))
    NO_BODY.end([("x", "y")])
    pristine()


def fresh(status: int, headers: list[tuple[str, str]], framing: str) -> bytes:
    return _status_line(status) + (_header_lines(headers) + framing + "\r\n").encode("latin-1")


def test_a_repeated_response_head_is_the_bytes_a_fresh_encoding_gives() -> None:
    """A connection's heads, some repeated, some differing from the last in one thing
    (a value, a name, a field's case, the order, a field more or fewer, the status, the
    framing, the list mutated after it was sent): each one's bytes are its own encoding."""
    rng = random.Random(18)
    heads = SentHeads()
    base = [("content-type", "text/plain"), ("date", "Mon, 07 Dec 2026 14:00:00 GMT"),
            ("content-length", "2"), ("x-v", "\xe9")]
    current = (200, list(base), "")
    repeats = 0
    for _ in range(5000):
        status, headers, framing = current
        change = rng.randrange(10)
        if change == 0 and headers:
            i = rng.randrange(len(headers))
            headers[i] = (headers[i][0], headers[i][1] + "x")  # the sent list, mutated
        elif change == 1 and headers:
            i = rng.randrange(len(headers))
            headers[i] = (headers[i][0].upper(), headers[i][1])
        elif change == 2:
            rng.shuffle(headers)
        elif change == 3:
            headers.append(("x-more", str(rng.randrange(3))))
        elif change == 4 and headers:
            headers.pop()
        elif change == 5:
            status = rng.choice((200, 201, 404, 503, 599))
        elif change == 6:
            framing = rng.choice(("", "connection: close\r\n", "transfer-encoding: chunked\r\n"))
        else:
            repeats += 1
        if rng.random() < 0.2:
            headers = list(base)  # an equal list that is another object
        current = (status, headers, framing)
        assert heads.encode(status, headers, framing) == fresh(status, headers, framing)
    assert repeats > 1000


def test_an_upstream_heads_fields_and_framing_are_what_the_two_pass_reading_gave() -> None:
    """H1Client reads a response head's fields and framing in one pass: against the two
    passes it replaced (a set of the names, a filtered list), over random heads."""
    rng = random.Random(1818)
    fields = [("Content-Length", "0"), ("content-length", "3"), ("Transfer-Encoding", "chunked"),
              ("Connection", "close"), ("Keep-Alive", "timeout=5"), ("X-A", "1"), ("TE", "x"),
              ("Upgrade", "h2c"), ("Date", "now"), ("Trailer", "x-t")]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        checked = 0
        for _ in range(1500):
            status = rng.choice((200, 204, 304, 404, 503))
            method = rng.choice(("GET", "HEAD", "POST"))
            chosen = rng.sample(fields, rng.randrange(0, 6))
            raw = b"HTTP/1.1 %d X\r\n" % status + b"".join(
                b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in chosen) + b"\r\n"
            client = H1Client()
            client._method = method
            waiter = client._head = loop.create_future()
            client.data_received(raw)
            if not waiter.done() or waiter.exception() is not None:
                continue  # refused by llhttp: nothing passed on
            names = {n.lower() for n, _ in chosen}
            framed = "content-length" in names or "transfer-encoding" in names or (
                method == "HEAD" or 100 <= status < 200 or status in (204, 304))
            assert client._framed == framed
            assert waiter.result().head.headers == [
                (n.lower(), v) for n, v in chosen if n.lower() not in HOP_BY_HOP]
            checked += 1
        assert checked > 500
    asyncio.run(main())

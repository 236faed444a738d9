"""The HTTP/1.1 codec's heads and its whole-response path against the encoders they
replaced: the same bytes on the wire, whatever the headers, status, method and version.

The references below are the codec's previous encoders (two ``str.encode`` per header
line), kept here as the oracle; the codec now encodes a head once."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from nodeproxy import native
from nodeproxy.codec.h1 import _NAMES, H1Exchange, SentHeads, _reason, encode_request
from nodeproxy.codec.message import HOP_BY_HOP, Body, RequestHead, ResponseHead, UpstreamResponse
from nodeproxy.http.context import Outcome
from nodeproxy.http.router import stream_response


def old_encode_request(head: RequestHead, *, chunked: bool, upgrade: str | None = None
                       ) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
        head.method.encode(), head.path.encode("latin-1"), head.authority.encode("latin-1"))]
    for name, value in head.headers:
        if name in HOP_BY_HOP or name == "host":
            continue
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    if upgrade is not None:
        lines.append(b"upgrade: %s\r\nconnection: upgrade\r\n" % upgrade.encode("latin-1"))
    lines.append(b"\r\n")
    return b"".join(lines)


def old_response_head(head: ResponseHead, *, method: str, version: str, keep_alive: bool,
                      end: bool) -> tuple[bytes, bool]:
    """The previous respond()'s head bytes, and whether the connection stays open."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (head.status, _reason(head.status))]
    length = head.header("content-length")
    no_body = method == "HEAD" or 100 <= head.status < 200 or head.status in (204, 304)
    for name, value in head.headers:
        if name in HOP_BY_HOP:
            continue
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if not no_body:
        if length is not None:
            pass
        elif end:
            lines.append(b"content-length: 0\r\n")
        elif version == "1.1":
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            keep_alive = False
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), keep_alive


# H1Exchange against FakeServer (and a Python subclass of H1Exchange) runs on the
# pure-Python path only: the compiled build (nodeproxy/native.py) checks argument classes
# and takes no Python subclasses.  The suite's pure pass (NODEPROXY_NATIVE=0) runs these.
PURE_ONLY = pytest.mark.skipif(native.state()[0], reason="a fake H1Server: pure Python only")


class FakeServer:
    """What an H1Exchange asks of its connection, with the writes recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.lost = False
        self.done: list[H1Exchange] = []
        self.writer = SimpleNamespace(paused=False, drain=self._drain)
        self.resumed = asyncio.Event()
        self.sent_heads = SentHeads()

    async def _drain(self) -> None:
        while self.writer.paused and not self.lost:
            await self.resumed.wait()

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.written.append(data)

    def body_consumed(self, n: int) -> None:
        pass

    def head_received(self) -> None:
        pass

    def exchange_done(self, exchange: H1Exchange) -> None:
        self.done.append(exchange)

    def abort(self) -> None:
        self.written.append(b"<reset>")


NAMES = ["content-type", "x-custom", "set-cookie", "connection", "keep-alive",
         "transfer-encoding", "upgrade", "te", "trailer", "host", "grpc-status", "etag"]


def random_headers(rng: random.Random) -> list[tuple[str, str]]:
    headers = []
    for _ in range(rng.randrange(0, 8)):
        value = "".join(chr(rng.choice((rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0x100))))
                        for _ in range(rng.randrange(0, 12)))
        headers.append((rng.choice(NAMES), value))
    return headers


def test_request_heads_are_the_bytes_the_per_header_encoder_made() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        head = RequestHead(rng.choice(("GET", "POST", "HEAD", "DELETE")),
                           f"/p{chr(rng.randrange(0xa0, 0x100))}?q={rng.random()}",
                           rng.choice(("a", "web.prod:8080", "h\xe9")), random_headers(rng))
        kw = dict(chunked=rng.random() < 0.3,
                  upgrade=rng.choice((None, "websocket", "h2c")))
        assert encode_request(head, **kw) == old_encode_request(head, **kw)


def cases(seed: int, n: int):
    rng = random.Random(seed)
    for _ in range(n):
        headers = random_headers(rng)
        if rng.random() < 0.5:
            headers.append(("content-length", str(rng.randrange(0, 20))))
        status = rng.choice((200, 201, 204, 304, 404, 503, 599, 103))
        yield (ResponseHead(status, headers), rng.choice(("GET", "HEAD", "POST")),
               rng.choice(("1.1", "1.0")), rng.random() < 0.7,
               bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 7, 19)))))


def exchange_for(method: str, version: str, keep_alive: bool) -> tuple[H1Exchange, FakeServer]:
    server = FakeServer()
    exchange = H1Exchange(server, RequestHead(method, "/", "a", [], version=version),  # type: ignore[arg-type]
                          keep_alive=keep_alive, expect_continue=False, upgrade=False,
                          header_bytes=0)
    return exchange, server


@PURE_ONLY
def test_response_heads_are_the_bytes_the_per_header_encoder_made() -> None:
    async def main() -> None:
        for head, method, version, keep_alive, _data in cases(6, 3000):
            for end in (False, True):
                exchange, server = exchange_for(method, version, keep_alive)
                await exchange.respond(head, end=end)
                want, still_open = old_response_head(head, method=method, version=version,
                                                     keep_alive=keep_alive, end=end)
                # The head goes out with the first body bytes, or at finish.
                await exchange.finish()
                assert server.written[0] == want
                assert exchange.keep_alive == still_open
    asyncio.run(main())


class StreamedExchange(H1Exchange):
    """An H1Exchange stream_response does not take the one-call path for (it takes that
    path for H1Exchange itself only): the reference."""


@PURE_ONLY
def test_a_whole_response_is_the_bytes_and_record_of_the_streamed_one() -> None:
    """stream_response's one-call path for a body that has ended against its streaming
    path (respond, read, send, read, finish) for the same ended body: the same bytes to
    the client, the same bytes_sent, flags and end of the exchange."""
    async def forward(head: ResponseHead, method: str, version: str, keep_alive: bool,
                      data: bytes, kind: type[H1Exchange]
                      ) -> tuple[bytes, Outcome, H1Exchange]:
        server = FakeServer()
        exchange = kind(server, RequestHead(method, "/", "a", [], version=version),  # type: ignore[arg-type]
                        keep_alive=keep_alive, expect_continue=False, upgrade=False,
                        header_bytes=0)
        outcome = Outcome()
        rule = SimpleNamespace(response_headers=None)
        await stream_response(exchange, rule, UpstreamResponse(head, Body.of(data)),  # type: ignore[arg-type]
                              None, outcome)
        return b"".join(server.written), outcome, exchange

    async def main() -> None:
        compared = 0
        for head, method, version, keep_alive, data in cases(7, 2000):
            a = await forward(head, method, version, keep_alive, data, H1Exchange)
            b = await forward(head, method, version, keep_alive, data, StreamedExchange)
            assert a[0] == b[0]
            assert (a[1].bytes_sent, a[1].flags, a[1].status) == \
                (b[1].bytes_sent, b[1].flags, b[1].status)
            assert (a[2].finished, a[2].bytes_sent, a[2].keep_alive) == \
                (b[2].finished, b[2].bytes_sent, b[2].keep_alive)
            compared += bool(data)
        assert compared > 1000
    asyncio.run(main())


@PURE_ONLY
def test_a_whole_response_to_a_client_already_gone_is_flagged_dc() -> None:
    async def main() -> None:
        exchange, server = exchange_for("GET", "1.1", True)
        server.lost = True
        outcome = Outcome()
        await stream_response(exchange, SimpleNamespace(response_headers=None),  # type: ignore[arg-type]
                              UpstreamResponse(ResponseHead(200, [("content-length", "2")]),
                                               Body.of(b"ok")), None, outcome)
        assert outcome.flags == ["DC"]
        assert not exchange.finished and server.done == []
    asyncio.run(main())


@PURE_ONLY
def test_a_whole_response_waits_for_a_full_socket_before_it_ends() -> None:
    """The client's socket is full after the write: the exchange ends (and the next
    request may start) only once it drains, as after send()."""
    async def main() -> None:
        exchange, server = exchange_for("GET", "1.1", True)
        real_write = server.write

        def write(data: bytes) -> None:
            real_write(data)
            server.writer.paused = True  # the transport's high-water mark was passed

        server.write = write  # type: ignore[method-assign]
        task = asyncio.get_running_loop().create_task(stream_response(
            exchange, SimpleNamespace(response_headers=None),  # type: ignore[arg-type]
            UpstreamResponse(ResponseHead(200, [("content-length", "2")]), Body.of(b"ok")),
            None, Outcome()))
        await asyncio.sleep(0.01)
        assert server.written and not exchange.finished and not task.done()
        server.writer.paused = False
        server.resumed.set()
        await asyncio.wait_for(task, 1)
        assert exchange.finished and server.done == [exchange]
    asyncio.run(main())


@pytest.mark.parametrize("raw", sorted(_NAMES))
def test_the_header_name_table_gives_what_decoding_gives(raw: bytes) -> None:
    assert _NAMES[raw] == raw.decode("latin-1").lower()

"""nodeproxy.admin.http_server under attack, on real loopback sockets: a client is assumed
hostile (the metrics and readiness ports listen on every address, so any enrolled pod
reaches them).  Each test asserts what a well-behaved client or the operator would
notice: the answer and its status, the connection closed, the memory the server holds,
and another client still answered meanwhile.  Time bounds are shortened per test."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from nodeproxy.admin import http_server
from nodeproxy.admin.http_server import MAX_BODY, MAX_HEAD, HttpServer, PathTable, Request, Response

BIG = b"m" * 200_000  # about a /metrics page


async def echo(request: Request) -> Response:
    return Response.json({"method": request.method, "path": request.path,
                          "match": dict(request.match_info), "body": len(request.body),
                          "headers": dict(request.headers)})


async def big(_request: Request) -> Response:
    return Response(BIG)


async def slow(_request: Request) -> Response:
    await asyncio.sleep(0.3)
    return Response.text("slow")


def routes() -> PathTable:
    r = PathTable()
    r.add_get("/ready", echo)
    r.add_post("/ready", echo)
    r.add_get("/big", big)
    r.add_get("/slow", slow)
    r.add_get("/v1/pods/{namespace}/{name}", echo)
    r.add_delete("/v1/pods/{namespace}/{name}", echo)
    return r


Test = Callable[[HttpServer], Awaitable[None]]


def serve(test: Test) -> None:
    async def main() -> None:
        server = HttpServer(routes(), "metrics")
        await server.start_tcp("127.0.0.1", 0)
        try:
            await test(server)
        finally:
            await server.stop()
    asyncio.run(main())


async def connect(server: HttpServer, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))


async def exchange(server: HttpServer, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``data``; everything answered until the server closes (at most 5 s)."""
    reader, writer = await connect(server, source)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def well_behaved(server: HttpServer, source: str = "127.0.0.9") -> int:
    """A probe from another address: GET /ready's status (answered within 2 s)."""
    raw = await asyncio.wait_for(exchange(
        server, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", source), 2)
    return status(raw)  # 0: closed without an answer


def status(raw: bytes) -> int:
    return int(raw.split()[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def statuses(raw: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


# -- slowloris ---------------------------------------------------------------------------


def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_head_timeout(monkeypatch) -> None:
    monkeypatch.setattr(http_server, "HEAD_SECONDS", 0.5, raising=False)
    monkeypatch.setattr(http_server, "KEEPALIVE_SECONDS", 30.0)

    async def test(server: HttpServer) -> None:
        reader, writer = await connect(server)
        started = time.monotonic()
        head = b"GET /ready HTTP/1.1\r\n" + b"X-A: " + b"a" * 10_000
        answered = b""
        for byte in head:  # a byte every 20 ms: each byte arrives well inside any idle time
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)
            if reader.at_eof() or time.monotonic() - started > 3:
                break
            try:
                answered += await asyncio.wait_for(reader.read(1000), 0.001)
            except TimeoutError:
                pass
        answered += await asyncio.wait_for(reader.read(), 2)
        writer.close()
        assert status(answered) == 408, answered
        assert time.monotonic() - started < 2.0  # not held until the 30 s idle time
    serve(test)


def test_a_body_trickled_is_cut_at_the_request_timeout(monkeypatch) -> None:
    monkeypatch.setattr(http_server, "REQUEST_SECONDS", 0.6, raising=False)
    monkeypatch.setattr(http_server, "KEEPALIVE_SECONDS", 30.0)

    async def test(server: HttpServer) -> None:
        reader, writer = await connect(server)
        started = time.monotonic()
        writer.write(b"POST /ready HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        while not reader.at_eof() and time.monotonic() - started < 3:
            writer.write(b"x")
            await asyncio.sleep(0.02)
            if reader._buffer:  # type: ignore[attr-defined]
                break
        answered = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        assert status(answered) == 408, answered
        assert time.monotonic() - started < 2.0
    serve(test)


def test_a_silent_connection_is_closed_after_the_idle_time(monkeypatch) -> None:
    monkeypatch.setattr(http_server, "KEEPALIVE_SECONDS", 0.3)

    async def test(server: HttpServer) -> None:
        reader, writer = await connect(server)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing said
        writer.close()
        assert not server.connections
    serve(test)


def test_one_address_holding_connections_does_not_keep_out_another() -> None:
    """A pod opening 600 connections to the readiness port: it keeps at most
    MAX_PER_SOURCE, the face at most MAX_CONNECTIONS, and a probe from another address is
    answered; a second flood from many addresses still leaves room for the probe."""
    async def test(server: HttpServer) -> None:
        held = []
        for _ in range(600):
            try:
                held.append(await connect(server))
            except OSError:
                break
            held[-1][1].write(b"GET /ready HTTP/1.1\r\nX: ")  # a head that never ends
        await asyncio.sleep(0.2)
        assert len(server.connections) <= http_server.MAX_PER_SOURCE  # type: ignore[attr-defined]
        assert await well_behaved(server) == 200
        # Then many addresses, each at its own cap, more than the face holds.
        for n in range(2, 2 + 2 * http_server.MAX_CONNECTIONS  # type: ignore[attr-defined]
                       // http_server.MAX_PER_SOURCE):  # type: ignore[attr-defined]
            for _ in range(http_server.MAX_PER_SOURCE):  # type: ignore[attr-defined]
                held.append(await connect(server, f"127.0.1.{n}"))
                held[-1][1].write(b"GET /ready HTTP/1.1\r\nX: ")
        await asyncio.sleep(0.2)
        assert len(server.connections) <= http_server.MAX_CONNECTIONS  # type: ignore[attr-defined]
        assert await well_behaved(server) == 200
        for _, writer in held:
            writer.close()
    serve(test)


def test_connections_that_never_read_their_answers_do_not_keep_out_another(monkeypatch
                                                                          ) -> None:
    """Addresses filling the face with pipelined requests whose answers they never read
    (busy connections, not idle ones): a probe from another address still gets in, at
    once, not after SEND_SECONDS."""
    monkeypatch.setattr(http_server, "MAX_CONNECTIONS", 16, raising=False)
    monkeypatch.setattr(http_server, "MAX_PER_SOURCE", 4, raising=False)

    async def test(server: HttpServer) -> None:
        held = []
        for n in range(4):
            for _ in range(4):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.bind((f"127.0.2.{n + 1}", 0))
                sock.connect(("127.0.0.1", server.port))
                sock.setblocking(False)
                sock.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
                held.append(sock)
        await asyncio.sleep(0.5)
        assert len(server.connections) == 16
        assert all(c.busy for c in server.connections)
        assert await well_behaved(server) == 200
        for sock in held:
            sock.close()
    serve(test)


# -- heads -------------------------------------------------------------------------------


def test_heads_at_and_over_the_limit() -> None:
    async def test(server: HttpServer) -> None:
        # One header: a head just under 64 KiB is served; over it, 431.
        line = b"GET /ready HTTP/1.1\r\nConnection: close\r\n"
        pad = MAX_HEAD - len(line) - 200
        assert status(await exchange(server, line + b"X-P: " + b"a" * pad + b"\r\n\r\n")) \
            == 200
        assert status(await exchange(
            server, line + b"X-P: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n")) == 431
        # Many short headers: 20,000 of them is 120 KiB of head.
        many = line + b"a: b\r\n" * 20_000 + b"\r\n"
        assert status(await exchange(server, many)) == 431
        # A request line over 64 KiB.
        assert status(await exchange(server, b"GET /" + b"a" * (MAX_HEAD + 10)
                                     + b" HTTP/1.1\r\n\r\n")) in (414, 431)
        assert await well_behaved(server) == 200
    serve(test)


def test_a_header_that_never_ends_is_refused_once_past_the_limit() -> None:
    """httptools keeps a header field until it ends, out of the callbacks' sight: the
    server must count the bytes it feeds, or a pod streams gigabytes into one field."""
    async def test(server: HttpServer) -> None:
        reader, writer = await connect(server)
        writer.write(b"GET /ready HTTP/1.1\r\nX-Forever: ")
        sent = 0
        try:
            while sent < 8 * MAX_BODY and not reader.at_eof():
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 2)
                sent += 65536
                if reader._buffer:  # type: ignore[attr-defined]
                    break
        except (ConnectionError, TimeoutError):
            pass
        answered = await asyncio.wait_for(reader.read(), 3)
        writer.close()
        assert status(answered) == 431, (sent, answered[:100])
        assert sent < 4 * MAX_HEAD  # refused once the field passed the limit
        assert await well_behaved(server) == 200
    serve(test)


def test_a_trailer_that_never_ends_is_refused() -> None:
    """The same for a trailer field after a chunked body: refused once the request's raw
    bytes pass the body's limit with its framing (MAX_BODY_FRAMED)."""
    async def test(server: HttpServer) -> None:
        reader, writer = await connect(server)
        writer.write(b"POST /ready HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"1\r\na\r\n0\r\nX-Trailer: ")
        sent = 0
        try:
            while sent < 16 * MAX_BODY and not reader.at_eof():
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 2)
                sent += 65536
                if reader._buffer:  # type: ignore[attr-defined]
                    break
        except (ConnectionError, TimeoutError):
            pass
        answered = await asyncio.wait_for(reader.read(), 3)
        writer.close()
        assert status(answered) in (413, 431), (sent, answered[:100])
        assert sent < 4 * MAX_BODY
    serve(test)


# -- bodies and framing ------------------------------------------------------------------


def test_bodies_over_the_limit_and_smuggling_framings() -> None:
    async def test(server: HttpServer) -> None:
        post = b"POST /ready HTTP/1.1\r\nHost: x\r\n"
        over = f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        assert status(await exchange(server, post + over)) == 413
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
        chunked = post + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 17 + b"0\r\n\r\n"
        assert status(await exchange(server, chunked)) == 413
        overflow = post + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\nx\r\n"
        assert status(await exchange(server, overflow)) == 400
        # CL.TE: a smuggled GET inside the body must not be answered separately.
        smuggle = (post + b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await exchange(server, smuggle)
        assert statuses(raw) == [400], raw[:200]
        dup = post + b"Content-Length: 3\r\nContent-Length: 30\r\n\r\nabc"
        assert statuses(await exchange(server, dup)) == [400]
        assert status(await exchange(server, post + b"Content-Length: +3\r\n\r\nabc")) == 400
        assert status(await exchange(server, post + b"Content-Length: 3\r\n"
                                     b"Transfer-Encoding: xchunked\r\n\r\nabc")) in (400, 501)
        assert await well_behaved(server) == 200
    serve(test)


def test_expect_continue_with_an_oversized_body() -> None:
    async def test(server: HttpServer) -> None:
        # Announced too big: 413 at once, no 100 Continue.
        raw = await exchange(server, b"POST /ready HTTP/1.1\r\nContent-Length: 2000000\r\n"
                                     b"Expect: 100-continue\r\n\r\n")
        assert statuses(raw) == [413], raw
        # Chunked: 100 Continue, then 413 once the body passes 1 MiB.
        reader, writer = await connect(server)
        writer.write(b"POST /ready HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) \
            == b"HTTP/1.1 100 Continue\r\n\r\n"
        try:
            for _ in range(40):
                writer.write(b"10000\r\n" + b"a" * 0x10000 + b"\r\n")
                await asyncio.wait_for(writer.drain(), 2)
        except (ConnectionError, TimeoutError):
            pass
        assert status(await asyncio.wait_for(reader.read(), 3)) == 413
        writer.close()
    serve(test)


def test_100_continue_is_not_sent_before_the_answers_owed() -> None:
    async def test(server: HttpServer) -> None:
        raw = await exchange(server, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"POST /ready HTTP/1.1\r\nContent-Length: 2\r\n"
                                     b"Connection: close\r\nExpect: 100-continue\r\n\r\nok")
        assert statuses(raw)[:1] == [200] and raw.index(b"slow") < raw.find(b"100 Continue") \
            or b"100 Continue" not in raw, raw
        assert statuses(raw)[-1] == 200
    serve(test)


def test_a_refusal_after_pipelined_requests_comes_after_their_answers() -> None:
    async def test(server: HttpServer) -> None:
        raw = await exchange(server, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n")
        assert statuses(raw) == [200, 400], raw
    serve(test)


# -- pipelining --------------------------------------------------------------------------


def test_a_pipelined_flood_never_read_keeps_the_server_bounded(monkeypatch) -> None:
    """20,000 GET /big (200 KB answers) sent without reading any answer: the server must
    stop reading, not buffer gigabytes of answers; another client is answered meanwhile;
    and a client that never takes its answers is cut after SEND_SECONDS."""
    monkeypatch.setattr(http_server, "SEND_SECONDS", 1.5, raising=False)

    async def test(server: HttpServer) -> None:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
        loop = asyncio.get_running_loop()
        data = request * 20_000
        sent = 0
        deadline = time.monotonic() + 3
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        buffered = sum(c._transport.get_write_buffer_size()  # type: ignore[union-attr]
                       for c in server.connections if c._transport is not None)
        queued = sum(len(c._queue) for c in server.connections)
        assert buffered < 2 * len(BIG) + 256 * 1024, buffered
        assert queued <= 64, queued
        assert await well_behaved(server) == 200
        await asyncio.sleep(2.0)  # the reader still reads nothing
        assert len(server.connections) == 0  # cut
        sock.close()
        del loop
    serve(test)


# -- not HTTP/1.1 ------------------------------------------------------------------------


CLIENT_HELLO = (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\x00\x00\x02"
                b"\x13\x01\x01\x00" + b"\x00" * 120)


def test_methods_targets_versions_and_bytes_that_are_not_http(caplog, monkeypatch) -> None:
    monkeypatch.setattr(http_server, "HEAD_SECONDS", 0.5, raising=False)

    async def test(server: HttpServer) -> None:
        caplog.set_level(logging.WARNING, "nodeproxy.admin.http_server")
        assert status(await exchange(server, b"FOO /ready HTTP/1.1\r\n\r\n")) == 400
        # Absolute form names the same path (RFC 9112 3.2.2: a server accepts it).
        raw = await exchange(server, b"GET http://x/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status(raw) == 200 and b'"path": "/ready"' in raw
        raw = await exchange(server, b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET /big")
        assert status(raw) == 400 and b"m" * 100 not in raw
        raw = await exchange(server, b"GET /ready HTTP/1.0\r\n\r\n")  # closes after
        assert statuses(raw) == [200] and b"Connection: close" in raw
        # HTTP/0.9 and 2.0 request lines (llhttp parses both), and a 0.9 line left open.
        assert status(await exchange(server, b"GET /ready\r\n\r\n")) == 505
        assert status(await exchange(server, b"GET /ready HTTP/2.0\r\n\r\n")) == 505
        assert status(await exchange(server, b"GET /ready\r\n")) == 408
        assert status(await exchange(server, bytes(range(256)) * 4)) == 400
        assert status(await exchange(server, CLIENT_HELLO)) == 400
        raw = await exchange(server, b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status(raw) == 400
        assert await well_behaved(server) == 200
        lines = [r.getMessage() for r in caplog.records]
        assert any("metrics: 127.0.0.1:" in m and "400" in m for m in lines), lines
    serve(test)


def test_http_1_0_keep_alive_head_and_header_case() -> None:
    async def test(server: HttpServer) -> None:
        raw = await exchange(server, b"GET /ready HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                     b"HEAD /big HTTP/1.1\r\nCONNECTION: CLOSE\r\n\r\n")
        assert statuses(raw) == [200, 200]
        assert raw.endswith(b"\r\n\r\n") and b"m" * 10 not in raw  # HEAD: no body
        assert f"Content-Length: {len(BIG)}".encode() in raw
        raw = await exchange(server, b"GET /ready HTTP/1.1\r\nX-Dup: a\r\nx-dup: b\r\n"
                                     b"Connection: close\r\n\r\n")
        body = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert body["headers"]["x-dup"] == "a, b"
        # Duplicated a thousand times, joined once (not quadratic).
        started = time.monotonic()
        raw = await exchange(server, b"GET /ready HTTP/1.1\r\nConnection: close\r\n"
                                     + b"x: " + b"y" * 20 + b"\r\n" * 1 + (b"x: yy\r\n" * 9000)
                                     + b"\r\n")
        assert status(raw) == 200 and time.monotonic() - started < 1
    serve(test)


# -- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "want"), [
    ("/v1/pods/default/web-0", (200, {"namespace": "default", "name": "web-0"})),
    ("/v1/pods/de%66ault/web-0", (200, {"namespace": "default", "name": "web-0"})),
    ("/v1/pods/default/a%252Fb", (200, {"namespace": "default", "name": "a%2Fb"})),
    ("/v1/pods/default/a%2Fb", (400, None)),  # an escaped slash is not a name
    ("/v1/pods/default%2Fweb-0/x", (400, None)),
    ("/v1/pods/default/..", (400, None)),
    ("/v1/pods/default/%2e%2e", (400, None)),
    ("/v1/pods/../pods/web-0", (400, None)),
    ("/v1/pods/default/.", (400, None)),
    ("/v1/pods//web-0", (404, None)),
    ("/v1/pods/default/", (404, None)),
    ("/v1/pods/default/web-0/", (404, None)),
    ("/v1/pods/default/web%FF", (400, None)),  # not UTF-8: not silently U+FFFD
    ("/v1/pods/default/web%FE", (400, None)),
    ("/v1/pods/default/web%00", (400, None)),
    ("/v1%2Fpods/default/web-0", (400, None)),
    ("/ready%2F", (400, None)),
])
def test_path_segments_name_exactly_one_pod(path: str, want: tuple[int, object]) -> None:
    async def test(server: HttpServer) -> None:
        raw = await exchange(server, f"DELETE {path} HTTP/1.1\r\nConnection: close\r\n"
                                     f"\r\n".encode())
        got = status(raw)
        match = json.loads(raw.partition(b"\r\n\r\n")[2])["match"] if got == 200 else None
        assert (got, match) == want, raw
    serve(test)


# -- resets ------------------------------------------------------------------------------


def test_a_client_that_resets_mid_answer_leaves_nothing_behind(caplog) -> None:
    async def test(server: HttpServer) -> None:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            await asyncio.sleep(0.02)
            sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        await asyncio.sleep(0.3)
        assert not server.connections
        assert await well_behaved(server) == 200
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    serve(test)

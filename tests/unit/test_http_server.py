"""nodeproxy.admin.http_server, the daemon's own HTTP/1.1 server, on real loopback sockets:
what it answers to well-formed, pipelined, malformed and oversized requests (the answers
aiohttp's server gave the daemon's faces before it)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from nodeproxy.admin.http_server import MAX_BODY, HttpServer, PathTable, Request, Response


async def echo(request: Request) -> Response:
    return Response.json({"method": request.method, "path": request.path,
                          "query": dict(request.query), "match": dict(request.match_info),
                          "body": request.body.decode()})


async def broken(_request: Request) -> Response:
    raise RuntimeError("handler broke")


def routes() -> PathTable:
    r = PathTable()
    r.add_get("/a", echo)
    r.add_post("/a", echo)
    r.add_get("/p/{ns}/{name}", echo)
    r.add_delete("/p/{ns}/{name}", echo)
    r.add_get("/broken", broken)
    return r


async def exchange(server: HttpServer, data: bytes, *, close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    if not close:
        return await asyncio.wait_for(reader.read(65536), 5)
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of responses (each with Content-Length) into (status, headers,
    body)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


def serve(test: Any) -> None:
    async def main() -> None:
        server = HttpServer(routes())
        await server.start_tcp("127.0.0.1", 0)
        try:
            await test(server)
        finally:
            await server.stop()
    asyncio.run(main())


def test_routes_queries_path_segments_and_bodies() -> None:
    async def test(server: HttpServer) -> None:
        [(status, headers, body)] = answers(await exchange(
            server, b"GET /a?window=3&x=1&x=2&e= HTTP/1.0\r\n\r\n"))
        assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
        assert json.loads(body)["query"] == {"window": "3", "x": "1", "e": ""}
        [(status, _, body)] = answers(await exchange(
            server, b"DELETE /p/a%20b/c HTTP/1.1\r\nConnection: close\r\n\r\n"))
        assert (status, json.loads(body)["match"]) == (200, {"ns": "a b", "name": "c"})
        chunked = (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                   b"\r\n3\r\n{\"k\r\n5\r\n\": 1}\r\n0\r\n\r\n")
        [(status, _, body)] = answers(await exchange(server, chunked))
        assert (status, json.loads(body)["body"]) == (200, '{"k": 1}')
    serve(test)


def test_head_404_405_and_a_broken_handler() -> None:
    async def test(server: HttpServer) -> None:
        raw = await exchange(server, b"HEAD /a HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nContent-Length: " in raw
        assert raw.endswith(b"\r\n\r\n") and b"{" not in raw  # no body after HEAD
        [(status, headers, body)] = answers(await exchange(
            server, b"PUT /a HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
        assert (status, headers["allow"], body) == (405, "GET,HEAD,POST",
                                                    b"405: Method Not Allowed")
        [(status, _, body)] = answers(await exchange(
            server, b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"))
        assert (status, body) == (404, b"404: Not Found")
        [(status, _, _)] = answers(await exchange(
            server, b"GET /broken HTTP/1.1\r\nConnection: close\r\n\r\n"))
        assert status == 500
    serve(test)


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def test(server: HttpServer) -> None:
        data = b"".join(f"GET /a?n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                        for i in range(5)) + b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"
        got = answers(await exchange(server, data))
        assert [s for s, _, _ in got] == [200] * 5 + [404]
        assert [json.loads(b)["query"]["n"] for _, _, b in got[:5]] == list("01234")
        assert [h["connection"] for _, h, _ in got] == ["keep-alive"] * 5 + ["close"]
    serve(test)


def test_malformed_oversized_and_expect_continue() -> None:
    async def test(server: HttpServer) -> None:
        assert re.match(rb"HTTP/1\.1 400 ", await exchange(server, b"NOT HTTP AT ALL\r\n\r\n"))
        big = f"POST /a HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        assert re.match(rb"HTTP/1\.1 413 ", await exchange(server, big))
        huge_head = b"GET /a HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
        assert re.match(rb"HTTP/1\.1 (400|431) ", await exchange(server, huge_head))
        raw = await exchange(server, b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n"
                                     b"Expect: 100-continue\r\n\r\n", close=False)
        assert raw == b"HTTP/1.1 100 Continue\r\n\r\n"
        # An upgrade offer is answered over HTTP/1.1, then the connection closes.
        [(status, headers, _)] = answers(await exchange(
            server, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"))
        assert (status, headers["connection"]) == (200, "close")
    serve(test)


def test_stop_closes_idle_connections_and_refuses_new_ones() -> None:
    async def test(server: HttpServer) -> None:
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        [(status, headers, _)] = answers(await asyncio.wait_for(reader.read(65536), 5))
        assert (status, headers["connection"]) == (200, "keep-alive")
        await server.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            pass
        else:
            raise AssertionError("a stopped server still accepts")
    serve(test)


def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """The parser holds the connection's callbacks; once the client has gone the server
    must hold nothing of it, with the cyclic collector off (a face scraped every few
    seconds must not leave a cycle per scrape for the collector)."""
    import gc
    import weakref

    from nodeproxy.admin import http_server

    made: list[weakref.ref[Any]] = []
    original = http_server._Connection.__init__

    def recording(self: Any, server: HttpServer) -> None:
        original(self, server)
        made.append(weakref.ref(self))

    async def test(server: HttpServer) -> None:
        for request in (b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
                        b"GET /a HTTP/1.1\r\n\r\n",  # keep-alive, then the client leaves
                        b"BAD\r\n\r\n"):  # a refusal
            await exchange(server, request, close=request.startswith(b"GET /a HTTP/1.1\r\nC"))
        for _ in range(50):  # the server sees each client go
            await asyncio.sleep(0.05)
            if not server.connections:
                break
        await asyncio.sleep(0.05)

    gc.collect()
    gc.disable()
    http_server._Connection.__init__ = recording  # type: ignore[method-assign]
    try:
        serve(test)
        assert len(made) == 3
        assert [ref() for ref in made] == [None, None, None]
    finally:
        http_server._Connection.__init__ = original  # type: ignore[method-assign]
        gc.enable()

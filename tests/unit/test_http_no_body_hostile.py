"""More of what a client may hide behind a body-less head (review7): expectations
without a body, pipelines longer than the codec parses ahead, bytes after a GET that
are no request, a HEAD and a GET answered with the same head on one connection.  The
backend must receive exactly what the handler judged (test_http_no_body.proxy_once)."""

from __future__ import annotations

import asyncio

import pytest

from nodeproxy.codec.h1 import MAX_PIPELINED
from tests.unit.test_http_no_body import pristine, proxy_once

GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"


@pytest.mark.parametrize("data,expected", [
    # An expectation on a request without a body: its own (empty) body, the next request
    # after it is parsed as one.
    (b"GET /e HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n\r\n" + GET,
     [("GET", "/e"), ("GET", "/a")]),
    (b"POST /e HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
     b"abc" + GET, [("POST", "/e"), ("GET", "/a")]),
    # A pipeline three times as long as the codec parses ahead: every request served,
    # in order (nothing waits on a body's consumption that never comes).
    (b"".join(b"GET /p%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i
              for i in range(3 * MAX_PIPELINED)),
     [("GET", f"/p{i}") for i in range(3 * MAX_PIPELINED)]),
    # A body after a body-less GET is the next request: not one here, so refused after
    # the GET, and nothing of it reaches the backend.
    (GET + b"hello /admin HTTP/1.1\r\nHost: svc\r\n\r\n", [("GET", "/a")]),
    (GET + b"\r\nGET /admin HTTP/1.1\r\nHost: svc\r\n\r\n", [("GET", "/a"), ("GET", "/admin")]),
])
def test_what_follows_a_body_less_head_is_judged_as_the_next_request(data, expected) -> None:
    async def main() -> None:
        judged, log, seen, reply = await proxy_once(data)
        assert [(h.method, h.path) for h, _, _ in judged] == expected
        assert [(m.decode(), u.decode()) for m, u, _, _ in seen] == expected
        assert log.count(b" HTTP/1.1\r\n") == len(expected)
        assert b"/admin" not in log or ("GET", "/admin") in expected
        assert reply.count(b"HTTP/1.1 200 OK") == len(expected)
        pristine()
    asyncio.run(main())

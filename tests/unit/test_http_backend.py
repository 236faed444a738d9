"""The HTTP/1.1 test backend (testbed/http_backend.py), run as a subprocess on 127.0.0.1.

Every behaviour the L7 tests rely on, checked with http.client, raw sockets, curl and
aiohttp's WebSocket client.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from nodeproxy_dev.testbed.peer import Stream
from tests.unit.servers import curl, port_of, request, start_tool, stop


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    log = tmp_path_factory.mktemp("http-backend") / "requests.jsonl"
    proc, ready = start_tool("http_backend", "--host", "127.0.0.1", "--name", "b1",
                             "--log", str(log))
    try:
        port = port_of(ready)
        yield SimpleNamespace(port=port, ready=ready, log=log, proc=proc)
    finally:
        stop(proc)


def raw_exchange(port: int, data: bytes, host: str = "127.0.0.1") -> tuple[bytes, str | None]:
    """Send data, read until EOF or error: (what came back, the error's class name)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        got = bytearray()
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError as e:
            return bytes(got), type(e).__name__
        return bytes(got), None


def stream_bytes(seed: bytes, n: int) -> bytes:
    return b"".join(Stream(seed, n).chunks())


# ---------------------------------------------------------------------------
# Requests described


def test_ready_line(backend: SimpleNamespace) -> None:
    assert backend.ready["ready"] is True
    assert backend.ready["name"] == "b1"
    assert backend.ready["listening"] == f"127.0.0.1:{backend.port}"


def test_info_describes_the_request(backend: SimpleNamespace) -> None:
    r = request(backend.port, "GET", "/some/path?x=1&x=2&y=z",
                headers=[("X-Multi", "a"), ("x-multi", "b"), ("X-Case", "Kept")])
    assert r.status == 200
    assert r.headers["x-backend"] == "b1"
    info = r.json()
    assert info["name"] == "b1"
    assert info["method"] == "GET"
    assert info["path"] == "/some/path"
    assert info["query"] == "x=1&x=2&y=z"
    assert info["args"] == {"x": ["1", "2"], "y": "z"}
    assert info["http_version"] == "1.1"
    assert info["headers"]["x-multi"] == "a, b"
    assert info["headers"]["x-case"] == "Kept"
    assert ["X-Multi", "a"] in info["header_list"] and ["x-multi", "b"] in info["header_list"]
    assert info["header_list"].index(["X-Multi", "a"]) < info["header_list"].index(
        ["x-multi", "b"])
    assert info["body_length"] == 0
    assert info["body_sha256"] == hashlib.sha256(b"").hexdigest()
    assert info["peer"].startswith("127.0.0.1:")
    assert info["local"] == f"127.0.0.1:{backend.port}"
    assert info["connection_requests"] == 1
    later = request(backend.port, "GET", "/").json()
    assert later["served"] > info["served"] >= 1
    assert later["connection"] > info["connection"]


def test_request_body_is_hashed(backend: SimpleNamespace) -> None:
    body = os.urandom(300_000)
    info = request(backend.port, "POST", "/upload", body=body).json()
    assert info["method"] == "POST"
    assert info["body_length"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_header_option_adds_response_headers(backend: SimpleNamespace) -> None:
    r = request(backend.port, "GET", "/x?header=X-One:1&header=x-two:%20two%20")
    assert r.headers["x-one"] == "1"
    assert r.headers["x-two"] == "two"
    assert r.headers["x-backend"] == "b1"


# ---------------------------------------------------------------------------
# Chosen status, delay, failures


@pytest.mark.parametrize("code", [200, 201, 302, 404, 418, 500, 503, 599])
def test_status(backend: SimpleNamespace, code: int) -> None:
    r = request(backend.port, "GET", f"/status/{code}")
    assert r.status == code
    assert r.headers["x-backend"] == "b1"
    assert r.json()["path"] == f"/status/{code}"


def test_status_without_body_and_under_a_prefix(backend: SimpleNamespace) -> None:
    r = request(backend.port, "GET", "/status/204")
    assert (r.status, r.body) == (204, b"")
    assert r.headers["x-backend"] == "b1"
    r = request(backend.port, "GET", "/api/v1/status/503")
    assert r.status == 503
    assert request(backend.port, "GET", "/status/99").status == 400


def test_delay(backend: SimpleNamespace) -> None:
    started = time.monotonic()
    r = request(backend.port, "GET", "/delay/300")
    assert time.monotonic() - started >= 0.3
    assert r.status == 200
    assert r.json()["delayed_ms"] == 300


def test_fail_counts_per_key(backend: SimpleNamespace) -> None:
    got = [request(backend.port, "GET", "/fail/f1/2/503") for _ in range(4)]
    assert [r.status for r in got] == [503, 503, 200, 200]
    assert [r.json()["attempt"] for r in got] == [1, 2, 3, 4]
    assert all(r.headers["x-backend"] == "b1" for r in got)
    # another key has its own count; a POST body is read and hashed as usual
    r = request(backend.port, "POST", "/fail/f2/1/502", body=b"abc")
    assert r.status == 502
    assert r.json()["body_length"] == 3
    assert request(backend.port, "GET", "/fail/f2/1/502").status == 200


# ---------------------------------------------------------------------------
# Resets


def test_reset_before_any_byte_then_200(backend: SimpleNamespace) -> None:
    first = curl(f"http://127.0.0.1:{backend.port}/reset/r1/2")
    assert first.returncode == 56, first.stderr  # CURLE_RECV_ERROR: connection reset
    assert first.stdout == b""
    data, error = raw_exchange(backend.port, b"GET /reset/r1/2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (data, error) == (b"", "ConnectionResetError")
    third = curl("-i", f"http://127.0.0.1:{backend.port}/reset/r1/2")
    assert third.returncode == 0
    assert third.stdout.startswith(b"HTTP/1.1 200")
    assert b"x-backend: b1" in third.stdout


def test_reset_mid_response(backend: SimpleNamespace) -> None:
    n = 100_000
    result = curl("-D", "-", f"http://127.0.0.1:{backend.port}/reset-mid/{n}")
    assert result.returncode == 56, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"Content-Length: {n + 1024}".encode() in head
    assert body == stream_bytes(b"reset-mid", n)  # truncated: all that was sent, no more

    data, error = raw_exchange(backend.port, b"GET /reset-mid/0 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert error == "ConnectionResetError"
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n")
    assert b"Content-Length: 1024" in data


# ---------------------------------------------------------------------------
# Bodies


@pytest.mark.parametrize("n", [0, 1, 65_536, 3_000_001])
def test_bytes(backend: SimpleNamespace, n: int) -> None:
    r = request(backend.port, "GET", f"/bytes/{n}")
    assert r.status == 200
    assert r.body == stream_bytes(b"bytes", n)
    assert r.headers["x-sha256"] == hashlib.sha256(r.body).hexdigest()
    assert r.headers["x-length"] == str(n)
    assert r.headers["content-length"] == str(n)


def test_bytes_chunked_and_seeded(backend: SimpleNamespace) -> None:
    r = request(backend.port, "GET", "/bytes/200000?chunked=1&seed=other")
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    assert r.body == stream_bytes(b"other", 200_000)
    assert r.body != stream_bytes(b"bytes", 200_000)
    assert r.headers["x-sha256"] == hashlib.sha256(r.body).hexdigest()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("query", ["", "?chunked=1", "?stream=1"])
def test_echo(backend: SimpleNamespace, method: str, query: str) -> None:
    body = os.urandom(1_500_000)
    r = request(backend.port, method, f"/echo{query}", body=body)
    assert r.status == 200
    assert r.body == body
    if query == "?stream=1":
        assert "x-sha256" not in r.headers
    else:
        assert r.headers["x-sha256"] == hashlib.sha256(body).hexdigest()
        assert r.headers["x-length"] == str(len(body))
    chunked = query in ("?chunked=1", "?stream=1")
    assert (r.headers.get("transfer-encoding") == "chunked") is chunked


def test_echo_empty(backend: SimpleNamespace) -> None:
    r = request(backend.port, "GET", "/echo")
    assert (r.status, r.body) == (200, b"")
    assert r.headers["x-sha256"] == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------------------
# Stats, keep-alive, WebSocket, the request log


def test_stats_count_connections_and_requests(backend: SimpleNamespace) -> None:
    before = request(backend.port, "GET", "/stats").json()
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
    try:
        replies = [request(backend.port, "GET", "/pooled", conn=conn).json() for _ in range(5)]
    finally:
        conn.close()
    assert [r["connection_requests"] for r in replies] == [1, 2, 3, 4, 5]
    assert len({r["connection"] for r in replies}) == 1
    with socket.create_connection(("127.0.0.1", backend.port)):
        pass  # a connection without a request counts too
    time.sleep(0.1)
    after = request(backend.port, "GET", "/stats").json()
    assert after["name"] == "b1"
    assert after["connections_total"] - before["connections_total"] == 3
    assert after["requests_total"] - before["requests_total"] == 6
    assert after["by_path"]["/pooled"] - before["by_path"].get("/pooled", 0) == 5
    assert after["by_path"]["/stats"] >= 2


def test_websocket_echo(backend: SimpleNamespace) -> None:
    async def talk() -> tuple[str, list[Any]]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://127.0.0.1:{backend.port}/ws") as ws:
            assert ws._response is not None
            name = ws._response.headers["x-backend"]
            await ws.send_str("hello")
            text = await ws.receive_str(timeout=5)
            await ws.send_bytes(b"\x00\x01binary")
            data = await ws.receive_bytes(timeout=5)
            return name, [text, data]

    name, echoed = asyncio.run(talk())
    assert name == "b1"
    assert echoed == ["hello", b"\x00\x01binary"]
    assert request(backend.port, "GET", "/ws").status == 400  # not an upgrade


def test_switch_answers_101_unasked(backend: SimpleNamespace) -> None:
    with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
        sock.sendall(b"GET /x/switch/made-up HTTP/1.1\r\nHost: b\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"upgrade: made-up" in head.lower()
    assert rest == b"switched:made-up\n"


def test_request_log(backend: SimpleNamespace) -> None:
    request(backend.port, "DELETE", "/logged/thing?q=1", headers=[("X-Trace", "t-1")])
    curl(f"http://127.0.0.1:{backend.port}/reset/logged/1")
    lines = [json.loads(line) for line in backend.log.read_text().splitlines()]
    logged = next(entry for entry in lines if entry["path"] == "/logged/thing")
    assert logged["method"] == "DELETE"
    assert logged["query"] == "q=1"
    assert logged["headers"]["x-trace"] == "t-1"
    assert ["X-Trace", "t-1"] in logged["header_list"]
    assert logged["name"] == "b1"
    assert any(entry["path"] == "/reset/logged/1" for entry in lines)  # reset ones too


def test_dual_stack_by_default() -> None:
    proc, ready = start_tool("http_backend", "--name", "dual")
    try:
        port = port_of(ready)
        assert request(port, "GET", "/").json()["name"] == "dual"
        with socket.create_connection(("::1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        stop(proc)
    assert proc.returncode == 0  # SIGTERM is a clean stop


def test_stats_count_request_bodies_by_digest(backend: SimpleNamespace) -> None:
    body = os.urandom(3000)
    digest = hashlib.sha256(body).hexdigest()
    assert request(backend.port, "POST", "/anything", body=body).status == 200
    assert request(backend.port, "PUT", "/echo", body=body).status == 200
    stats = request(backend.port, "GET", "/stats").json()
    assert stats["bodies"][digest] == 2


def test_status_option_fails_every_request() -> None:
    proc, ready = start_tool("http_backend", "--host", "127.0.0.1", "--name", "bad",
                             "--status", "503")
    try:
        port = port_of(ready)
        for path in ("/", "/echo", "/status/200"):
            reply = request(port, "POST", path, body=b"x")
            assert reply.status == 503 and reply.headers["x-backend"] == "bad"
    finally:
        stop(proc)

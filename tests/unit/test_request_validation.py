"""Malformed request targets, methods and authorities at both codecs, over real loopback
sockets: HTTP/1.1 answers 400 and closes (RFC 9112 3.2), HTTP/2 resets the stream with
PROTOCOL_ERROR (RFC 9113 8.3) and the connection carries on.  The handler (the proxy's
routing and forwarding) never sees such a request, and the refusal is counted under a
fixed reason."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from nodeproxy.codec.h1 import H1Server
from nodeproxy.codec.h2 import H2Server
from nodeproxy.codec.message import Exchange, ResponseHead

ErrorCodes = h2.errors.ErrorCodes
TIMEOUT = 20


async def answer(exchange: Exchange) -> None:
    body = exchange.request.path.encode()
    await exchange.respond(ResponseHead(200, [("content-length", str(len(body)))]))
    await exchange.send(body)
    await exchange.finish()


# --- HTTP/1.1 --------------------------------------------------------------------------------

H1_REFUSED = [
    (b"GET http://x/admin HTTP/1.1\r\nHost: x\r\n\r\n", "absolute_form"),
    (b"GET http://x/admin HTTP/1.0\r\n\r\n", "absolute_form"),
    (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", "asterisk_form"),
    (b"GET admin HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid characters in url"),  # llhttp
    (b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n", "fragment"),
    (b"GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n", "bad_escape"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "repeated_host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n", "repeated_host"),
    (b"GET / HTTP/1.1\r\nHost: admin@x\r\n\r\n", "bad_authority"),
    (b"GET / HTTP/1.1\r\nHost: x/admin\r\n\r\n", "bad_authority"),
    (b"GET / HTTP/1.1\r\n\r\n", "no_host"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer_coding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: magic-" + b"x" * 50 + b"\r\n\r\n", "expectation"),
]


async def h1_exchange(data: bytes) -> tuple[bytes, list[str], list[str]]:
    """Send `data` to an H1Server; what came back, the paths handled, the reasons counted."""
    handled: list[str] = []
    reasons: list[str] = []

    async def handler(exchange: Any) -> None:
        handled.append(exchange.request.path)
        await answer(exchange)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: H1Server(handler, max_header_bytes=8192, idle_timeout=5,
                         on_bad_request=reasons.append), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(data)
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    server.close()
    return received, handled, reasons


@pytest.mark.parametrize(("data", "reason"), H1_REFUSED)
def test_h1_malformed_requests_get_400_and_reach_no_handler(data: bytes, reason: str) -> None:
    received, handled, reasons = asyncio.run(h1_exchange(data))
    status = b"501" if reason == "transfer_coding" else \
        b"417" if reason == "expectation" else b"400"
    assert received.startswith(b"HTTP/1.1 " + status), received
    assert handled == [] and reasons == [reason]


def test_h1_a_refusal_after_good_requests_answers_them_first() -> None:
    good = b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"GET http://x/admin HTTP/1.1\r\nHost: x\r\n\r\n"
    received, handled, reasons = asyncio.run(h1_exchange(good + bad + good))
    assert handled == ["/public/a"] and reasons == ["absolute_form"]
    assert received.count(b"HTTP/1.1 200") == 1 and b"HTTP/1.1 400" not in received
    assert b"/admin" not in received


@pytest.mark.parametrize("data", [
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET //x/../y HTTP/1.1\r\nHost: x:8080\r\n\r\n",
    b"GET /a\\b HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
])
def test_h1_well_formed_requests_pass(data: bytes) -> None:
    received, handled, reasons = asyncio.run(h1_exchange(data))
    assert received.startswith(b"HTTP/1.1 200") and len(handled) == 1 and reasons == []


# --- HTTP/2 ----------------------------------------------------------------------------------

BASE_REQUEST = {":method": "GET", ":scheme": "http", ":authority": "x", ":path": "/public/a"}

# pseudo-header changes -> the reason counted; the stream is reset with PROTOCOL_ERROR
H2_REFUSED: list[tuple[dict[str, str], str]] = [
    ({":path": "http://x/admin"}, "absolute_form"),
    ({":path": "https://x/admin"}, "absolute_form"),
    ({":path": "admin"}, "bad_target"),
    ({":path": "x/admin"}, "bad_target"),
    ({":path": "*"}, "asterisk_form"),
    ({":path": "/a b"}, "bad_target_char"),
    ({":path": "/a\tb"}, "bad_target_char"),
    ({":path": "/caf\xe9"}, "bad_target_char"),
    ({":path": "/a#frag"}, "fragment"),
    ({":path": "/a%zz"}, "bad_escape"),
    ({":method": "GET /admin"}, "bad_method"),
    ({":method": "G(E)T"}, "bad_method"),
    ({":scheme": "ftp"}, "bad_scheme"),
    ({":scheme": "HTTP"}, "bad_scheme"),
    ({":authority": "user@x"}, "bad_authority"),
    ({":authority": "x/admin"}, "bad_authority"),
    ({":authority": "x y"}, "bad_authority"),
]


class RawH2Client:
    """An h2 client that sends what it is told, checks off (a hostile pod's client)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
            header_encoding="latin-1"))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []

    def request(self, fields: list[tuple[str, str]]) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(n.encode("latin-1"), v.encode("latin-1"))
                                     for n, v in fields], end_stream=True)
        self.writer.write(self.conn.data_to_send())
        return sid

    async def until(self, done: Any) -> None:
        while not done():
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                return
            self.events += self.conn.receive_data(data)
            self.writer.write(self.conn.data_to_send())

    def reset_code(self, sid: int) -> int | None:
        return next((int(e.error_code) for e in self.events
                     if isinstance(e, h2.events.StreamReset) and e.stream_id == sid), None)

    def status(self, sid: int) -> str | None:
        for e in self.events:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                return dict(e.headers)[":status"]  # type: ignore[no-any-return]
        return None

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
                   and e.stream_id == sid for e in self.events)

    def goaway(self) -> int | None:
        return next((int(e.error_code) for e in self.events
                     if isinstance(e, h2.events.ConnectionTerminated)), None)


async def h2_session(script: Any) -> tuple[list[str], list[str], list[int]]:
    """Run `script(client)` against an H2Server; the paths handled, the reasons counted
    per stream, the connection error codes."""
    handled: list[str] = []
    reasons: list[str] = []
    errors: list[int] = []

    async def handler(exchange: Exchange) -> None:
        handled.append(exchange.request.path)
        await answer(exchange)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: H2Server(handler, on_bad_request=reasons.append,
                         on_protocol_error=lambda c, m: errors.append(c)), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    client = RawH2Client(reader, writer)
    try:
        await asyncio.wait_for(script(client), TIMEOUT)
    finally:
        writer.close()
        server.close()
    return handled, reasons, errors


def fields_of(changes: dict[str, str]) -> list[tuple[str, str]]:
    return [*{**BASE_REQUEST, **changes}.items(), ("x-role", "member")]


@pytest.mark.parametrize(("changes", "reason"), H2_REFUSED)
def test_h2_malformed_pseudo_headers_reset_the_stream(changes: dict[str, str],
                                                      reason: str) -> None:
    async def script(client: RawH2Client) -> None:
        bad = client.request(fields_of(changes))
        good = client.request(fields_of({}))
        await client.until(lambda: client.ended(bad) and client.ended(good))
        assert client.reset_code(bad) == ErrorCodes.PROTOCOL_ERROR
        assert client.status(good) == "200" and client.goaway() is None

    handled, reasons, errors = asyncio.run(h2_session(script))
    assert handled == ["/public/a"] and reasons == [reason] and errors == []


def test_h2_connect_is_not_a_malformed_request_but_the_handlers_to_refuse() -> None:
    """CONNECT is well formed HTTP/2: the codec hands it on, uncounted as a bad request;
    the manager refuses it (403, tests/integration/test_hostile_upgrade.py)."""
    async def script(client: RawH2Client) -> None:
        sid = client.request([(":method", "CONNECT"), (":authority", "x:443")])
        await client.until(lambda: client.ended(sid))

    handled, reasons, errors = asyncio.run(h2_session(script))
    assert len(handled) == 1 and reasons == [] and errors == []


# h2's own checks (RFC 9113 8.2, 8.3): a connection error, as Envoy does by default
H2_CONNECTION_ERRORS: list[list[tuple[str, str]]] = [
    [("x-a", "1"), *BASE_REQUEST.items()],                          # pseudo after regular
    [*BASE_REQUEST.items(), (":path", "/admin")],                   # repeated pseudo
    [*BASE_REQUEST.items(), (":protocol", "x"), (":evil", "1")],    # unknown pseudo
    [(":method", "GET"), (":scheme", "http"), (":authority", "x")],  # no :path
    [*{**BASE_REQUEST, ":path": ""}.items()],                       # empty :path
    [*BASE_REQUEST.items(), ("X-Role", "member")],                  # uppercase name
    [*BASE_REQUEST.items(), ("connection", "close")],               # connection-specific
    [*BASE_REQUEST.items(), ("transfer-encoding", "chunked")],
    [*BASE_REQUEST.items(), ("te", "gzip")],
    [*BASE_REQUEST.items(), ("host", "other")],                     # :authority != host
    [*{k: v for k, v in BASE_REQUEST.items() if k != ":authority"}.items(),
     ("host", "a"), ("host", "b")],                                 # host twice
]


@pytest.mark.parametrize("fields", H2_CONNECTION_ERRORS)
def test_h2_header_blocks_h2_refuses_end_the_connection(fields: list[tuple[str, str]]) -> None:
    async def script(client: RawH2Client) -> None:
        client.request(fields)
        await client.until(lambda: client.goaway() is not None)
        assert client.goaway() == ErrorCodes.PROTOCOL_ERROR

    handled, _, errors = asyncio.run(h2_session(script))
    assert handled == [] and errors == [ErrorCodes.PROTOCOL_ERROR]


def test_h2_well_formed_requests_pass() -> None:
    async def script(client: RawH2Client) -> None:
        sids = [client.request(fields_of(changes)) for changes in (
            {}, {":method": "OPTIONS", ":path": "*"}, {":scheme": "https"},
            {":authority": "[fd00::1]:8080"}, {":path": "//x/../y?q=/../z"})]
        await client.until(lambda: all(client.ended(s) for s in sids))
        assert [client.status(s) for s in sids] == ["200"] * 5

    handled, reasons, errors = asyncio.run(h2_session(script))
    assert sorted(handled) == sorted(["/public/a", "*", "/public/a", "/public/a",
                                      "//x/../y?q=/../z"])
    assert reasons == [] and errors == []

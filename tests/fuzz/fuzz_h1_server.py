"""Fuzz target: the HTTP/1.1 front end (nodeproxy.codec.h1.H1Server).

One input is the byte stream a client pod sends on one connection (pipelined requests,
bodies, garbage), delivered at once or in small reads through an in-memory transport on a
real event loop.  The handler stands for the proxy: it records each request head it would
forward, reads the body and answers 200.

Invariants, beyond "nothing raises":
- what the handler receives is well formed: the method a token, the path in origin form
  (or ``*`` for OPTIONS) without whitespace or control characters, header names
  lowercase tokens, no hop-by-hop header but Upgrade (policies see it; the upgrade path
  never forwards it as sent), no field the Connection header names, no Host beside the
  authority, one Content-Length at most, an authority without whitespace or control
  characters; a CONNECT only as an upgrade (the manager refuses it, target unread);
- a request with more than one Host is refused (RFC 9112 3.2);
- a refused request gets a 4xx (or 501 for a transfer coding) with ``connection: close``
  and the connection closes; requests before it are answered first, none after it is
  handled;
- every handled request gets exactly one response, in order, and nothing else is written.
"""

from __future__ import annotations

import httptools

from nodeproxy.codec.h1 import H1Exchange, H1Server
from nodeproxy.codec.message import HOP_BY_HOP, BodyError, ResponseHead
from tests.fuzz import harness


class _Responses:
    """httptools callbacks counting the responses in what the server wrote."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)
        self.connection_close = False
        self._headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.lower()))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 100:
            self.statuses.append(status)
            self.connection_close = (b"connection", b"close") in self._headers
        self._headers = []


def _written_responses(data: bytes) -> _Responses:
    responses = _Responses()
    try:
        responses.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    return responses


class _Requests:
    """An independent reading of the input: each request's header fields as sent."""

    def __init__(self, data: bytes) -> None:
        self.fields: list[list[tuple[str, str]]] = []
        self._current: list[tuple[str, str]] = []
        try:
            httptools.HttpRequestParser(self).feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            pass

    def on_message_begin(self) -> None:
        self._current = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.fields.append(self._current)
        self._current = []  # what follows the head (chunked trailers) is not the head's


def _check_request(exchange: H1Exchange, sent: list[tuple[str, str]] | None) -> None:
    head = exchange.request
    if head.method == "CONNECT":
        # Passed on only as an upgrade: the manager refuses CONNECT (403) before anything
        # reads its target (nodeproxy/codec/upgrade.py).
        assert exchange.upgrade, "CONNECT passed on as an ordinary request"
        return  # neither its target nor its Host is checked by the codec
    harness.check_origin_form(head.method, head.path)
    # Policies see the client's Upgrade (it is never forwarded as sent: upgrade.py).
    harness.check_header_fields(head.headers, HOP_BY_HOP, allow=frozenset({"upgrade"}))
    assert not harness.CONTROL_OR_SPACE.search(head.authority), \
        f"authority {head.authority!r} has whitespace or control characters"
    if head.version == "1.1":
        assert head.authority, "an HTTP/1.1 request without Host was passed on"
    if sent is None:
        return
    hosts = [v for n, v in sent if n == "host"]
    assert len(hosts) <= 1, f"a request with {len(hosts)} Host fields was passed on"
    named = {t.strip().lower() for n, v in sent if n == "connection" for t in v.split(",")}
    named -= {"close", "keep-alive", "upgrade", ""}
    passed = {n for n, _ in head.headers}
    assert not named & passed, f"fields named by Connection passed on: {named & passed}"


async def _drive(data: bytes) -> None:
    handled: list[H1Exchange] = []

    async def handler(exchange: H1Exchange) -> None:
        handled.append(exchange)
        try:
            while await exchange.body.read():
                pass
        except BodyError:
            exchange.reset()
            return
        await exchange.respond(ResponseHead(200, [("content-length", "2")]))
        await exchange.send(b"ok")
        await exchange.finish()

    refusals: list[str] = []
    server = H1Server(handler, max_header_bytes=8192, idle_timeout=3600,
                      on_bad_request=refusals.append)
    transport = harness.MemoryTransport()
    await harness.feed(server, transport, data)
    if not transport.closed:
        server.eof_received()
        await harness.settle()
    server.connection_lost(None)
    await harness.settle()

    sent = _Requests(data).fields
    for i, exchange in enumerate(handled):
        _check_request(exchange, sent[i] if i < len(sent) else None)
    written = bytes(transport.written)
    responses = _written_responses(written)
    answered = [e for e in handled if not transport.aborted or e.finished]
    if refusals:
        assert transport.closed, f"refused ({refusals[0]}) but the connection stayed open"
        if not transport.aborted and responses.statuses:
            last = responses.statuses[-1]
            if len(responses.statuses) > len([e for e in handled if e.responded]):
                assert 400 <= last < 500 or last == 501, f"refused with {last}"
                assert responses.connection_close, "a refusal without connection: close"
    if not transport.aborted:
        assert len(responses.statuses) <= len(answered) + (1 if refusals else 0), \
            f"{len(responses.statuses)} responses written for {len(answered)} requests"


def check(data: bytes) -> None:
    harness.run(lambda: _drive(data))

"""Fuzz target: the HTTP/2 front end (nodeproxy.codec.h2.H2Server, h2 underneath).

One input is what a client pod sends on one prior-knowledge h2c connection: the
connection preface and frames (the seeds are real clients' bytes: requests with bodies,
trailers, CONTINUATION, resets, pings, settings, window updates, GOAWAY), delivered at
once or in small reads through an in-memory transport on a real event loop.  The
handler stands for the proxy: it records each request head it would forward, reads the
body and answers 200.

Invariants, beyond "nothing raises" (and nothing logged as an error):
- what the handler receives is well formed (RFC 9113 8.3): the method a token; for
  CONNECT an authority and no path, otherwise a scheme of http or https and a path in
  origin form (``*`` only for OPTIONS) without whitespace or control characters; header
  names lowercase tokens, no hop-by-hop field but ``te: trailers``, no Host, values
  without CR/LF/NUL; an authority without whitespace or control characters;
- everything the server writes is well-formed HTTP/2 frames, SETTINGS first;
- a connection ended by a protocol error got a GOAWAY and was closed.
"""

from __future__ import annotations

from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame, GoAwayFrame, SettingsFrame

from nodeproxy.codec.h2 import H2Exchange, H2Server
from nodeproxy.codec.message import HOP_BY_HOP, BodyError, ResponseHead
from tests.fuzz import harness

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def written_frames(data: bytes) -> list[Frame]:
    """Parse what a peer wrote as HTTP/2 frames; AssertionError if it is not that."""
    frames: list[Frame] = []
    view = memoryview(data)
    while view:
        assert len(view) >= 9, f"a truncated frame header: {bytes(view)!r}"
        try:
            frame, length = Frame.parse_frame_header(view[:9])
            assert len(view) >= 9 + length, "a truncated frame"
            frame.parse_body(view[9:9 + length])
        except HyperframeError as e:
            raise AssertionError(f"the server wrote a malformed frame: {e}") from e
        frames.append(frame)
        view = view[9 + length:]
    return frames


def check_h2_request(exchange: H2Exchange) -> None:
    head = exchange.request
    assert harness.TOKEN.match(head.method), f"method {head.method!r} is not a token"
    assert not harness.CONTROL_OR_SPACE.search(head.authority), \
        f"authority {head.authority!r} has whitespace or control characters"
    if head.method == "CONNECT":
        assert head.authority, "CONNECT without :authority passed on"
        assert not head.path, "CONNECT with a :path passed on"
    else:
        assert head.scheme in ("http", "https"), f":scheme {head.scheme!r} passed on"
        harness.check_origin_form(head.method, head.path)
    te = [v for n, v in head.headers if n == "te"]
    assert all(v == "trailers" for v in te), f"te: {te} passed on"
    harness.check_header_fields(head.headers, HOP_BY_HOP, allow=frozenset({"te"}))


async def _drive(data: bytes) -> None:
    handled: list[H2Exchange] = []

    async def handler(exchange: H2Exchange) -> None:
        handled.append(exchange)
        try:
            while await exchange.body.read():
                pass
        except BodyError:
            return
        try:
            await exchange.respond(ResponseHead(200, [("content-type", "text/plain")]))
            await exchange.send(b"ok")
            await exchange.finish()
        except ConnectionResetError:
            pass

    errors: list[tuple[int, str]] = []
    server = H2Server(handler, max_header_bytes=8192, max_concurrent_streams=100,
                      on_protocol_error=lambda code, why: errors.append((code, why)))
    transport = harness.MemoryTransport()
    await harness.feed(server, transport, data)
    server.connection_lost(None)
    await harness.settle()

    for exchange in handled:
        check_h2_request(exchange)
    frames = written_frames(bytes(transport.written))
    assert frames and isinstance(frames[0], SettingsFrame), "the server's first frame"
    if errors:
        assert transport.closed, f"protocol error {errors[0]} left the connection open"
        assert any(isinstance(f, GoAwayFrame) for f in frames), \
            f"protocol error {errors[0]} without a GOAWAY"


def check(data: bytes) -> None:
    harness.run(lambda: _drive(data))

"""A hostile HBONE client against the proxy's tunnel server (tunnel/session.py): the
CONNECT requests it opens streams with, taken by the server's request shortcut
(ProxyH2Connection.receive_known_request: header blocks that leave HPACK's dynamic table
alone) and without it (h2's parser and decoder alone).  The rule: what the shortcut takes
is what h2 took, with the same fields; a refusal is the same refusal.

Each scenario is played twice on a real server H2Session with the tunnel's HTTP/2 budgets
(a FrameGuard) over a socketpair: raw frames, no client library.  What a user notices
must be the same: the requests the server's handler got (stream, fields), the bytes each
stream's reader got and whether it saw the end, and each RST_STREAM and GOAWAY the server
sent.  Where the block is the tunnel's own, the shortcut must really be taken."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable

import hpack
import pytest

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.config.model import Http2Limits
from nodeproxy.tunnel.header_block import connect_block, literal, source_port_field
from nodeproxy.tunnel.session import H2Session, StreamTransport
from tests.unit.test_tunnel_client_responses import _recv_all, _refusals, headers, rst
from tests.unit.test_tunnel_framing import Reader, data_frame, on_uvloop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames.header(0, 0x4, 0, 0)
ES = frames.END_STREAM


def _block(port: int = 40000, extra: bytes = b"") -> bytes:
    block, _ = connect_block(ipaddress.ip_address("10.0.0.1"), 80,
                             ipaddress.ip_address("10.0.1.1"), False)
    return block + source_port_field(port) + extra


_ENCODER_FIELDS = [(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                   ("forwarded", "for=10.0.1.9")]


def _indexed_then_static() -> bytes:
    encoder = hpack.Encoder()
    return (headers(encoder.encode(_ENCODER_FIELDS), sid=1) + headers(_block(), sid=3)
            + headers(encoder.encode(_ENCODER_FIELDS), sid=5) + headers(_block(1), sid=7)
            + data_frame(7, b"seven", ES))


SCENARIOS: dict[str, bytes] = {
    "own-block": headers(_block()) + data_frame(1, b"hello", ES),
    "own-block-repeated": b"".join(headers(_block(40000 + sid), sid=sid)
                                   + data_frame(sid, b"x" * sid, ES)
                                   for sid in range(1, 80, 2)),
    "indexed-then-static": _indexed_then_static(),
    "size-update-first": headers(b"\x20" + _block()) + headers(_block(), sid=3),
    "size-update-above-max": headers(b"\x3f\xe2\x1f" + _block()),
    "dynamic-index": headers(_block(extra=b"\xbe")),
    "huffman-value": headers(literal(2, "CONNECT") + b"\x01\x85" + b"\xff" * 5),
    "bad-value": headers(_block(extra=literal("x-bad", "a\nb"))),
    "uppercase-name": headers(_block(extra=literal("X-Bad", "1"))),
    "not-utf8": headers(_block(extra=b"\x00\x05x-bad\x02\xff\xfe")),
    "path-on-connect": headers(_block(extra=b"\x84")),
    "content-length-then-short": headers(_block(extra=literal("content-length", "9")))
                                 + data_frame(1, b"abc", ES),
    "cookies": headers(_block(extra=literal("cookie", "a=1") + literal("cookie", "b=2"))),
    "huge": headers(_block(extra=literal("x-huge", "v" * 70_000))),
    "with-end-stream": headers(_block(), frames.END_HEADERS | ES),
    "continuation": headers(_block()[:10], 0) + frames.header(
        len(_block()) - 10, frames.CONTINUATION, frames.END_HEADERS, 1) + _block()[10:],
    "even-stream": headers(_block(), sid=2),
    "stream-0": headers(_block(), sid=0),
    "lower-id": headers(_block(), sid=5) + headers(_block(), sid=3),
    "same-id-twice": headers(_block()) + headers(_block()),
    "reset-mid-stream": headers(_block()) + data_frame(1, b"abc") + rst(1)
                        + headers(_block(), sid=3) + data_frame(3, b"def", ES),
    "reset-at-once": b"".join(headers(_block(), sid=sid) + rst(sid) for sid in range(1, 41, 2)),
}
TAKEN = {"own-block": [1], "own-block-repeated": list(range(1, 80, 2)),
         "indexed-then-static": [3, 7], "size-update-first": [3],
         "reset-mid-stream": [1, 3], "reset-at-once": list(range(1, 41, 2)),
         "lower-id": [5], "same-id-twice": [1]}  # the first block; the second is h2's


async def _play(scenario: bytes, limits: Http2Limits, *, echo: bool = False) -> tuple:
    """A server session fed the client's preface and `scenario`: the requests it took,
    what each stream's reader got, and the bytes it sent back (with `echo`, the readers
    echo and end their direction after the client's END_STREAM, and h2's view of the
    connection at the end comes too)."""
    from tests.unit.test_tunnel_client_open import _h2_view
    loop = asyncio.get_running_loop()
    requests: list[tuple[int, list[tuple[str, str]]]] = []
    readers: dict[int, Reader] = {}

    def on_request(session: H2Session, stream: StreamTransport) -> None:
        requests.append((stream.stream_id, sorted(stream.request_headers.items())))
        assert stream.response is None  # a server's stream has no response future
        session.respond(stream, 200)
        readers[stream.stream_id] = Reader(echo=echo)
        stream.set_protocol(readers[stream.stream_id])

    a, b = socket.socketpair()
    session = H2Session(client_side=False, on_request=on_request, limits=limits)
    await loop.create_connection(lambda: session, sock=a)
    b.setblocking(False)
    try:
        try:
            await loop.sock_sendall(b, PREFACE + scenario)
        except ConnectionError:
            pass
        sent_back = await _recv_all(b)
        received = {sid: (bytes(r.data), r.eof.is_set(), r.gone.is_set())
                    for sid, r in readers.items()}
        if echo:
            return requests, received, _frames_sent(sent_back), _h2_view(session.conn)
        return requests, received, _refusals(sent_back)
    finally:
        session.abort()
        b.close()
        await asyncio.sleep(0)


def _counting(taken: list[int]) -> Callable:
    real = ProxyH2Connection.receive_known_request

    def receive_known_request(self, stream_id: int, block: bytes):
        event = real(self, stream_id, block)
        if event is not None:
            taken.append(stream_id)
        return event
    return receive_known_request


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_hostile_clients_requests_get_what_h2_alone_gives(
        monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    results = []
    # the reset-at-once scenarios spend the premature-reset budget early
    limits = Http2Limits(premature_reset_min_streams=10, premature_reset_lifetime_seconds=0)

    @on_uvloop
    async def both() -> None:
        taken: list[int] = []
        monkeypatch.setattr(ProxyH2Connection, "receive_known_request", _counting(taken))
        results.append(await _play(SCENARIOS[scenario], limits))
        monkeypatch.setattr(ProxyH2Connection, "receive_known_request",
                            lambda self, stream_id, block: None)
        results.append(await _play(SCENARIOS[scenario], limits))
        results.append(taken)

    both()
    fast, slow, taken = results
    assert fast == slow, (fast, slow)
    assert taken == TAKEN.get(scenario, []), taken
    if scenario == "own-block-repeated":
        assert all(data == b"x" * sid and eof for sid, (data, eof, _) in fast[1].items())
        assert len(fast[0]) == 40 and fast[2] == []
    if scenario == "reset-at-once":  # answered at once, so not premature: no GOAWAY
        assert len(fast[0]) == 20 and all(lost for _, _, lost in fast[1].values())
    if scenario in ("lower-id", "same-id-twice"):
        assert fast[2] and fast[2][-1][0] == "GOAWAY" and fast[2][-1][2] in (0x1, 0x5)



def _frames_sent(data: bytes) -> list[tuple[int, int, int]]:
    """Every frame the server sent: (type, flags, stream id)."""
    found, pos = [], 0
    while pos + 9 <= len(data):
        length, kind, flags, sid = frames.parse_header(data[pos:pos + 9])
        found.append((kind, flags, sid))
        pos += 9 + length
    return found


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_destinations_direct_stream_steps_give_what_h2_alone_gives(
        monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    """The same hostile clients, with the direct stream steps (codec/h2_stream_steps.py:
    the request received, the 200 sent, END_STREAM both ways) and the request shortcut,
    against the code before both: every step declining, h2's own _begin_new_stream and
    no shortcut.  The same requests, bytes, frames sent back (each reader echoes, so the
    server ends its direction too) and h2's view of every stream at the end."""
    from tests.unit.test_tunnel_client_open import _counting as counting_steps
    from tests.unit.test_tunnel_client_open import _old_way
    results = []
    limits = Http2Limits(premature_reset_min_streams=10, premature_reset_lifetime_seconds=0)

    @on_uvloop
    async def both() -> None:
        steps: list[str] = []
        with monkeypatch.context() as m:
            counting_steps(m, steps)
            results.append(await _play(SCENARIOS[scenario], limits, echo=True))
        with monkeypatch.context() as m:
            _old_way(m)
            m.setattr(ProxyH2Connection, "receive_known_request",
                      lambda self, stream_id, block: None)
            results.append(await _play(SCENARIOS[scenario], limits, echo=True))
        results.append(steps)

    both()
    fast, slow, steps = results
    assert fast == slow, (fast, slow)
    if TAKEN.get(scenario):
        assert "received_request" in steps and "sent_response" in steps, steps
    if scenario == "own-block":  # the stream's whole life, both directions ended
        assert sorted(set(steps)) == ["received_end_stream", "received_request",
                                      "sent_end_stream", "sent_response"], steps

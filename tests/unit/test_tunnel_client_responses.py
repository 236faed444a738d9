"""A hostile HBONE server against the proxy's tunnel client (tunnel/session.py): what it
answers to a CONNECT, frame by frame, with the client's ":status: 200" shortcut
(ProxyH2Connection.receive_known_response) and without it (h2's parser alone).  The rule:
whatever the shortcut accepts is what h2 accepted, and a refusal is the same refusal.

Each answer is played twice on a real client H2Session over a socketpair (the server a
raw peer: an h2 connection for the handshake, bytes built by hand for the answer), once
with the shortcut and once with it turned off; what the client's user notices must be the
same: the stream's response (or the error it ends with), whether it ended, and each
RST_STREAM and GOAWAY the client sent back.  The shortcut must really be taken where
the block is the known one, so the comparison is not of h2 with itself.

Bugs these catch: a shortcut that takes a 200 whose flags (PRIORITY, PADDED, END_STREAM)
it did not read, a 200 on a stream never opened, reset, or already answered; a
CONTINUATION whose END_HEADERS-less HEADERS it mistook; a 200 after GOAWAY or after a
SETTINGS change treated otherwise than h2 treats it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import h2.config
import h2.connection
import hpack
import pytest

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.tunnel.session import H2Session
from tests.unit.test_tunnel_framing import on_uvloop

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
OK = b"\x88"  # ":status: 200", static table index 8
PRIORITY, PADDED = 0x20, 0x8
RST_STREAM, SETTINGS, GOAWAY = 0x3, 0x4, 0x7


def headers(block: bytes = OK, flags: int = frames.END_HEADERS, sid: int = 1) -> bytes:
    return frames.header(len(block), frames.HEADERS, flags, sid) + block


def continuation(block: bytes, flags: int = frames.END_HEADERS, sid: int = 1) -> bytes:
    return frames.header(len(block), frames.CONTINUATION, flags, sid) + block


def rst(sid: int, code: int = 0x8) -> bytes:
    return frames.header(4, RST_STREAM, 0, sid) + code.to_bytes(4, "big")


def goaway(last: int, code: int = 0) -> bytes:
    return frames.header(8, GOAWAY, 0, 0) + last.to_bytes(4, "big") + code.to_bytes(4, "big")


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 0x1, "max_concurrent_streams": 0x3,
           "initial_window_size": 0x4}
    body = b"".join(ids[k].to_bytes(2, "big") + v.to_bytes(4, "big")
                    for k, v in values.items())
    return frames.header(len(body), SETTINGS, 0, 0) + body


EXTRA = OK + hpack.Encoder().encode([("x-extra", "1")])
ANSWERS: dict[str, bytes] = {
    "plain": headers(),
    "end-stream": headers(flags=frames.END_HEADERS | frames.END_STREAM),
    "priority": headers(b"\x00\x00\x00\x03\x10" + OK, frames.END_HEADERS | PRIORITY),
    "priority-on-itself": headers(b"\x00\x00\x00\x01\x10" + OK,
                                  frames.END_HEADERS | PRIORITY),
    "padded": headers(b"\x02" + OK + b"\x00\x00", frames.END_HEADERS | PADDED),
    "padding-too-long": headers(b"\x05" + OK, frames.END_HEADERS | PADDED),
    "continuation": headers(b"", 0) + continuation(OK),
    "continuation-split": headers(EXTRA[:1], 0) + continuation(EXTRA[1:]),
    "continuation-other-stream": headers(b"", 0) + continuation(OK, sid=3),
    "extra-field": headers(EXTRA),
    "table-size-update-first": headers(b"\x20" + OK),
    "twice": headers() + headers(),
    "after-100": headers(b"\x08\x03100") + headers(),
    "never-opened": headers(sid=3),
    "even-stream": headers(sid=2),
    "stream-0": headers(sid=0),
    "after-reset": rst(1) + headers(),
    "after-goaway": goaway(1) + headers(),
    "after-goaway-excluding-it": goaway(0) + headers(),
    "after-error-goaway": goaway(1, 0x2) + headers(),
    "after-settings": settings(max_concurrent_streams=0, initial_window_size=0,
                               header_table_size=0) + headers(),
}


async def _recv_all(sock: socket.socket, quiet: float = 0.15) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), quiet)
        except TimeoutError:
            return out
        if not data:
            return out
        out += data


def _refusals(data: bytes) -> list[tuple[str, int, int]]:
    """The RST_STREAM and GOAWAY frames in what the client sent: (kind, stream, code)."""
    found, pos = [], 0
    while pos + 9 <= len(data):
        length, kind, _flags, sid = frames.parse_header(data[pos:pos + 9])
        body = data[pos + 9:pos + 9 + length]
        if kind == RST_STREAM:
            found.append(("RST_STREAM", sid, int.from_bytes(body[:4], "big")))
        elif kind == GOAWAY:
            found.append(("GOAWAY", int.from_bytes(body[:4], "big") & 0x7FFFFFFF,
                          int.from_bytes(body[4:8], "big")))
        pos += 9 + length
    return found


async def _play(answer: bytes) -> tuple:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    session = H2Session(client_side=True)
    try:
        await loop.create_connection(lambda: session, sock=ours)
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        server.initiate_connection()
        stream = session.open_stream(CONNECT)
        server.receive_data(await _recv_all(theirs))
        await loop.sock_sendall(theirs, server.data_to_send())
        server.receive_data(await _recv_all(theirs))  # the SETTINGS ACK
        await loop.sock_sendall(theirs, answer)
        sent_back = await _recv_all(theirs)
        if not stream.response.done():
            response: object = "pending"
        elif stream.response.exception() is not None:
            response = type(stream.response.exception()).__name__
        else:
            response = sorted(stream.response.result().items())
        return (response, stream._remote_ended, stream._finished, session._failed,
                _refusals(sent_back))
    finally:
        session.abort()
        theirs.close()
        await asyncio.sleep(0)


def _counting(calls: list[int]) -> Callable:
    real = ProxyH2Connection.receive_known_response

    def receive_known_response(self, stream_id: int, block: bytes):  # noqa: ANN202
        event = real(self, stream_id, block)
        if event is not None:
            calls.append(stream_id)
        return event
    return receive_known_response


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_a_hostile_servers_answer_gets_what_h2_alone_gives(
        monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    results = []

    @on_uvloop
    async def both() -> None:
        taken: list[int] = []
        monkeypatch.setattr(ProxyH2Connection, "receive_known_response", _counting(taken))
        results.append(await _play(ANSWERS[answer]))
        monkeypatch.setattr(ProxyH2Connection, "receive_known_response",
                            lambda self, stream_id, block: None)
        results.append(await _play(ANSWERS[answer]))
        results.append(taken)

    both()
    fast, slow, taken = results
    assert fast == slow, (fast, slow)
    if answer in ("plain", "twice", "after-100", "after-goaway",
                  "after-goaway-excluding-it", "after-settings"):
        assert taken == [1], "the shortcut was not taken: nothing was compared"
        assert slow[0] == [(":status", "200")]

"""A hostile HBONE client against the proxy's tunnel server (tunnel/session.py): how it
ends a CONNECT stream, with the server's END_STREAM shortcut
(ProxyH2Connection.receive_end_stream) and without it (h2's stream states alone).  The
rule: whatever the shortcut accepts is what h2 accepted; a refusal is the same refusal.

Each ending is played twice on a real server H2Session over a socketpair (the client h2
for the handshake and the CONNECT, raw bytes for the rest): once with the shortcut, once
with it turned off.  What a user notices must be the same: the bytes the stream's reader
got, whether it saw the end (EOF) or lost the stream, and each RST_STREAM and GOAWAY the
server sent back.  Where the ending is a plain one, the shortcut must really be taken.

Bugs these catch: an END_STREAM taken whose padding, window or stream the shortcut did
not check (pad length past the payload, a stream window spent, stream 0, an even or
never-opened id, a stream reset by either side, a second END_STREAM), or taken while a
header block is open or after GOAWAY where h2 refuses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.tunnel import session as tunnel_session
from tests.unit.test_tunnel_client_responses import _recv_all, _refusals, goaway, headers, rst
from tests.unit.test_tunnel_framing import Peer, Server, data_frame, on_uvloop

ES, PADDED = frames.END_STREAM, 0x8
CONNECT_BLOCK = b"\x02\x07CONNECT\x01\x0b10.0.0.1:80"  # literals, no indexing



def _past_the_window() -> bytes:
    """Full frames up to the stream's window, then END_STREAM with one byte too many (to
    a reader that never reads: nothing of the window comes back)."""
    size, left, out = tunnel_session.MAX_FRAME, tunnel_session.STREAM_WINDOW, b""
    while left:
        n = min(size, left)
        out += data_frame(1, b"x" * n)
        left -= n
    return out + data_frame(1, b"x", ES)


ENDINGS: dict[str, bytes] = {
    "empty": data_frame(1, b"", ES),
    "with-bytes": data_frame(1, b"hello", ES),
    "padded-empty": data_frame(1, b"\x03\x00\x00\x00", ES | PADDED),
    "padded-bytes": data_frame(1, b"\x02hi\x00\x00", ES | PADDED),
    "pad-past-payload": data_frame(1, b"\x09hi", ES | PADDED),
    "pad-equal-payload": data_frame(1, b"\x03hi", ES | PADDED),
    "padded-no-pad-length": data_frame(1, b"", ES | PADDED),
    "past-the-stream-window": _past_the_window(),
    "twice": data_frame(1, b"", ES) + data_frame(1, b"", ES),
    "bytes-after": data_frame(1, b"", ES) + data_frame(1, b"late"),
    "stream-0": data_frame(0, b"", ES),
    "even-stream": data_frame(2, b"", ES),
    "never-opened": data_frame(3, b"", ES),
    "far-above": data_frame(0x7FFFFFFF, b"", ES),
    "after-peer-reset": rst(1) + data_frame(1, b"", ES),
    "header-block-open": headers(CONNECT_BLOCK, 0, sid=3) + data_frame(1, b"", ES),
    "after-goaway": goaway(0) + data_frame(1, b"", ES),
    "trailers": headers(b"\x40\x01x\x01y", frames.END_HEADERS | ES),
    "trailers-then-end": headers(b"\x40\x01x\x01y", frames.END_HEADERS | ES)
                         + data_frame(1, b"", ES),
}


async def _play(ending: bytes, paused: bool = False) -> tuple:
    """What the reader got and saw, and the refusals sent back; a `paused` reader never
    reads, so the stream's window is never credited."""
    loop = asyncio.get_running_loop()
    server = Server(paused=paused)
    sock = await server.start()
    peer = Peer(sock)
    try:
        sid = await peer.open()
        assert sid == 1
        await peer.send()
        try:
            await loop.sock_sendall(sock, ending)
        except ConnectionError:
            pass  # refused and closed before all of it was sent: what it sent back counts
        sent_back = await _recv_all(sock)
        reader = server.readers[1]
        return (len(reader.data), bytes(reader.data[:16]), reader.eof.is_set(),
                reader.gone.is_set(), _refusals(sent_back))
    finally:
        assert server.session is not None
        server.session.abort()
        sock.close()
        await asyncio.sleep(0)


def _counting(calls: list[int]) -> Callable:
    real = ProxyH2Connection.receive_end_stream

    def receive_end_stream(self, stream_id: int) -> bool:
        taken = real(self, stream_id)
        if taken:
            calls.append(stream_id)
        return taken
    return receive_end_stream


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_hostile_clients_stream_end_gets_what_h2_alone_gives(
        monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    results = []

    @on_uvloop
    async def both() -> None:
        taken: list[int] = []
        monkeypatch.setattr(ProxyH2Connection, "receive_end_stream", _counting(taken))
        paused = ending == "past-the-stream-window"
        results.append(await _play(ENDINGS[ending], paused))
        monkeypatch.setattr(ProxyH2Connection, "receive_end_stream",
                            lambda self, stream_id: False)
        results.append(await _play(ENDINGS[ending], paused))
        results.append(taken)

    both()
    fast, slow, taken = results
    assert fast == slow, (fast, slow)
    if ending in ("empty", "with-bytes", "padded-empty", "padded-bytes", "twice",
                  "bytes-after", "after-goaway"):
        assert taken == [1], "the shortcut was not taken: nothing was compared"
        assert slow[2], slow  # the reader saw the end

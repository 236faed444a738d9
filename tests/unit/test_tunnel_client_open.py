"""A hostile destination node against the source's stream open (tunnel/session.py's
``open_encoded_stream``, ProxyH2Connection.send_encoded_headers and the receive
shortcuts), with the direct stream steps (codec/h2_stream_steps.py, the quiet
``_begin_new_stream`` and ``get_next_available_stream_id``) and without them (h2's
``process_input`` and its own methods: the code before them).

Each scenario is played twice on a real client H2Session over a socketpair, the
destination a raw peer (an h2 server connection for the handshake and to read what the
client sends; its answers built by hand); what the source's user and the peer notice
must be the same both ways: the CONNECT's response or the error it ended with, how the
stream ended, the bytes each side received (SHA-256), each RST_STREAM and GOAWAY the
client sent, the exception an open raised, and h2's view of every stream (state machine,
windows, highest ids) at the end.  The direct steps must really be taken in the
scenarios that reach them, so the comparison is not of h2 with itself."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket

import h2.config
import h2.connection
import h2.events
import hpack
import pytest

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec import h2_stream_steps
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.tunnel.header_block import connect_block, source_port_field
from nodeproxy.tunnel.session import H2Session
from tests.unit.test_tunnel_client_responses import (
    GOAWAY,
    OK,
    RST_STREAM,
    _recv_all,
    _refusals,
    continuation,
    goaway,
    headers,
    rst,
    settings,
)
from tests.unit.test_tunnel_framing import Reader, on_uvloop

BLOCK, AUTHORITY = connect_block(ipaddress.ip_address("10.0.0.7"), 8080,
                                 ipaddress.ip_address("10.0.0.9"), False)
BLOCK += source_port_field(40123)
DOWN = os.urandom(40_000)  # the destination's bytes to the source
UP = os.urandom(16_000)  # the source's bytes, per stream (within h2's default windows)


def data(sid: int, payload: bytes, end: bool = False, size: int = 16_384) -> bytes:
    out = b""
    for at in range(0, len(payload), size):
        piece = payload[at:at + size]
        last = end and at + size >= len(payload)
        out += frames.header(len(piece), frames.DATA, frames.END_STREAM if last else 0,
                             sid) + piece
    if end and not payload:
        out += frames.empty_data(sid, True)
    return out


def window_update(sid: int, n: int) -> bytes:
    return frames.window_update(sid, n)


LITERAL_200_INDEXED = b"\x48\x03200"  # :status 200, incremental indexing (§6.2.1)
S = 3  # the scenario's stream: stream 1 opened the connection (IDLE -> CLIENT_OPEN)
SCENARIOS: dict[str, list[bytes]] = {
    # each a list of answers, one per turn; b"OPEN" opens one more stream (5)
    "exchange": [headers(sid=S) + data(S, DOWN, end=True)],
    "exchange-empty-end": [headers(sid=S) + data(S, DOWN) + data(S, b"", end=True)],
    "two-streams": [b"OPEN", headers(sid=S) + headers(sid=5) + data(5, DOWN, end=True)
                    + data(S, b"", end=True)],
    "404": [headers(b"\x8d", sid=S)],
    "literal-200-indexed": [headers(LITERAL_200_INDEXED, sid=S) + data(S, DOWN, end=True)],
    "size-update-then-200": [headers(b"\x20" + OK, sid=S)],
    "size-update-too-large": [headers(b"\x3f\xe1\xff\x03" + OK, sid=S)],
    "dynamic-index": [headers(b"\xbe", sid=S)],
    "huffman-garbage": [headers(b"\x08\x83\xff\xff\xff", sid=S)],
    "end-stream-on-200": [headers(flags=frames.END_HEADERS | frames.END_STREAM, sid=S)],
    "continuation": [headers(b"", 0, sid=S) + continuation(OK, sid=S)
                     + data(S, DOWN, end=True)],
    "reset-before-200": [rst(S)],
    "reset-after-200": [headers(sid=S) + data(S, DOWN[:1000]) + rst(S, 0x2)],
    "reset-then-200": [rst(S) + headers(sid=S)],
    "goaway-excluding-it": [goaway(1) + headers(sid=S)],
    "goaway-including-it": [goaway(S) + headers(sid=S) + data(S, DOWN, end=True)],
    "error-goaway-mid-open": [goaway(S, 0x2)],
    "goaway-then-open": [goaway(S), b"OPEN", headers(sid=S) + headers(sid=5)],
    "data-before-200": [data(S, DOWN[:100])],
    "end-before-200": [data(S, b"", end=True)],
    "window-update-before-200": [window_update(S, 1000) + headers(sid=S)],
    "200-twice": [headers(sid=S) + headers(sid=S)],
    "end-twice": [headers(sid=S) + data(S, b"", end=True) + data(S, b"", end=True)],
    "200-on-the-closed-first": [headers(sid=1)],
    "stream-limit": [settings(max_concurrent_streams=1), b"OPEN"],
    "stream-limit-zero": [settings(max_concurrent_streams=0), b"OPEN"],
    "window-shrunk": [settings(initial_window_size=0), headers(sid=S)],
    "headers-on-even-stream": [headers(sid=2)],
}


def _h2_view(conn: ProxyH2Connection) -> tuple:
    streams = {}
    for sid, s in conn.streams.items():
        streams[sid] = (vars(s.state_machine), s.outbound_flow_control_window,
                        vars(s._inbound_window_manager), s._authority, s.request_method,
                        s.max_outbound_frame_size)
    return (conn.state_machine.state, conn.highest_outbound_stream_id,
            conn.highest_inbound_stream_id, streams, dict(conn._closed_streams),
            conn.outbound_flow_control_window)


async def _play(answers: list[bytes], *, exhausted: bool = False) -> tuple:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    session = H2Session(client_side=True)
    streams, readers, outcome = [], [], []
    received: dict[int, bytearray] = {}
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))

    def read(raw: bytes) -> list:
        try:
            events = server.receive_data(raw)
        except Exception as e:  # noqa: BLE001 - the raw answers leave it behind
            return [type(e).__name__]
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                received.setdefault(event.stream_id, bytearray()).extend(event.data)
        return [type(e).__name__ for e in events]

    def open_one() -> None:
        try:
            stream = session.open_encoded_stream(BLOCK, AUTHORITY)
        except Exception as e:  # noqa: BLE001 - compared
            outcome.append(("open raised", type(e).__name__, str(e)))
            return
        reader = Reader()
        stream.set_protocol(reader)
        stream.write(UP)
        stream.write_eof()
        streams.append(stream)
        readers.append(reader)

    try:
        await loop.create_connection(lambda: session, sock=ours)
        server.initiate_connection()
        open_one()  # stream 1: h2's own first open (the connection IDLE -> CLIENT_OPEN)
        read(await _recv_all(theirs))
        await loop.sock_sendall(theirs, server.data_to_send() + headers(sid=1)
                                + data(1, b"", end=True))
        read(await _recv_all(theirs))  # the SETTINGS ACK, stream 1's bytes
        if exhausted:
            session.conn.highest_outbound_stream_id = 2**31 - 1
        open_one()  # stream 3, the scenario's
        read(await _recv_all(theirs))
        for answer in answers:
            if answer == b"OPEN":
                open_one()
            else:
                await loop.sock_sendall(theirs, answer)
            sent_back = await _recv_all(theirs)
            outcome.append(("refusals", _refusals(sent_back)))
            read(sent_back)
        for stream, reader in zip(streams, readers, strict=True):
            response = stream.response
            if not response.done():
                answer_seen: object = "pending"
            elif response.exception() is not None:
                answer_seen = type(response.exception()).__name__
            else:
                answer_seen = sorted(response.result().items())
            outcome.append((stream.stream_id, answer_seen, stream._remote_ended,
                            stream._local_ended, stream._finished, reader.eof.is_set(),
                            hashlib.sha256(reader.data).hexdigest(), len(reader.data)))
        outcome.append(("peer received", {sid: hashlib.sha256(b).hexdigest()
                                          for sid, b in received.items()}))
        outcome.append(("failed", session._failed, session.goaway))
        outcome.append(("h2", _h2_view(session.conn)))
        return tuple(outcome)
    finally:
        session.abort()
        theirs.close()
        await asyncio.sleep(0)


STEP_NAMES = ("sent_request", "sent_response", "sent_end_stream", "received_request",
              "received_response", "received_end_stream")


def _old_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every direct step declines and h2's own stream methods run: the code before."""
    for name in STEP_NAMES:
        monkeypatch.setattr(h2_stream_steps, name, lambda machine: None)
    monkeypatch.setattr(h2_stream_steps, "connection_open", lambda machine: False)
    monkeypatch.setattr(ProxyH2Connection, "_begin_new_stream",
                        h2.connection.H2Connection._begin_new_stream)
    monkeypatch.setattr(ProxyH2Connection, "get_next_available_stream_id",
                        h2.connection.H2Connection.get_next_available_stream_id)


def _counting(monkeypatch: pytest.MonkeyPatch, taken: list[str]) -> None:
    for name in STEP_NAMES:
        real = getattr(h2_stream_steps, name)

        def counted(machine, real=real, name=name):  # noqa: ANN001, ANN202
            result = real(machine)
            if result:
                taken.append(name)
            return result
        monkeypatch.setattr(h2_stream_steps, name, counted)


def _both(monkeypatch: pytest.MonkeyPatch, answers: list[bytes], **kw: bool) -> tuple:
    results: list = []

    @on_uvloop
    async def run() -> None:
        taken: list[str] = []
        with monkeypatch.context() as m:
            _counting(m, taken)
            results.append(await _play(answers, **kw))
        with monkeypatch.context() as m:
            _old_way(m)
            results.append(await _play(answers, **kw))
        results.append(taken)

    run()
    return tuple(results)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_hostile_destination_gets_what_h2_alone_gives(
        monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    fast, slow, taken = _both(monkeypatch, SCENARIOS[scenario])
    assert fast == slow, (fast, slow)
    assert "sent_request" in taken, "the direct open was not taken: nothing compared"


def test_the_exchange_carries_both_directions_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, taken = _both(monkeypatch, SCENARIOS["exchange"])
    assert fast == slow
    stream = next(o for o in fast if o[0] == S)
    assert stream[1] == [(":status", "200")]
    assert stream[6] == hashlib.sha256(DOWN).hexdigest() and stream[7] == len(DOWN)
    peer = next(o for o in fast if o[0] == "peer received")[1]
    assert peer == {1: hashlib.sha256(UP).hexdigest(), S: hashlib.sha256(UP).hexdigest()}
    h2_state = next(o for o in fast if o[0] == "h2")[1]
    assert h2_state[3] == {}, "the closed stream was not forgotten"
    # stream 3's whole life took the direct steps (stream 1's open was h2's: the
    # connection's first HEADERS moves it out of IDLE)
    assert taken.count("sent_request") == 1
    assert sorted(set(taken)) == ["received_end_stream", "received_response",
                                  "sent_end_stream", "sent_request"]


def test_exhausted_stream_ids_raise_as_h2_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, _taken = _both(monkeypatch, [], exhausted=True)
    assert fast == slow
    assert ("open raised", "NoAvailableStreamIDError", "Exhausted allowed stream IDs") \
        in fast


def test_the_peers_stream_limit_refuses_the_open_as_h2_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, _taken = _both(monkeypatch, SCENARIOS["stream-limit"])
    assert fast == slow
    assert any(o[:2] == ("open raised", "TooManyStreamsError") for o in fast)


@pytest.mark.parametrize("kind", [RST_STREAM, GOAWAY])
def test_a_refusal_kind_is_named(kind: int) -> None:  # the helpers read what they must
    raw = rst(1) if kind == RST_STREAM else goaway(1, 2)
    assert _refusals(raw) == ([("RST_STREAM", 1, 8)] if kind == RST_STREAM
                              else [("GOAWAY", 1, 2)])


def test_hpack_is_not_needed_by_the_open() -> None:
    # the source's block decodes to the CONNECT hpack would read: what the peer sees
    fields = hpack.Decoder().decode(BLOCK)
    assert fields[:2] == [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]

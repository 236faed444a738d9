"""A sleeping cross-node flow's h2 stream state, dropped and made again
(StreamTransport.shelve, ProxyH2Connection.shelve/unshelve; tcp/half_sleep.py).

The harness is test_half_sleep.py's: both nodes' tunnel ends over mutual TLS on
loopback, both relays in one RelayNaps.  Three kinds of check, each of which fails if
the restore is wrong:

- exactness: a stream shelved across SETTINGS changes both ways (INITIAL_WINDOW_SIZE,
  MAX_FRAME_SIZE) comes back attribute for attribute as h2 holds a stream that never
  slept (a control flow on the same connection, never offered to the naps), and the
  flow then carries more than the new window each way, SHA-256 intact;
- the stream limits: shelved streams count as open at both ends (the client refuses to
  open past the peer's SETTINGS_MAX_CONCURRENT_STREAMS, the server refuses a hostile
  client's stream past its own), as awake ones do;
- differential: a hostile peer node's frames on an asleep stream (RST_STREAM, PRIORITY
  of each kind, trailers, a second HEADERS, CONTINUATION without HEADERS, END_STREAM
  empty and padded, a zero or overflowing WINDOW_UPDATE, PUSH_PROMISE, an error GOAWAY
  then the application's bytes) and local ends (a FIN, an abort) give the same
  outcome with the stream shelved as with shelving turned off: what each application
  reads, both relays' ends, h2's state of the stream and connection at both nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from typing import Any

import h2.exceptions
import h2.settings
import pytest
import uvloop

from nodeproxy.codec import h2_frames as frames
from nodeproxy.tcp import half_sleep
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tunnel import session as session_module
from nodeproxy.tunnel.header_block import literal
from nodeproxy.tunnel.session import StreamTransport
from tests.unit.test_half_sleep import (
    Ends,
    Mesh,
    exchange,
    on_uvloop,
    payload,
    quick,  # noqa: F401  (the fixture: a short quiet wait)
    read_all,
    tcp_pair,
    until,
)

HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, GOAWAY, CONTINUATION = 0x5, 0x7, 0x9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
TRAILER = b"\x00\x03x-t\x01v"  # "x-t: v", a literal without indexing: no table change
SETTING = h2.settings.SettingCodes


def shelved(ends: Ends) -> bool:
    """Both ends' h2 stream state dropped."""
    return (ends.source_stream.stream_id not in ends.source_stream.session.conn.streams
            and ends.destination_stream.stream_id
            not in ends.destination_stream.session.conn.streams)


def h2_state(stream: StreamTransport) -> dict[str, Any] | None:
    """h2's state of the stream, every attribute (its state machine's and window
    manager's too), or None if h2 holds none."""
    conn = stream.session.conn
    h2_stream = conn.streams.get(stream.stream_id)
    if h2_stream is None and stream._h2_shelf is not session_module._AWAKE:
        h2_stream = conn._twin(stream.stream_id, stream._h2_shelf)  # as it comes back
    if h2_stream is None:
        return None
    out: dict[str, Any] = {}
    for name, value in vars(h2_stream).items():
        if name == "config":
            out[name] = value is stream.session.conn.config
        elif hasattr(value, "__dict__"):
            out[name] = {k: (type(v), v) for k, v in vars(value).items()}
        else:
            out[name] = (type(value), value)
    return out


def without_id(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    state = dict(state, stream_id=None, _authority=None)
    state["state_machine"] = dict(state["state_machine"], stream_id=None)
    return state


@on_uvloop
async def test_a_shelved_stream_comes_back_as_h2_holds_one_that_never_slept():
    mesh = Mesh()
    await mesh.start()
    offer = mesh.naps.offer
    mesh.naps.offer = lambda relay: None  # type: ignore[method-assign]
    control = await mesh.flow()  # never offered to the naps: awake throughout
    mesh.naps.offer = offer  # type: ignore[method-assign]
    flow = await mesh.flow()
    await until(lambda: mesh.asleep(flow) and shelved(flow))
    assert not mesh.asleep(control)
    assert mesh.client.conn.shelved == 1 and mesh.server.conn.shelved == 1
    before = [without_id(h2_state(control.source_stream)),
              without_id(h2_state(control.destination_stream))]
    # Both nodes change their settings while the flow sleeps: the destination's reach
    # the source as remote settings (its streams' send windows, frame size), and take
    # effect at the destination once acknowledged (its streams' receive windows).
    for session in (mesh.server, mesh.client):
        session.conn.update_settings({SETTING.INITIAL_WINDOW_SIZE: 2_000_003,
                                      SETTING.MAX_FRAME_SIZE: 32_768})
        session.flush()
    await until(lambda: without_id(h2_state(control.source_stream)) != before[0]
                and without_id(h2_state(control.destination_stream)) != before[1])
    await asyncio.sleep(0.1)  # both acknowledgements read
    assert mesh.asleep(flow) and shelved(flow)
    # Wake it from the client application: h2's state is made again at both ends.
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(flow.client_app, b"w")
    assert await read_all(flow.server_app, 1) == b"w"
    assert not shelved(flow)
    assert mesh.client.conn.shelved == 0 and mesh.server.conn.shelved == 0
    assert without_id(h2_state(flow.source_stream)) == \
        without_id(h2_state(control.source_stream))
    assert without_id(h2_state(flow.destination_stream)) == \
        without_id(h2_state(control.destination_stream))
    assert flow.source_stream.send_window == control.source_stream.send_window - 1
    # More than the new stream window each way, intact.
    await exchange(flow, 2_500_007, 1_700_001, b"after settings")
    await exchange(control, 10, 10, b"control")


async def _limited(mesh: Mesh, limit: int, shelve: bool = True) -> list[Ends]:
    mesh.server.conn.update_settings({SETTING.MAX_CONCURRENT_STREAMS: limit})
    mesh.server.flush()
    await until(lambda: mesh.client.conn.remote_settings.max_concurrent_streams == limit)
    flows = [await mesh.flow() for _ in range(limit)]
    await until(lambda: all(mesh.asleep(f) and shelved(f) == shelve for f in flows))
    return flows


@on_uvloop
async def test_shelved_streams_count_against_the_peers_stream_limit_when_opening():
    mesh = Mesh()
    await mesh.start()
    await _limited(mesh, 3)
    assert mesh.client.conn.open_outbound_streams == 3
    assert mesh.server.conn.open_inbound_streams == 3
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        mesh.client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        mesh.client.open_encoded_stream(
            literal(2, "CONNECT") + literal(1, "10.0.0.1:80"), b"10.0.0.1:80")



def _never(stream: Any) -> None:
    """The half-sleep's offer to shelve, withheld (its one caller of
    StreamTransport.shelve; the compiled build's StreamTransport takes no patch)."""


async def _past_limit(shelve: bool) -> tuple[Any, ...]:
    with pytest.MonkeyPatch.context() as mp:
        if not shelve:
            mp.setattr(half_sleep, "_shelve", _never)
        mesh = Mesh()
        await mesh.start()
        flows = await _limited(mesh, 2, shelve)
        # The source node ignores the limit: a request on a new stream (a block that
        # leaves HPACK's table alone, as the tunnel's own are: the fast path is tried).
        block = literal(2, "CONNECT") + literal(1, "10.0.0.9:80")
        sid = mesh.client.conn.highest_outbound_stream_id + 2
        mesh.server.data_received(frames.header(len(block), HEADERS, END_HEADERS, sid)
                                  + block)
        await asyncio.sleep(0.2)
        apps = await asyncio.gather(*(_app_outcome(s) for f in flows
                                      for s in (f.client_app, f.server_app)))
        return (mesh.served.empty(), sid in mesh.server.streams, mesh.server.conn.terminated,
                mesh.server.closed, mesh.client.goaway, apps)


def test_a_hostile_client_past_the_servers_stream_limit_is_refused_with_streams_shelved():
    """h2 answers a stream past the limit with a connection error (GOAWAY): with the
    open streams shelved as with them awake, and the request never served."""
    async def both() -> tuple[Any, Any]:
        return await _past_limit(False), await _past_limit(True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kept, dropped = runner.run(asyncio.wait_for(both(), 60))
    assert dropped == kept
    assert dropped[0] and not dropped[1]  # never reached the listener


# -- differential: the same frames with and without shelving -------------------------


def _at(mesh: Mesh, ends: Ends, node: str) -> tuple[Any, StreamTransport]:
    """(the session a frame is injected into, its stream) for a peer-node frame
    arriving at `node`."""
    if node == "source":
        return mesh.client, ends.source_stream
    return mesh.server, ends.destination_stream


async def _app_outcome(sock: socket.socket) -> str:
    """What the application reads in 1 s: its bytes' digest, then 'eof', 'reset' or
    'open'."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    end = "open"
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 1.0)
        except TimeoutError:
            break
        except ConnectionResetError:
            end = "reset"
            break
        if not chunk:
            end = "eof"
            break
        got += chunk
    return f"{len(got)}:{hashlib.sha256(got).hexdigest()[:12]}:{end}"


def _stream_view(stream: StreamTransport) -> tuple[Any, ...]:
    error = stream._error
    return (stream._finished, stream._remote_ended, stream._local_ended,
            type(error).__name__, getattr(error, "code", None), stream.send_window,
            stream.receive_window)


def _conn_view(session: Any, stream_id: int) -> tuple[Any, ...]:
    conn = session.conn
    return (conn.state_machine.state, conn._closed_streams.get(stream_id),
            conn.open_outbound_streams, conn.open_inbound_streams, session.closed,
            session.goaway)


async def _outcome(shelve: bool, node: str, inject: Any) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        if not shelve:
            mp.setattr(half_sleep, "_shelve", _never)
        return await _outcome_of(shelve, node, inject)


async def _outcome_of(shelve: bool, node: str, inject: Any) -> dict[str, Any]:
    mesh = Mesh()
    await mesh.start()
    flow, other = await mesh.flow(), await mesh.flow()
    await until(lambda: mesh.asleep(flow) and mesh.asleep(other))
    assert shelved(flow) == shelve
    session, stream = _at(mesh, flow, node)
    sid = stream.stream_id
    await inject(mesh, flow, session, sid)
    apps = await asyncio.gather(_app_outcome(flow.client_app), _app_outcome(flow.server_app))
    out = {
        "apps": apps,
        "relays": (flow.source.finished, flow.destination.finished),
        "streams": (_stream_view(flow.source_stream), _stream_view(flow.destination_stream)),
        "h2": (h2_state(flow.source_stream), h2_state(flow.destination_stream)),
        "conns": (_conn_view(mesh.client, sid), _conn_view(mesh.server, sid)),
    }
    # The other flow, asleep throughout, still carries both ways unless the connection
    # is gone.
    if not any(s.closed or s.goaway or s._halted for s in (mesh.client, mesh.server)):
        await exchange(other, 30_011, 20_011, b"other")
        out["other"] = "intact"
    return out


def _frame(frame_type: int, flags: int, sid: int, body: bytes) -> bytes:
    return frames.header(len(body), frame_type, flags, sid) + body


async def _send(mesh: Mesh, flow: Ends, session: Any, data: bytes) -> None:
    session.data_received(data)
    await asyncio.sleep(0.1)


INJECTIONS: dict[str, Any] = {
    "rst_stream": lambda sid: _frame(RST_STREAM, 0, sid, struct.pack("!L", 0x8)),
    "priority": lambda sid: _frame(PRIORITY, 0, sid, struct.pack("!LB", 0, 15)),
    "priority_on_itself": lambda sid: _frame(PRIORITY, 0, sid, struct.pack("!LB", sid, 15)),
    "priority_exclusive": lambda sid: _frame(PRIORITY, 0, sid,
                                             struct.pack("!LB", 0x80000000 | 3, 200)),
    "trailers": lambda sid: _frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILER),
    "headers_without_end_stream": lambda sid: _frame(HEADERS, END_HEADERS, sid, TRAILER),
    "headers_then_continuation": lambda sid: (_frame(HEADERS, END_STREAM, sid, TRAILER[:3])
                                              + _frame(CONTINUATION, END_HEADERS, sid,
                                                       TRAILER[3:])),
    "continuation_alone": lambda sid: _frame(CONTINUATION, END_HEADERS, sid, TRAILER),
    "end_stream_empty": lambda sid: frames.empty_data(sid, True),
    "end_stream_with_data": lambda sid: _frame(0, END_STREAM, sid, b"last bytes"),
    "end_stream_padded": lambda sid: _frame(0, END_STREAM | PADDED, sid,
                                            b"\x04tail" + bytes(4)),
    "window_update_zero": lambda sid: _frame(0x8, 0, sid, struct.pack("!L", 0)),
    "window_update_overflow": lambda sid: frames.window_update(sid, 2**31 - 1),
    "push_promise": lambda sid: _frame(PUSH_PROMISE, END_HEADERS, sid,
                                       struct.pack("!L", 2) + TRAILER),
    "settings_then_rst": lambda sid: (
        _frame(SETTINGS, 0, 0, struct.pack("!HL", 0x4, 123_457))
        + _frame(RST_STREAM, 0, sid, struct.pack("!L", 0x2))),
}


@pytest.mark.parametrize("node", ["source", "destination"])
@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_a_peer_nodes_frame_on_an_asleep_stream_has_the_same_outcome_shelved_or_not(
        name: str, node: str) -> None:
    async def inject(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
        await _send(mesh, flow, session, INJECTIONS[name](sid))

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        kept = await _outcome(False, node, inject)
        dropped = await _outcome(True, node, inject)
        return kept, dropped

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kept, dropped = runner.run(asyncio.wait_for(both(), 60))
    assert dropped == kept


async def _error_goaway_then_bytes(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    session.data_received(_frame(GOAWAY, 0, 0, struct.pack("!LL", sid, 0x2)))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(flow.client_app, payload(b"after goaway", 50_000))
    await asyncio.sleep(0.2)


async def _client_fin(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(flow.client_app, payload(b"before fin", 70_001))
    flow.client_app.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.2)


async def _abort_source(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    flow.source.abort()
    await asyncio.sleep(0.1)


async def _close_destination(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    flow.destination.close()
    await asyncio.sleep(0.1)


async def _stream_reset_by_session(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    """The session resets an asleep stream on its own (as _data_begin and the window
    checks do), the stream's end then reported to its asleep relay."""
    session.reset(sid, 0x8)
    session.streams[sid]._finish(ConnectionResetError("reset here"))
    await asyncio.sleep(0.1)


async def _connection_lost(mesh: Mesh, flow: Ends, session: Any, sid: int) -> None:
    session.transport.abort()
    await asyncio.sleep(0.1)


LOCAL = {
    "error_goaway_then_bytes": _error_goaway_then_bytes,
    "client_fin": _client_fin,
    "abort_source": _abort_source,
    "close_destination": _close_destination,
    "stream_reset_by_session": _stream_reset_by_session,
    "connection_lost": _connection_lost,
}


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_an_asleep_streams_end_or_a_goaway_has_the_same_outcome_shelved_or_not(
        name: str) -> None:
    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        kept = await _outcome(False, "source", LOCAL[name])
        dropped = await _outcome(True, "source", LOCAL[name])
        return kept, dropped

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kept, dropped = runner.run(asyncio.wait_for(both(), 60))
    assert dropped == kept


def test_the_twin_is_refused_when_the_stream_is_not_what_it_would_be_made() -> None:
    """A stream h2 holds in any other shape (a window counter h2 moved, a trailer seen,
    a content length) is not shelved: its flow sleeps with h2's state kept."""
    async def run() -> None:
        mesh = Mesh()
        await mesh.start()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(half_sleep, "_shelve", _never)
            flows = [await mesh.flow() for _ in range(3)]
            await until(lambda: all(mesh.asleep(f) for f in flows))
        conn = mesh.client.conn
        conn.streams[flows[0].source_stream.stream_id].outbound_flow_control_window += 1
        conn.streams[flows[1].source_stream.stream_id]._expected_content_length = 5
        conn.streams[flows[2].source_stream.stream_id].state_machine.trailers_received = True
        for f in flows:
            assert not f.source_stream.shelve()
            assert f.source_stream._h2_shelf is session_module._AWAKE
            assert f.destination_stream.shelve()  # the other end is as h2 makes it
        assert conn.shelved == 0 and mesh.server.conn.shelved == 3
        for i, f in enumerate(flows):
            await exchange(f, 1_000 + i, 2_000 + i, b"kept %d" % i)
        assert mesh.server.conn.shelved == 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(run(), 60))


@on_uvloop
async def test_the_tunnels_own_encoded_open_is_shelved_and_restored_with_its_authority():
    """The daemon's client opens with a pre-encoded block (open_encoded_stream), whose
    authority h2 keeps on the stream: shelved and made again with the same bytes."""
    mesh = Mesh()
    await mesh.start()
    loop = asyncio.get_running_loop()
    ours, app = tcp_pair()
    _, down = await loop.create_connection(lambda: Side("downstream"), sock=ours)
    block = literal(2, "CONNECT") + literal(1, "10.0.0.7:8080")
    stream = mesh.client.open_encoded_stream(block, b"10.0.0.7:8080")
    await asyncio.wait_for(stream.response, 5)
    up = Side("upstream", start_paused=True)
    stream.set_protocol(up)
    ends = Ends()
    ends.client_app, ends.source_stream = app, stream
    ends.source = Relay(down, up, ends.counter("source"), lambda _r: None)
    ends.source.start()
    mesh.naps.offer(ends.source)
    s_up, s_down, s_stream, ends.server_app = await mesh.served.get()
    ends.destination_stream = s_stream
    ends.destination = Relay(s_down, s_up, ends.counter("destination"), lambda _r: None)
    ends.destination.start()
    mesh.naps.offer(ends.destination)
    before = h2_state(stream)
    assert before is not None and before["_authority"] == (bytes, b"10.0.0.7:8080")
    await until(lambda: mesh.asleep(ends) and shelved(ends))
    assert stream._h2_shelf == b"10.0.0.7:8080"
    await exchange(ends, 4_194_305, 99, b"encoded")
    assert h2_state(stream) == before


@on_uvloop
async def test_a_shelved_stream_that_ends_leaves_no_count_behind():
    """However a shelved stream ends (here the session's own end of it, no frame sent),
    h2 gets it back first: the connection's count of shelved streams, which h2's stream
    limits add, does not keep it."""
    mesh = Mesh()
    await mesh.start()
    flows = [await mesh.flow() for _ in range(3)]
    await until(lambda: all(mesh.asleep(f) and shelved(f) for f in flows))
    assert mesh.client.conn.shelved == 3 and mesh.client.conn.open_outbound_streams == 3
    victim = flows[0].source_stream
    victim._finish(ConnectionResetError("ended here"))
    assert victim._h2_shelf is session_module._AWAKE
    assert mesh.client.conn.shelved == 2
    assert victim.stream_id in mesh.client.conn.streams  # h2's, as if it never slept
    await until(lambda: flows[0].source.finished)
    for f in flows[1:]:
        await exchange(f, 3_000, 4_000, b"left")

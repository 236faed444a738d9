"""HTTP/2 abuse budgets (nodeproxy/codec/h2_guard.py) on the proxy's HTTP/2 servers.

H2Server (the L7 front end) and the HBONE server's H2Session are driven by the `h2`
library as a client over an in-memory transport: every budget trips exactly one frame
past its threshold (GOAWAY ENHANCE_YOUR_CALM, a last stream id no higher than the last
stream a handler took, the connection closed, the reason reported), and what a browser
or a gRPC client does below the thresholds is left alone.  A client's reset cancels the
handler, and the cancel reaches an upstream HTTP/2 server; an upstream pool opens a
connection per 100 streams in flight, not per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import uvloop
from hyperframe.frame import HeadersFrame, RstStreamFrame

from nodeproxy.codec import h2 as h2_module
from nodeproxy.codec import h2_guard
from nodeproxy.codec.h2 import H2Client, H2Server
from nodeproxy.codec.h2_guard import FrameBucket, FrameGuard
from nodeproxy.codec.message import Body, Exchange, ReplayableBody, RequestHead, ResponseHead
from nodeproxy.config.model import Http2Limits
from nodeproxy.http.pool import EndpointPool
from nodeproxy.tunnel import session as session_module
from nodeproxy.tunnel.session import H2Session, StreamTransport

ErrorCodes = h2.errors.ErrorCodes
CALM = ErrorCodes.ENHANCE_YOUR_CALM
HEADERS = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a.test")]


@pytest.fixture(autouse=True)
def quick_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """The close after an ENHANCE_YOUR_CALM GOAWAY comes at once here."""
    monkeypatch.setattr(h2_module, "ABUSE_CLOSE_DELAY", 0.01)
    monkeypatch.setattr(session_module, "ABUSE_CLOSE_DELAY", 0.01)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), 30)
    uvloop.run(bounded())


class MemoryTransport(asyncio.Transport):
    """What the server writes is kept for the client; close() ends the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()
        self.closing = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("203.0.113.9", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Peer:
    """An `h2` client on one side of a MemoryTransport, the server on the other."""

    def __init__(self, server: H2Server | H2Session, transport: MemoryTransport):
        self.server = server
        self.transport = transport
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.send()

    def send(self) -> None:
        data = self.conn.data_to_send()
        for i in range(0, len(data), 16 * 1024):  # as a socket delivers it
            if not self.transport.closing:
                self.server.data_received(data[i:i + 16 * 1024])
        self.receive()

    def receive(self) -> None:
        data = self.transport.take()
        if data:
            try:
                self.events += self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                pass
            self.conn.data_to_send()  # our ACKs: dropped unless send() follows

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        self.receive()
        return next((e for e in self.events
                     if isinstance(e, h2.events.ConnectionTerminated)), None)

    def open(self, *, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, HEADERS, end_stream=end)
        return sid


def guarded_server(handler: Callable[[Exchange], Awaitable[None]], limits: Http2Limits,
                   clock: Clock, abuses: list[str]) -> tuple[H2Server, Peer]:
    server = H2Server(handler, limits=limits, on_abuse=abuses.append)
    # The budgets' clock is the test's, so a rate is judged exactly.
    server.guard = server.conn.guard = FrameGuard(limits, clock=clock,
                                                  is_open=server._stream_open)
    transport = MemoryTransport()
    server.attach(transport)
    return server, Peer(server, transport)


async def hold(exchange: Exchange) -> None:
    await asyncio.Event().wait()


async def ok(exchange: Exchange) -> None:
    await exchange.respond(ResponseHead(200, [("content-length", "2")]))
    await exchange.send(b"ok")
    await exchange.finish()


async def assert_calm(peer: Peer, server: H2Server | H2Session, abuses: list[str], reason: str,
                *, last_stream_id: int) -> None:
    goaway = peer.goaway()
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code == CALM
    assert goaway.last_stream_id == last_stream_id
    assert abuses == [reason]
    await asyncio.sleep(0.05)  # the delayed close
    assert peer.transport.closing


def assert_untouched(peer: Peer, abuses: list[str]) -> None:
    assert peer.goaway() is None and abuses == [] and not peer.transport.closing


# --- premature resets (rapid reset) ------------------------------------------------------


def test_rapid_reset_trips_one_reset_past_half_of_the_minimum() -> None:
    async def main() -> None:
        limits = Http2Limits(premature_reset_min_streams=20)
        abuses: list[str] = []
        started: list[int] = []

        async def record(exchange: Exchange) -> None:
            started.append(1)
            await hold(exchange)

        server, peer = guarded_server(record, limits, Clock(), abuses)
        sids = []
        for _ in range(10):  # 10 of 20: not more than half
            sid = peer.open()
            peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
            sids.append(sid)
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        assert server.active_streams == 0 and started == []  # each cancelled before it ran
        sid = peer.open()
        peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        # Judged as the RST_STREAM frame came: its stream was never handed to a handler.
        await assert_calm(peer, server, abuses, h2_guard.PREMATURE_RESETS,
                          last_stream_id=sid - 2)
    run(main)


def test_rapid_reset_burst_names_the_last_stream_taken() -> None:
    """10,000 pairs in one burst: the GOAWAY comes at the 251st reset of the default
    budget, inside the first read (16 KiB here): h2 parses nothing after that frame, no
    handler ever started, and the GOAWAY says so (last stream id 0)."""
    async def main() -> None:
        abuses: list[str] = []
        taken: list[int] = []

        async def record(exchange: Exchange) -> None:
            taken.append(1)
            await hold(exchange)

        server, peer = guarded_server(record, Http2Limits(), Clock(), abuses)
        for _ in range(10_000):
            sid = peer.open()
            peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.PREMATURE_RESETS, last_stream_id=0)
        assert server.guard.premature_resets == 251 and server.requests == 0
        await asyncio.sleep(0.01)
        assert taken == [] and server.active_streams == 0
    run(main)


def test_late_resets_and_a_few_early_ones_are_not_premature_abuse() -> None:
    """A browser-like client: most streams answered, some cancelled before an answer
    (navigation), some reset after a slow answer began: no GOAWAY."""
    async def main() -> None:
        limits = Http2Limits(premature_reset_min_streams=20)
        clock = Clock()
        abuses: list[str] = []

        async def slow_for_odd(exchange: Exchange) -> None:
            if exchange.request.path == "/slow":
                await exchange.respond(ResponseHead(200))
                await hold(exchange)
            await ok(exchange)

        server, peer = guarded_server(slow_for_odd, limits, clock, abuses)
        for round_ in range(30):
            sid = peer.open()
            peer.send()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if round_ % 3 == 0:  # an answer started long ago: a late reset
                sid = peer.conn.get_next_available_stream_id()
                peer.conn.send_headers(sid, [(":method", "GET"), (":path", "/slow"),
                                             (":scheme", "http"), (":authority", "a")],
                                       end_stream=True)
                peer.send()
                await asyncio.sleep(0.01)
                clock.now += 2
                peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
                peer.send()
            if round_ % 5 == 0:  # cancelled before any answer: premature
                sid = peer.open()
                peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
                peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        assert server.guard.premature_resets == 6
    run(main)


def test_malformed_requests_count_against_the_premature_budget() -> None:
    """Requests refused as malformed (here a :scheme that is not http/https) take no
    handler; they count as early ends, so they can neither flood the connection for free
    nor dilute the budget of a rapid reset mixed in with them."""
    async def main() -> None:
        limits = Http2Limits(premature_reset_min_streams=20)
        abuses: list[str] = []
        server, peer = guarded_server(hold, limits, Clock(), abuses)
        bad = [(":method", "GET"), (":path", "/"), (":scheme", "gopher"),
               (":authority", "a.test")]
        for _ in range(5):  # 5 malformed + 5 reset: 10 of 20
            peer.conn.send_headers(peer.conn.get_next_available_stream_id(), bad,
                                   end_stream=True)
            sid = peer.open()
            peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        assert server.guard.premature_resets == 10
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, bad, end_stream=True)
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.MALFORMED_STREAMS,
                          last_stream_id=sid - 2)
    run(main)


# --- stream rate --------------------------------------------------------------------------


def test_stream_rate_trips_on_the_first_stream_past_the_bucket() -> None:
    async def main() -> None:
        limits = Http2Limits(max_streams_per_second=50)
        clock = Clock()
        abuses: list[str] = []
        server, peer = guarded_server(ok, limits, clock, abuses)
        for _ in range(50):
            peer.open()
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        clock.now += 0.1  # 5 more
        for _ in range(5):
            peer.open()
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        last = peer.open()
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.STREAM_RATE, last_stream_id=last - 2)
    run(main)


# --- control frames -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings", "stray_reset"])
def test_control_flood_trips_past_the_burst(kind: str) -> None:
    async def main() -> None:
        limits = Http2Limits(control_frame_burst=30, max_control_frames_per_second=10)
        clock = Clock()
        abuses: list[str] = []
        server, peer = guarded_server(ok, limits, clock, abuses)
        sid = peer.open()  # answered: a stream to name in the GOAWAY
        peer.send()
        await asyncio.sleep(0.01)
        # The client's SETTINGS (its preface) and our SETTINGS' ACK took two tokens.
        spent = server.guard._control_bucket.capacity - server.guard._control_bucket.tokens

        def one(i: int) -> None:
            if kind == "ping":
                peer.conn.ping(i.to_bytes(8, "big"))
            elif kind == "settings":
                peer.conn.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
            else:  # RST_STREAM of a stream long closed: only h2's memory of it
                frame = RstStreamFrame(sid)
                frame.error_code = 8
                peer.conn._data_to_send += frame.serialize()

        for i in range(30 - int(spent)):
            one(i)
        peer.send()
        assert_untouched(peer, abuses)
        if kind == "ping":
            acks = [e for e in peer.events if isinstance(e, h2.events.PingAckReceived)]
            assert len(acks) == 30 - int(spent)
        clock.now += 0.1  # one more token
        one(1000)
        peer.send()
        assert_untouched(peer, abuses)
        one(1001)
        peer.send()
        reason = {"ping": h2_guard.PING_FLOOD, "settings": h2_guard.SETTINGS_FLOOD,
                  "stray_reset": h2_guard.CONTROL_FLOOD}[kind]
        await assert_calm(peer, server, abuses, reason, last_stream_id=sid)
    run(main)


def test_pings_answered_while_the_client_reads_are_fine_and_unread_ones_are_not() -> None:
    async def main() -> None:
        limits = Http2Limits(max_outbound_control_frames=5)
        abuses: list[str] = []
        server, peer = guarded_server(ok, limits, Clock(), abuses)
        server.pause_writing()  # the client stopped reading: answers queue up
        for i in range(5):
            peer.conn.ping(i.to_bytes(8, "big"))
        peer.send()
        assert_untouched(peer, abuses)
        server.resume_writing()  # it read them: the count starts again
        for i in range(5):
            peer.conn.ping(i.to_bytes(8, "big"))
        peer.send()
        assert_untouched(peer, abuses)
        server.pause_writing()
        for i in range(6):
            peer.conn.ping(i.to_bytes(8, "big"))
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.UNREAD_CONTROL, last_stream_id=0)
    run(main)


def test_priority_frames_past_ten_plus_the_per_stream_allowance() -> None:
    async def main() -> None:
        limits = Http2Limits(max_priority_frames_per_stream=3)
        abuses: list[str] = []
        server, peer = guarded_server(ok, limits, Clock(), abuses)
        sid = peer.open()
        for i in range(13):  # 10 + 3 for the one stream
            peer.conn.prioritize(101 + 2 * i, weight=16)
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        peer.conn.prioritize(201, weight=16)
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.PRIORITY_FLOOD, last_stream_id=sid)
    run(main)


def test_window_updates_past_what_the_data_sent_explains() -> None:
    async def main() -> None:
        limits = Http2Limits(max_window_updates_per_data_frame=4)
        abuses: list[str] = []
        server, peer = guarded_server(ok, limits, Clock(), abuses)
        sid = peer.open()  # its answer is one DATA frame
        peer.send()
        await asyncio.sleep(0.01)
        assert server.guard.data_frames_sent == 1
        for _ in range(10 + 2 + 4):
            peer.conn.increment_flow_control_window(1)
        peer.send()
        assert_untouched(peer, abuses)
        peer.conn.increment_flow_control_window(1)
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.WINDOW_UPDATE_FLOOD, last_stream_id=sid)
    run(main)


def test_consecutive_empty_data_frames() -> None:
    async def main() -> None:
        abuses: list[str] = []
        server, peer = guarded_server(hold, Http2Limits(), Clock(), abuses)
        sid = peer.open(end=False)
        peer.conn.send_data(sid, b"")
        peer.conn.send_data(sid, b"x")
        peer.conn.send_data(sid, b"")  # one at a time is allowed
        peer.send()
        await asyncio.sleep(0.01)
        assert_untouched(peer, abuses)
        peer.conn.send_data(sid, b"")
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.EMPTY_FRAMES, last_stream_id=sid)
    run(main)


def test_abuse_cancels_the_open_handlers() -> None:
    async def main() -> None:
        limits = Http2Limits(max_consecutive_empty_frames=0)
        abuses: list[str] = []
        cancelled: list[int] = []

        async def waiting(exchange: Exchange) -> None:
            try:
                await hold(exchange)
            except asyncio.CancelledError:
                cancelled.append(1)
                raise

        server, peer = guarded_server(waiting, limits, Clock(), abuses)
        for _ in range(3):
            peer.open()
        peer.send()
        await asyncio.sleep(0.01)
        sid = peer.open(end=False)
        peer.conn.send_data(sid, b"")  # in the same read as its HEADERS: never started
        peer.send()
        await assert_calm(peer, server, abuses, h2_guard.EMPTY_FRAMES, last_stream_id=sid - 2)
        await asyncio.sleep(0.01)
        assert cancelled == [1, 1, 1] and server.active_streams == 0
    run(main)


def test_a_grpc_like_client_stays_within_every_budget() -> None:
    """Keepalive pings, a SETTINGS change, window updates for the data it reads, some
    PRIORITY frames, many streams: nothing trips."""
    async def main() -> None:
        clock = Clock()
        abuses: list[str] = []
        server, peer = guarded_server(ok, Http2Limits(), clock, abuses)
        for second in range(20):
            clock.now += 1
            peer.conn.ping(second.to_bytes(8, "big"))
            for _ in range(50):
                sid = peer.open()
                peer.conn.prioritize(sid, weight=32)
            peer.send()
            await asyncio.sleep(0.01)
            peer.receive()
            for event in peer.events:
                if isinstance(event, h2.events.DataReceived):
                    peer.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
            peer.events = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
            if second == 5:
                peer.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
            peer.send()
        assert_untouched(peer, abuses)
        assert server.requests == 1000
    run(main)


# --- the pure parts ----------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = FrameBucket(rate=10, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_premature_reset_rule_past_the_minimum_is_more_than_half() -> None:
    guard = FrameGuard(Http2Limits(premature_reset_min_streams=10), clock=lambda: 0.0)
    for _ in range(20):
        assert guard.stream_closed(premature=False) is None
    for _ in range(20):  # 20 of 40: half, not more
        assert guard.stream_closed(premature=True) is None
    abuse = guard.stream_closed(premature=True)
    assert abuse is not None and abuse.reason == h2_guard.PREMATURE_RESETS
    assert abuse.error_code == CALM


def test_streams_ended_without_the_server_saying_so_are_forgotten() -> None:
    """Streams reset before a handler (by h2, or by a check in front of the handler) do
    not pile up in the guard: it keeps only streams h2 still has open."""
    open_streams = {1, 3}
    guard = FrameGuard(Http2Limits(max_streams_per_second=1_000_000), clock=lambda: 0.0,
                       is_open=open_streams.__contains__)
    for sid in range(1, 2 * 10_000, 2):
        guard.frame(HeadersFrame(sid))
    assert len(guard._started) <= h2_guard.TRACKED_STREAMS
    assert 1 in guard._started and 3 in guard._started  # still open: still judged
    frame = RstStreamFrame(3)
    guard.frame(frame)
    assert guard.premature_resets == 1


def test_is_premature() -> None:
    now = [10.0]
    guard = FrameGuard(Http2Limits(premature_reset_lifetime_seconds=1), clock=lambda: now[0])
    assert guard.is_premature(started=9.5, responded=True)
    assert not guard.is_premature(started=8.0, responded=True)
    assert guard.is_premature(started=0.0, responded=False)


def test_penalized_limits_are_a_tenth_of_the_count_budgets() -> None:
    limits = Http2Limits().penalized()
    assert limits.premature_reset_min_streams == 50
    assert limits.max_streams_per_second == 5000 and limits.control_frame_burst == 100
    assert limits.max_control_frames_per_second == 10
    assert Http2Limits(premature_reset_min_streams=2).penalized() \
        .premature_reset_min_streams == 2


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Http2Limits(max_streams_per_second=0)
    assert Http2Limits.model_validate({"prematureResetMinStreams": 100}) \
        .premature_reset_min_streams == 100


# --- the HBONE server ---------------------------------------------------------------------


def test_hbone_server_rapid_reset_of_connect_streams() -> None:
    async def main() -> None:
        limits = Http2Limits(premature_reset_min_streams=20)
        abuses: list[str] = []
        served: list[StreamTransport] = []
        session = H2Session(client_side=False, on_request=lambda s, st: served.append(st),
                            limits=limits, on_abuse=abuses.append)
        transport = MemoryTransport()
        transport.set_protocol(session)
        session.connection_made(transport)
        peer = Peer(session, transport)
        connect = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
        for _ in range(10):
            sid = peer.conn.get_next_available_stream_id()
            peer.conn.send_headers(sid, connect)
            peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        assert_untouched(peer, abuses)
        assert all(stream.is_closing() for stream in served)  # never dialled: see server.py
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, connect)
        peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        goaway = peer.goaway()
        assert goaway is not None and goaway.error_code == CALM
        assert goaway.last_stream_id <= sid
        await asyncio.sleep(0.05)
        assert abuses == [h2_guard.PREMATURE_RESETS] and transport.closing
    run(main)


def test_hbone_server_ping_flood() -> None:
    async def main() -> None:
        limits = Http2Limits(control_frame_burst=20)
        abuses: list[str] = []
        session = H2Session(client_side=False, on_request=lambda s, st: None,
                            limits=limits, on_abuse=abuses.append)
        transport = MemoryTransport()
        transport.set_protocol(session)
        session.connection_made(transport)
        peer = Peer(session, transport)
        for i in range(100):
            peer.conn.ping(i.to_bytes(8, "big"))
        peer.send()
        goaway = peer.goaway()
        assert goaway is not None and goaway.error_code == CALM
        await asyncio.sleep(0.05)
        assert abuses == [h2_guard.PING_FLOOD] and transport.closing
    run(main)


# --- the cancel reaches upstream; pools grow with streams, not requests ----------------------


def test_a_client_reset_resets_the_upstream_stream() -> None:
    """Proxy-shaped: the front H2Server's handler forwards over an H2Client to a backend
    H2Server; the client's RST_STREAM cancels the handler, whose upstream stream gets
    RST_STREAM CANCEL: the backend's handler is cancelled too."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        backend_started = asyncio.Event()
        backend_cancelled = asyncio.Event()

        async def backend(exchange: Exchange) -> None:
            backend_started.set()
            try:
                await hold(exchange)
            except asyncio.CancelledError:
                backend_cancelled.set()
                raise

        listener = await loop.create_server(lambda: H2Server(backend), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        _, upstream = await loop.create_connection(H2Client, "127.0.0.1", port)

        async def front(exchange: Exchange) -> None:
            body = ReplayableBody(exchange.body, 0)
            await upstream.send(RequestHead("GET", "/", "a.test", version="2"), body.reader())

        abuses: list[str] = []
        server, peer = guarded_server(front, Http2Limits(), Clock(), abuses)
        sid = peer.open()
        peer.send()
        await asyncio.wait_for(backend_started.wait(), 5)
        assert upstream.active_streams == 1
        peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        await asyncio.wait_for(backend_cancelled.wait(), 5)
        assert upstream.active_streams == 0 and not upstream.closed
        upstream.close()
        listener.close()
    run(main)


def test_http2_pool_opens_a_connection_per_100_streams_not_per_request() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: H2Server(hold, max_concurrent_streams=1000), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]

        async def connect(protocol: Any) -> object:
            return await loop.create_connection(lambda: protocol, "127.0.0.1", port)

        pool = EndpointPool(connect, http2=True, idle_timeout=60)

        async def one() -> None:
            connection = await pool.acquire()
            await connection.send(RequestHead("GET", "/", "a.test", version="2"),
                                  ReplayableBody(Body.empty(), 0).reader())

        tasks = [loop.create_task(one()) for _ in range(450)]
        while sum(c.active_streams for c in pool._connections) < 450:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        assert pool.opened == 5  # ceil(450 / 100), not 450
        for task in tasks:  # every client cancels: the streams are reset, nothing grows
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(c.active_streams for c in pool._connections) == 0  # type: ignore[attr-defined]
        pool.sweep(loop.time())
        assert pool.size == 1  # one idle HTTP/2 connection is kept
        pool.close()
        listener.close()
    run(main)

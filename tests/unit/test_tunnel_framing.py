"""The tunnel's own DATA / WINDOW_UPDATE framing (tunnel/session.py, codec/h2_frames.py)
against a hostile peer: a server H2Session over a socketpair, the peer a real h2 client
connection for the handshake and HEADERS and raw bytes for what h2 would refuse to send.
Every test checks what the peer (or the stream's reader) sees: the bytes, or the GOAWAY
or RST_STREAM and its code."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import uvloop

from nodeproxy.codec import h2_frames as frames
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.h2_frames import FrameError
from nodeproxy.config.model import Http2Limits
from nodeproxy.tcp.relay import Side
from nodeproxy.tunnel import session
from nodeproxy.tunnel.session import H2Session, StreamTransport

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
TIMEOUT = 10.0


def on_uvloop(test):
    """Run the coroutine test on uvloop (as the daemon does), bounded in time."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(test(*args, **kwargs), 60))
    return run


class Reader(asyncio.Protocol):
    """A stream's reader: keeps what arrived; `echo` writes it back; `paused` never reads
    (withholds the stream's WINDOW_UPDATEs)."""

    def __init__(self, echo: bool = False, paused: bool = False):
        self.echo, self.paused = echo, paused
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> None:
        self.eof.set()
        if self.echo:
            self.transport.write_eof()

    def connection_lost(self, exc) -> None:
        self.lost.set()


class Server:
    def __init__(self, echo: bool = False, paused: bool = False,
                 limits: Http2Limits | None = None):
        self.readers: dict[int, Reader] = {}
        self.echo, self.paused, self.limits = echo, paused, limits
        self.session: H2Session | None = None

    def on_request(self, sess: H2Session, stream) -> None:
        sess.respond(stream, 200)
        reader = self.readers[stream.stream_id] = Reader(self.echo, self.paused)
        stream.set_protocol(reader)

    async def start(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        self.session = H2Session(client_side=False, on_request=self.on_request,
                                 limits=self.limits)
        await loop.create_connection(lambda: self.session, sock=a)
        b.setblocking(False)
        return b


class Peer:
    """The hostile client: h2 for what it does right, raw bytes for the rest."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.received: dict[int, bytearray] = {}
        self.ack = True
        self.ack_streams: set[int] | None = None  # None: every stream

    async def send(self, data: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        data = self.conn.data_to_send() + data
        if data:
            await loop.sock_sendall(self.sock, data)

    async def open(self) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, CONNECT)
        await self.send()
        await self.until(lambda: any(isinstance(e, h2.events.ResponseReceived)
                                     and e.stream_id == sid for e in self.events))
        return sid

    async def pump(self, timeout: float = 0.2) -> bool:
        """Read what the server sent (h2 parses it); False once the server closed."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), timeout)
        except TimeoutError:
            return True
        if not data:
            return False
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.ack and (self.ack_streams is None
                                 or event.stream_id in self.ack_streams):
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
        await self.send()
        return True

    async def until(self, condition, timeout: float = TIMEOUT) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, self.events
            if not await self.pump():
                assert condition(), self.events
                return

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)),
                    None)

    async def closed_with(self, code: h2.errors.ErrorCodes) -> None:
        await self.until(lambda: self.goaway() is not None)
        assert self.goaway().error_code == code, self.goaway()


def data_frame(sid: int, payload: bytes, flags: int = 0) -> bytes:
    return frames.header(len(payload), frames.DATA, flags, sid) + payload


# -- pure parts --------------------------------------------------------------------------

def test_header_round_trip_and_reserved_bit() -> None:
    head = frames.header(0xABCDEF, 7, 0x25, 0x7FFFFFFF)
    assert frames.parse_header(head) == (0xABCDEF, 7, 0x25, 0x7FFFFFFF)
    raw = struct.pack(">HBBBL", 0, 4, frames.WINDOW_UPDATE, 0, 0x80000003)
    assert frames.parse_header(raw)[3] == 3


def test_window_rules() -> None:
    assert frames.consume(10, 10, "stream") == 0
    with pytest.raises(FrameError) as e:
        frames.consume(10, 11, "stream")
    assert e.value.code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert frames.credit(2**31 - 2, 1) == 2**31 - 1
    with pytest.raises(FrameError):
        frames.credit(2**31 - 1, 1)
    assert bytes(frames.unpad(b"\x02abcXY")) == b"abc"
    for bad in (b"", b"\x05abc"):
        with pytest.raises(FrameError):
            frames.unpad(bad)
    with pytest.raises(FrameError) as e:
        frames.window_increment(b"\x00\x00\x01")
    assert e.value.code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


async def echo_stream() -> tuple[Server, H2Session, StreamTransport, Reader]:
    """A client session to an echoing server session, one CONNECT stream open and
    answered, a Reader on what comes back."""
    server = Server(echo=True)
    sock = await server.start()
    client = H2Session(client_side=True)
    await asyncio.get_running_loop().create_connection(lambda: client, sock=sock)
    stream = client.open_stream(CONNECT)
    await asyncio.wait_for(stream.response, TIMEOUT)
    back = Reader()
    stream.set_protocol(back)
    return server, client, stream, back


# -- bytes intact ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 16_384, 65_537, session.MAX_FRAME + 3,
                                  session.STREAM_WINDOW + 12_345])
@on_uvloop
async def test_bytes_intact_through_two_sessions(size: int) -> None:
    """Our framing on both ends (client session to server session), echoed back: the
    checksum both ways, past a whole stream window (so WINDOW_UPDATEs must flow)."""
    server, client, stream, back = await echo_stream()
    payload = os.urandom(size)
    for i in range(0, size, 100_000):
        stream.write(payload[i:i + 100_000])
    stream.write_eof()
    await asyncio.wait_for(back.eof.wait(), TIMEOUT)
    assert hashlib.sha256(back.data).digest() == hashlib.sha256(payload).digest()
    assert hashlib.sha256(server.readers[1].data).digest() == hashlib.sha256(payload).digest()
    client.close()


@on_uvloop
async def test_h2_peer_padded_frames_small_window_and_one_byte_reads() -> None:
    """A peer using h2 itself (16 KiB frames, padding, a 65535-byte window it credits):
    our frames respect its window, padding never reaches the reader, and a conversation
    fed one byte at a time parses the same."""
    server = Server(echo=True)
    sock = await server.start()
    peer = Peer(sock)
    sid = await peer.open()
    payload = os.urandom(200_000)
    for i in range(0, len(payload), 10_000):
        peer.conn.send_data(sid, payload[i:i + 10_000], pad_length=17)
    await peer.send()
    await peer.until(lambda: len(peer.received.get(sid, b"")) >= len(payload))
    assert bytes(peer.received[sid]) == payload
    assert bytes(server.readers[sid].data) == payload
    # one byte at a time: a PING, a DATA frame with END_STREAM, split everywhere
    sid2 = await peer.open()
    peer.conn.ping(b"12345678")
    peer.conn.send_data(sid2, b"hello, tunnel", end_stream=True)
    for byte in peer.conn.data_to_send():
        await asyncio.get_running_loop().sock_sendall(sock, bytes([byte]))
    await asyncio.wait_for(server.readers[sid2].eof.wait(), TIMEOUT)
    assert bytes(server.readers[sid2].data) == b"hello, tunnel"
    await peer.until(lambda: any(isinstance(e, h2.events.PingAckReceived)
                                 for e in peer.events))


@on_uvloop
async def test_data_interleaved_with_control_frames_in_one_write() -> None:
    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    raw = b"".join([
        data_frame(sid, b"a" * 5000),
        frames.header(8, 0x6, 0, 0) + b"pingpong",  # PING
        data_frame(sid, b"b" * 3),
        frames.header(0, 0x4, 0, 0),  # empty SETTINGS
        frames.header(5, 0x2, 0, sid) + b"\x00\x00\x00\x00\x10",  # PRIORITY
        data_frame(sid, b"c", frames.END_STREAM),
    ])
    await peer.send(raw)
    await asyncio.wait_for(server.readers[sid].eof.wait(), TIMEOUT)
    assert bytes(server.readers[sid].data) == b"a" * 5000 + b"bbbc"
    await peer.until(lambda: any(isinstance(e, h2.events.PingAckReceived)
                                 for e in peer.events))
    assert peer.goaway() is None


# -- hostile peers -----------------------------------------------------------------------

@on_uvloop
async def test_a_stream_window_overrun_is_a_flow_control_error() -> None:
    """The reader never reads, so no WINDOW_UPDATE: exactly the window is accepted, one
    byte more ends the connection."""
    server = Server(paused=True)
    peer = Peer(await server.start())
    sid = await peer.open()
    chunk = b"x" * session.MAX_FRAME
    for _ in range(session.STREAM_WINDOW // session.MAX_FRAME):
        await peer.send(data_frame(sid, chunk))
    await peer.pump()
    assert peer.goaway() is None
    assert len(server.readers[sid].data) == session.STREAM_WINDOW
    await peer.send(data_frame(sid, b"!"))
    await peer.closed_with(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)


@on_uvloop
async def test_padding_counts_against_the_window_and_bad_padding_is_refused() -> None:
    server = Server(paused=True)
    peer = Peer(await server.start())
    sid = await peer.open()
    # 255 bytes of padding + 1 pad-length byte + 1 data byte per frame
    frame = data_frame(sid, b"\xff" + b"d" + b"\x00" * 255, frames.PADDED)
    count = session.STREAM_WINDOW // 257
    await peer.send(frame * count)
    await peer.pump()
    assert bytes(server.readers[sid].data) == b"d" * count and peer.goaway() is None
    left = session.STREAM_WINDOW - 257 * count
    await peer.send(data_frame(sid, b"\x00" + b"e" * (left - 1), frames.PADDED))  # full
    await peer.pump()
    assert peer.goaway() is None
    await peer.send(data_frame(sid, b"\x00", frames.PADDED))  # one byte over
    await peer.closed_with(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)

    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(data_frame(sid, b"\x05abc", frames.PADDED))  # padding past the payload
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not server.readers[sid].data


@on_uvloop
async def test_oversize_frame_is_a_frame_size_error() -> None:
    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.header(session.MAX_FRAME + 1, frames.DATA, 0, sid))
    await peer.closed_with(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)


@on_uvloop
async def test_data_on_reset_and_idle_streams() -> None:
    """DATA on a stream the peer reset is dropped (the connection and its other streams
    carry on); DATA on a stream never opened is a connection error."""
    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    other = await peer.open()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await peer.send()
    await asyncio.wait_for(server.readers[sid].lost.wait(), TIMEOUT)
    await peer.send(data_frame(sid, b"late" * 1000) + data_frame(other, b"fine"))
    await peer.until(lambda: bytes(server.readers[other].data) == b"fine")
    assert not server.readers[sid].data and peer.goaway() is None
    await peer.send(data_frame(99, b"never opened"))
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)


@on_uvloop
async def test_data_between_headers_and_continuation_is_a_protocol_error() -> None:
    server = Server()
    peer = Peer(await server.start())
    await peer.send()
    block = peer.conn.encoder.encode(CONNECT)
    await peer.send(frames.header(len(block), frames.HEADERS, 0, 1) + block
                    + data_frame(1, b"sneaky"))
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not server.readers


@on_uvloop
async def test_empty_data_flood_spends_the_budget() -> None:
    server = Server(limits=Http2Limits())
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(data_frame(sid, b"") * 50)
    await peer.closed_with(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


@on_uvloop
async def test_window_update_flood_spends_the_budget() -> None:
    server = Server(limits=Http2Limits())
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.window_update(sid, 1) * 100)
    await peer.closed_with(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


@on_uvloop
async def test_window_overflow_stream_then_connection() -> None:
    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.window_update(sid, 2**31 - 1))
    await peer.until(lambda: any(isinstance(e, h2.events.StreamReset) for e in peer.events))
    reset = next(e for e in peer.events if isinstance(e, h2.events.StreamReset))
    assert reset.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert peer.goaway() is None
    await peer.send(frames.window_update(0, 2**31 - 1))
    await peer.closed_with(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)


@on_uvloop
async def test_a_peer_that_never_credits_a_stream_stalls_only_that_stream() -> None:
    """The peer gives a large connection window and 64 KiB stream windows, and credits
    stream 3 only: stream 1 stops at its window, stream 3 carries everything."""
    server = Server(echo=True)
    peer = Peer(await server.start())
    peer.conn.increment_flow_control_window(2**24)
    stuck = await peer.open()
    flowing = await peer.open()
    peer.ack_streams = {flowing}
    big = os.urandom(300_000)
    await peer.send(b"".join(data_frame(stuck, big[i:i + 16_384])
                             for i in range(0, len(big), 16_384)))
    await peer.send(b"".join(data_frame(flowing, big[i:i + 16_384])
                             for i in range(0, len(big), 16_384)))
    await peer.until(lambda: len(peer.received.get(flowing, b"")) == len(big))
    assert bytes(peer.received[flowing]) == big
    assert len(peer.received[stuck]) == 65535
    assert peer.goaway() is None


class RelaySide(Side):
    """A relay's side (which takes memoryviews): records what it was handed."""

    def __init__(self) -> None:
        super().__init__("tunnel")
        self.data = bytearray()
        self.types: set[type] = set()
        self.ended = asyncio.Event()

    def data_received(self, data) -> None:
        self.types.add(type(data))
        self.data += data

    def eof_received(self) -> bool:
        self.ended.set()
        return True


@on_uvloop
async def test_a_relay_side_gets_pieces_of_reads_uncopied_and_intact() -> None:
    """Frames larger than a read arrive in pieces: a relay's side gets them as views of
    the (immutable) read, any other reader as bytes; either way the bytes are intact."""
    loop = asyncio.get_running_loop()
    side = RelaySide()
    server = Server()
    server.on_request = lambda sess, stream: (sess.respond(stream, 200),
                                              stream.set_protocol(side))
    sock = await server.start()
    client = H2Session(client_side=True)
    await loop.create_connection(lambda: client, sock=sock)
    stream = client.open_stream(CONNECT)
    await asyncio.wait_for(stream.response, TIMEOUT)
    stream.set_protocol(Reader())
    payload = os.urandom(3 * session.MAX_FRAME + 5)
    stream.write(payload)
    stream.write_eof()
    await asyncio.wait_for(side.ended.wait(), TIMEOUT)
    assert hashlib.sha256(side.data).digest() == hashlib.sha256(payload).digest()
    assert memoryview in side.types
    client.close()


@on_uvloop
async def test_the_tunnel_rides_the_proxys_one_h2_integration_graceful_goaway() -> None:
    """The session drives codec/h2_connection.py's connection (as the L7 codec does): a
    graceful GOAWAY from the peer lets its open stream finish, bytes intact."""
    server = Server()
    peer = Peer(await server.start())
    sid = await peer.open()
    assert isinstance(server.session.conn, ProxyH2Connection)
    peer.conn.close_connection(h2.errors.ErrorCodes.NO_ERROR)
    await peer.send(data_frame(sid, b"after the goaway", frames.END_STREAM))
    await asyncio.wait_for(server.readers[sid].eof.wait(), TIMEOUT)
    assert bytes(server.readers[sid].data) == b"after the goaway"


# -- the small-write path (StreamTransport.write straight to the transport) -----------------

@on_uvloop
async def test_a_burst_of_small_writes_arrives_intact_and_in_order() -> None:
    """Small writes one per turn (each its own DATA frame at once), many in one turn (the
    first at once, the rest queued behind it) and mixed with a large one: the reader gets
    every byte in order, and so does the echo coming back."""
    server, client, stream, back = await echo_stream()
    sent = bytearray()

    def write(chunk: bytes) -> None:
        stream.write(chunk)
        sent.extend(chunk)

    for i in range(200):  # one per turn
        write(bytes([i % 251]) * (1 + i % 97))
        await asyncio.sleep(0)
    for i in range(2000):  # one turn
        write(i.to_bytes(2, "big") * (1 + i % 13))
    write(os.urandom(session.SMALL_FRAME + 1))  # not small: framed behind the queue
    for i in range(50):
        write(b"%d," % i)
    stream.write_eof()
    await asyncio.wait_for(back.eof.wait(), TIMEOUT)
    assert bytes(server.readers[1].data) == bytes(sent)
    assert bytes(back.data) == bytes(sent)
    client.close()


@on_uvloop
async def test_small_writes_stop_at_the_peers_stream_window() -> None:
    """Small writes take the direct path only inside the windows: against a peer that gives
    a 100-byte stream window and never credits it, exactly 100 bytes leave, the rest wait;
    once credited, the rest arrive in order."""
    server = Server()
    peer = Peer(await server.start())
    peer.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    peer.ack = False
    sid = await peer.open()
    await peer.until(lambda: 1 in server.readers)
    stream = server.session.streams[sid]  # type: ignore[union-attr]
    payload = b"".join(b"%03d" % i for i in range(100))  # 300 bytes in 3-byte writes
    for i in range(0, len(payload), 3):
        stream.write(payload[i:i + 3])
    for _ in range(5):
        await peer.pump(0.05)
    assert bytes(peer.received.get(sid, b"")) == payload[:100]
    assert stream.send_window == 0
    peer.conn.increment_flow_control_window(1000, stream_id=sid)
    await peer.send()
    await peer.until(lambda: len(peer.received.get(sid, b"")) == len(payload))
    assert bytes(peer.received[sid]) == payload

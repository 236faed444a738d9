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

from nodeproxy import native
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
        self.gone = asyncio.Event()
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
        self.gone.set()


class SideReader(Side):
    """Reader's twin as a relay's side, the only reader the session's whole-frame path
    (H2Session._whole_data) serves: every hostile-peer test runs with both, so a frame is
    refused the same whichever path parses it."""

    def __init__(self, echo: bool = False, paused: bool = False):
        super().__init__("tunnel", start_paused=paused)
        self.echo, self.paused = echo, paused
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.gone = asyncio.Event()
        self.on_data = None  # called after each piece (a test's hook)

    def data_received(self, data) -> None:
        self.data += data
        if self.echo:
            self.transport.write(bytes(data))
        if self.on_data is not None:
            self.on_data(self)

    def eof_received(self) -> bool:
        self.eof.set()
        if self.echo:
            self.transport.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        self.gone.set()


READERS = pytest.mark.parametrize("reader", [Reader, SideReader], ids=["reader", "side"])


class Server:
    def __init__(self, echo: bool = False, paused: bool = False,
                 limits: Http2Limits | None = None, reader: type = Reader):
        self.readers: dict[int, Reader] = {}
        self.echo, self.paused, self.limits = echo, paused, limits
        self.reader = reader
        self.session: H2Session | None = None

    def on_request(self, sess: H2Session, stream) -> None:
        sess.respond(stream, 200)
        reader = self.readers[stream.stream_id] = self.reader(self.echo, self.paused)
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


async def echo_stream(reader: type = Reader
                      ) -> tuple[Server, H2Session, StreamTransport, Reader]:
    """A client session to an echoing server session, one CONNECT stream open and
    answered, a `reader` on both ends (what the server gets, what comes back)."""
    server = Server(echo=True, reader=reader)
    sock = await server.start()
    client = H2Session(client_side=True)
    await asyncio.get_running_loop().create_connection(lambda: client, sock=sock)
    stream = client.open_stream(CONNECT)
    await asyncio.wait_for(stream.response, TIMEOUT)
    back = reader()
    stream.set_protocol(back)
    return server, client, stream, back


# -- bytes intact ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 16_384, 65_537, session.MAX_FRAME + 3,
                                  session.STREAM_WINDOW + 12_345])
@READERS
@on_uvloop
async def test_bytes_intact_through_two_sessions(size: int, reader: type) -> None:
    """Our framing on both ends (client session to server session), echoed back: the
    checksum both ways, past a whole stream window (so WINDOW_UPDATEs must flow)."""
    server, client, stream, back = await echo_stream(reader)
    payload = os.urandom(size)
    for i in range(0, size, 100_000):
        stream.write(payload[i:i + 100_000])
    stream.write_eof()
    await asyncio.wait_for(back.eof.wait(), TIMEOUT)
    assert hashlib.sha256(back.data).digest() == hashlib.sha256(payload).digest()
    assert hashlib.sha256(server.readers[1].data).digest() == hashlib.sha256(payload).digest()
    client.close()


@READERS
@on_uvloop
async def test_h2_peer_padded_frames_small_window_and_one_byte_reads(reader: type) -> None:
    """A peer using h2 itself (16 KiB frames, padding, a 65535-byte window it credits):
    our frames respect its window, padding never reaches the reader, and a conversation
    fed one byte at a time parses the same."""
    server = Server(reader=reader, echo=True)
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


@READERS
@on_uvloop
async def test_data_interleaved_with_control_frames_in_one_write(reader: type) -> None:
    server = Server(reader=reader)
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

@READERS
@on_uvloop
async def test_a_stream_window_overrun_is_a_flow_control_error(reader: type) -> None:
    """The reader never reads, so no WINDOW_UPDATE: exactly the window is accepted, one
    byte more ends the connection."""
    server = Server(reader=reader, paused=True)
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


@READERS
@on_uvloop
async def test_padding_counts_against_the_window_and_bad_padding_is_refused(reader: type) -> None:
    server = Server(reader=reader, paused=True)
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

    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(data_frame(sid, b"\x05abc", frames.PADDED))  # padding past the payload
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not server.readers[sid].data


@READERS
@on_uvloop
async def test_oversize_frame_is_a_frame_size_error(reader: type) -> None:
    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.header(session.MAX_FRAME + 1, frames.DATA, 0, sid))
    await peer.closed_with(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)


@READERS
@on_uvloop
async def test_data_on_reset_and_idle_streams(reader: type) -> None:
    """DATA on a stream the peer reset is dropped (the connection and its other streams
    carry on); DATA on a stream never opened is a connection error."""
    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    other = await peer.open()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await peer.send()
    await asyncio.wait_for(server.readers[sid].gone.wait(), TIMEOUT)
    await peer.send(data_frame(sid, b"late" * 1000) + data_frame(other, b"fine"))
    await peer.until(lambda: bytes(server.readers[other].data) == b"fine")
    assert not server.readers[sid].data and peer.goaway() is None
    await peer.send(data_frame(99, b"never opened"))
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)


@READERS
@on_uvloop
async def test_data_between_headers_and_continuation_is_a_protocol_error(reader: type) -> None:
    server = Server(reader=reader)
    peer = Peer(await server.start())
    await peer.send()
    block = peer.conn.encoder.encode(CONNECT)
    await peer.send(frames.header(len(block), frames.HEADERS, 0, 1) + block
                    + data_frame(1, b"sneaky"))
    await peer.closed_with(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not server.readers


@READERS
@on_uvloop
async def test_empty_data_flood_spends_the_budget(reader: type) -> None:
    server = Server(reader=reader, limits=Http2Limits())
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(data_frame(sid, b"") * 50)
    await peer.closed_with(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


@READERS
@on_uvloop
async def test_window_update_flood_spends_the_budget(reader: type) -> None:
    server = Server(reader=reader, limits=Http2Limits())
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.window_update(sid, 1) * 100)
    await peer.closed_with(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


@READERS
@on_uvloop
async def test_window_overflow_stream_then_connection(reader: type) -> None:
    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    await peer.send(frames.window_update(sid, 2**31 - 1))
    await peer.until(lambda: any(isinstance(e, h2.events.StreamReset) for e in peer.events))
    reset = next(e for e in peer.events if isinstance(e, h2.events.StreamReset))
    assert reset.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert peer.goaway() is None
    await peer.send(frames.window_update(0, 2**31 - 1))
    await peer.closed_with(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)


@READERS
@on_uvloop
async def test_a_peer_that_never_credits_a_stream_stalls_only_that_stream(reader: type) -> None:
    """The peer gives a large connection window and 64 KiB stream windows, and credits
    stream 3 only: stream 1 stops at its window, stream 3 carries everything."""
    server = Server(reader=reader, echo=True)
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


@READERS
@on_uvloop
async def test_the_tunnel_rides_the_proxys_one_h2_integration_graceful_goaway(reader: type) -> None:
    """The session drives codec/h2_connection.py's connection (as the L7 codec does): a
    graceful GOAWAY from the peer lets its open stream finish, bytes intact."""
    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    assert isinstance(server.session.conn, ProxyH2Connection)
    peer.conn.close_connection(h2.errors.ErrorCodes.NO_ERROR)
    await peer.send(data_frame(sid, b"after the goaway", frames.END_STREAM))
    await asyncio.wait_for(server.readers[sid].eof.wait(), TIMEOUT)
    assert bytes(server.readers[sid].data) == b"after the goaway"


# -- the small-write path (StreamTransport.write straight to the transport) -----------------

@READERS
@on_uvloop
async def test_a_burst_of_small_writes_arrives_intact_and_in_order(reader: type) -> None:
    """Small writes one per turn (each its own DATA frame at once), many in one turn (the
    first at once, the rest queued behind it) and mixed with a large one: the reader gets
    every byte in order, and so does the echo coming back."""
    server, client, stream, back = await echo_stream(reader)
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


@READERS
@on_uvloop
async def test_small_writes_stop_at_the_peers_stream_window(reader: type) -> None:
    """Small writes take the direct path only inside the windows: against a peer that gives
    a 100-byte stream window and never credits it, exactly 100 bytes leave, the rest wait;
    once credited, the rest arrive in order."""
    server = Server(reader=reader)
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


# -- the whole-frame path (H2Session._whole_data: a relay's side, one frame per call) -------

def taken(server: Server | H2Session) -> list[int] | None:
    """Counts the frames _whole_data took (a spy on the (server's) session); None where
    the session is the compiled build's native class (nodeproxy/native.py), whose methods
    cannot be replaced: there the frames' bytes and the peer's answers are still checked,
    the count only on the pure-Python pass (`make test` runs both)."""
    count = [0]
    sess = server.session if isinstance(server, Server) else server
    real = sess._whole_data

    def spy(*args) -> bool:
        took = real(*args)
        count[0] += took
        return took

    try:
        sess._whole_data = spy  # type: ignore[method-assign]
    except AttributeError:
        assert native.state()[0], "only the compiled session refuses the spy"
        return None
    return count


@READERS
@on_uvloop
async def test_whole_small_frames_fill_the_stream_window_and_one_byte_more_is_refused(
        reader: type) -> None:
    """A paused reader, the window filled by small frames each whole in a read (the
    whole-frame path's case): exactly the window is accepted and one whole frame of one
    byte past it is a FLOW_CONTROL_ERROR, as on the general path."""
    server = Server(reader=reader, paused=True)
    peer = Peer(await server.start())
    sid = await peer.open()
    took = taken(server)
    chunk = os.urandom(4096)
    for _ in range(session.STREAM_WINDOW // len(chunk) // 64):
        await peer.send(data_frame(sid, chunk) * 64)
    await peer.pump()
    assert peer.goaway() is None
    assert bytes(server.readers[sid].data) == chunk * (session.STREAM_WINDOW // len(chunk))
    # (a frame cut by a read's end takes the general path: most are whole)
    assert took is None or ((took[0] > 512) if reader is SideReader else (took[0] == 0))
    await peer.send(data_frame(sid, b"!"))
    await peer.closed_with(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
    assert len(server.readers[sid].data) == session.STREAM_WINDOW


@READERS
@on_uvloop
async def test_data_frames_with_other_flags_take_the_general_path_intact(
        reader: type) -> None:
    """Flags the whole-frame path does not take (END_STREAM, PADDED, unknown bits) in
    one write with flagless frames: every payload in order, padding dropped, the end
    seen once, no error."""
    server = Server(reader=reader)
    peer = Peer(await server.start())
    sid = await peer.open()
    took = taken(server)
    await peer.send(b"".join([
        data_frame(sid, b"one,"),
        data_frame(sid, b"two,", 0x20),  # an unknown flag: ignored (RFC 9113 4.1)
        data_frame(sid, b"\x03three,pad", frames.PADDED),
        data_frame(sid, b"four,", 0x2),
        data_frame(sid, b"five"),
        data_frame(sid, b".", frames.END_STREAM),
    ]))
    await asyncio.wait_for(server.readers[sid].eof.wait(), TIMEOUT)
    assert bytes(server.readers[sid].data) == b"one,two,three,four,five."
    assert took is None or took[0] == (2 if reader is SideReader else 0)
    assert peer.goaway() is None


@on_uvloop
async def test_a_stream_the_reader_aborts_mid_read_gets_nothing_more() -> None:
    """The relay's side aborts its stream on the first frame of a read carrying three:
    the other two never reach it (the stream is finished; h2 answers them), the peer
    sees the stream reset, and another stream in the same read is served."""
    server = Server(reader=SideReader)
    peer = Peer(await server.start())
    sid = await peer.open()
    other = await peer.open()
    server.readers[sid].on_data = lambda side: side.transport.abort()
    await peer.send(data_frame(sid, b"first") + data_frame(sid, b"second")
                    + data_frame(other, b"fine") + data_frame(sid, b"third"))
    await peer.until(lambda: bytes(server.readers[other].data) == b"fine")
    await peer.until(lambda: any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid
                                 for e in peer.events))
    assert bytes(server.readers[sid].data) == b"first"
    assert peer.goaway() is None


@on_uvloop
async def test_a_session_aborted_mid_read_reads_no_further_frame() -> None:
    """A relay's side aborts the whole session on the first frame of a read: the frames
    after it in that read (whole, for open streams) reach no reader."""
    server = Server(reader=SideReader)
    peer = Peer(await server.start())
    sid = await peer.open()
    other = await peer.open()
    server.readers[sid].on_data = lambda side: server.session.abort()
    await peer.send(data_frame(sid, b"first") + data_frame(other, b"second")
                    + data_frame(sid, b"third"))
    await asyncio.wait_for(server.readers[other].gone.wait(), TIMEOUT)
    assert bytes(server.readers[sid].data) == b"first"
    assert not server.readers[other].data


@on_uvloop
async def test_whole_frames_reset_the_empty_frame_run() -> None:
    """The FrameGuard sees the whole-frame path's frames: empty DATA frames up to the
    budget's run, each run broken by a whole frame with a payload, are allowed however
    many; one empty frame past the run is ENHANCE_YOUR_CALM."""
    limits = Http2Limits()
    run = limits.max_consecutive_empty_frames
    server = Server(reader=SideReader, limits=limits)
    peer = Peer(await server.start())
    sid = await peer.open()
    took = taken(server)
    await peer.send((data_frame(sid, b"") * run + data_frame(sid, b"x")) * 200)
    await peer.until(lambda: len(server.readers[sid].data) == 200)
    assert took is None or took[0] == 200
    assert peer.goaway() is None
    await peer.send(data_frame(sid, b"") * (run + 1))
    await peer.closed_with(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


async def _tls_sessions(on_request) -> tuple[H2Session, H2Session]:
    """A client and a server session over the TLS transport (the mesh's contexts), as
    the daemons run them: the sessions' direct small-write path is on."""
    from nodeproxy.identity import (
        CertificateManager,
        MeshCA,
        client_context,
        server_context,
        tls_transport,
    )
    loop = asyncio.get_running_loop()
    manager = CertificateManager(MeshCA.generate("cluster.local"), "cluster.local",
                                 ttl_seconds=3600)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = H2Session(client_side=False, on_request=on_request, limits=Http2Limits())

    async def accept() -> None:
        conn, _ = await loop.sock_accept(listener)
        await tls_transport.accept(server, server_context(manager, "shop", "cart"), conn,
                                   handshake_timeout=5)

    accepting = loop.create_task(accept())
    client = H2Session(client_side=True)
    await tls_transport.connect(client, client_context(manager, "web", "frontend"),
                                "127.0.0.1", listener.getsockname()[1], handshake_timeout=5)
    await accepting
    listener.close()
    return client, server


class _Collect(asyncio.Protocol):
    """An application socket's end: keeps what it receives; `echo` sends it back."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof.set()
        if self.echo:
            self.transport.write_eof()
        return True


@on_uvloop
async def test_relayed_small_messages_intact_both_ways_over_tls() -> None:
    """Eight relayed connections on one TLS tunnel, as the daemons join them (a socket,
    a Relay, a stream; a stream, a Relay, an echoing socket): many small messages of
    every size up to 2 KiB, all flows at once (several per turn: the TLS transport's
    one-record turns and the whole-frame path), then a large one: the SHA-256 of what
    each application got equals what was sent, both ways, and the ends arrive."""
    from nodeproxy.tcp.relay import Relay

    loop = asyncio.get_running_loop()
    servers: list[_Collect] = []

    async def serve(sess: H2Session, stream: StreamTransport) -> None:
        sess.respond(stream, 200)
        down = Side("tunnel")
        stream.set_protocol(down)
        near, far = socket.socketpair()
        _, up = await loop.create_connection(lambda: Side("tcp"), sock=near)
        _, app = await loop.create_connection(lambda: _Collect(echo=True), sock=far)
        servers.append(app)
        Relay(down, up, lambda d, n: None, lambda r: None).start()

    client, server = await _tls_sessions(lambda s, st: loop.create_task(serve(s, st)))
    assert client.write_direct is not None and server.write_direct is not None
    took = taken(client), taken(server)
    apps: list[tuple[_Collect, bytes]] = []
    for i in range(8):
        stream = client.open_stream(CONNECT)
        await asyncio.wait_for(stream.response, TIMEOUT)
        up = Side("tunnel")
        stream.set_protocol(up)
        near, far = socket.socketpair()
        _, down = await loop.create_connection(lambda: Side("tcp"), sock=near)
        Relay(down, up, lambda d, n: None, lambda r: None).start()
        _, app = await loop.create_connection(lambda: _Collect(echo=False), sock=far)
        payload = b"".join(os.urandom(1 + (i * 131 + k * 17) % 2048) for k in range(300))
        apps.append((app, payload + os.urandom(300_000)))
    longest = max(len(payload) for _, payload in apps)
    for k in range(0, longest, 997):  # interleaved: every flow writes in each turn
        for app, payload in apps:
            if k < len(payload):
                app.transport.write(payload[k:k + 997])
        await asyncio.sleep(0)
    for app, _ in apps:
        app.transport.write_eof()
    for app, payload in apps:
        await asyncio.wait_for(app.eof.wait(), TIMEOUT)
        assert len(app.data) == len(payload)
        assert hashlib.sha256(app.data).digest() == hashlib.sha256(payload).digest()
    assert sorted(hashlib.sha256(s.data).digest() for s in servers) == \
        sorted(hashlib.sha256(p).digest() for _, p in apps)
    if took[0] is not None and took[1] is not None:  # both ends' whole-frame path ran
        assert took[0][0] > 100 and took[1][0] > 100
    client.close()


class _Holding(Side):
    """A relay's side of a class of its own (as tcp/half_sleep.py's bell was): forwards
    through its relay as a plain side does until `holding`, then keeps what it is handed
    instead.  (Not a class swapped in over a plain side, as the bell was: a compiled
    build's calls from compiled code follow the class an object was made with.)"""

    __slots__ = ()
    holding = False  # set on the class by the test

    def data_received(self, data) -> None:
        if _Holding.holding:
            self.hold_early(bytes(data))
        else:
            Side.data_received(self, data)


@on_uvloop
async def test_a_side_whose_class_says_otherwise_gets_its_own_data_received() -> None:
    """The whole-frame path forwards through the relay itself only for a plain Side; a
    side of another class gets its own data_received, whole frames included, and what
    it keeps never reaches the relay's other end."""
    from nodeproxy.tcp.relay import Relay

    loop = asyncio.get_running_loop()
    sides: list[Side] = []
    server = Server()

    def on_request(sess: H2Session, stream) -> None:
        sess.respond(stream, 200)
        side = _Holding("tunnel")
        stream.set_protocol(side)
        sides.append(side)

    server.on_request = on_request
    peer = Peer(await server.start())
    sid = await peer.open()
    near, far = socket.socketpair()
    _, up = await loop.create_connection(lambda: Side("tcp"), sock=near)
    down = sides[0]
    Relay(down, up, lambda d, n: None, lambda r: None).start()
    took = taken(server)
    await peer.send(data_frame(sid, b"awake;"))
    far.setblocking(False)
    assert await asyncio.wait_for(loop.sock_recv(far, 100), TIMEOUT) == b"awake;"
    _Holding.holding = True
    await peer.send(data_frame(sid, b"asleep;") + data_frame(sid, b"still;"))
    for _ in range(50):
        if down.early:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert b"".join(down.early) == b"asleep;still;"
    assert took is None or took[0] == 3
    with pytest.raises(BlockingIOError):
        far.recv(100)  # nothing forwarded while the side held it
    _Holding.holding = False
    far.close()

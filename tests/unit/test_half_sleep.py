"""Cross-node flows asleep (tcp/half_sleep.py): a quiet relay between a socket and an
HBONE tunnel stream gives up its socket's transport at both ends, and whatever comes
from either application or from a hostile peer node wakes it exactly.

The path is the daemons' own objects in one process, over loopback: a client
application's TCP socket -> the source node's relay -> a tunnel stream over mutual TLS
-> the destination node's serving session -> its relay -> the server application's TCP
socket.  Both relays are offered to one RelayNaps as the daemons' listeners do.  What a
peer node sends (RST_STREAM, WINDOW_UPDATE, GOAWAY) is injected as bytes into the
receiving session, as if read from its TLS connection; what the test asserts is what an
application notices: the bytes, by SHA-256, both ways, an EOF, a reset.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import os
import socket
import struct

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.codec import h2_frames as frames
from nodeproxy.identity import (
    CertificateManager,
    MeshCA,
    client_context,
    server_context,
    tls_transport,
)
from nodeproxy.tcp import relay_sleep
from nodeproxy.tcp.dormancy import ASLEEP_SIDES, Dormancy
from nodeproxy.tcp.half_sleep import HalfNaps
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.relay_sleep import RelaySleepMetrics
from nodeproxy.tunnel.session import STREAM_WINDOW, H2Session, StreamTransport

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
RST_STREAM, GOAWAY = 0x3, 0x7


def on_uvloop(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(test(*args, **kwargs), 60))
    return run


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 0.05)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frames.header(4, RST_STREAM, 0, stream_id) + struct.pack("!L", code)


def goaway(last_stream_id: int, code: int = 0) -> bytes:
    return frames.header(8, GOAWAY, 0, 0) + struct.pack("!LL", last_stream_id, code)


def payload(tag: bytes, n: int) -> bytes:
    """n bytes derived from SHA-256 (not a repeated byte: an offset error shows)."""
    out = bytearray()
    block = hashlib.sha256(tag).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the proxy's end, the application's end, non-blocking) of a loopback connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    app = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    app.setblocking(False)
    return ours, app


async def read_all(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, 1 << 16)
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def until(predicate, seconds: float = 10.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Ends:
    """One flow: both applications' sockets, both relays, both streams."""

    client_app: socket.socket
    server_app: socket.socket
    source: Relay  # the source node's relay (client socket downstream, stream upstream)
    destination: Relay  # the destination node's (stream downstream, server socket upstream)
    source_stream: StreamTransport
    destination_stream: StreamTransport

    def __init__(self) -> None:
        self.counted = {"source": [0, 0], "destination": [0, 0]}
        self.ended: list[str] = []

    def counter(self, which: str):  # noqa: ANN201
        def count(from_downstream: bool, n: int) -> None:
            self.counted[which][0 if from_downstream else 1] += n
        return count


class Mesh:
    """Both nodes' tunnel ends and their flows; naps shared as one daemon's would be."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.naps = HalfNaps(Dormancy(), RelaySleepMetrics(self.registry))
        self.served: asyncio.Queue[tuple[Relay, StreamTransport, socket.socket]] = \
            asyncio.Queue()
        self.client: H2Session
        self.server: H2Session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ca = MeshCA.generate("cluster.local")
        manager = CertificateManager(ca, "cluster.local", ttl_seconds=3600)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self.server = H2Session(client_side=False, on_request=self._on_request)

        async def accept() -> None:
            conn, _ = await loop.sock_accept(listener)
            await tls_transport.accept(self.server, server_context(manager, "shop", "cart"),
                                       conn, handshake_timeout=5)

        accepting = loop.create_task(accept())
        self.client = H2Session(client_side=True)
        await tls_transport.connect(self.client, client_context(manager, "web", "frontend"),
                                    "127.0.0.1", listener.getsockname()[1],
                                    handshake_timeout=5)
        await accepting
        listener.close()

    def _on_request(self, session: H2Session, stream: StreamTransport) -> None:
        asyncio.get_running_loop().create_task(self._serve(session, stream))

    async def _serve(self, session: H2Session, stream: StreamTransport) -> None:
        loop = asyncio.get_running_loop()
        ours, app = tcp_pair()
        _, up = await loop.create_connection(lambda: Side("upstream", start_paused=True),
                                             sock=ours)
        session.respond(stream, 200)
        down = Side("downstream", start_paused=True)
        stream.set_protocol(down)
        await self.served.put((up, down, stream, app))

    async def flow(self) -> Ends:
        loop = asyncio.get_running_loop()
        ends = Ends()
        ours, ends.client_app = tcp_pair()
        _, down = await loop.create_connection(lambda: Side("downstream"), sock=ours)
        stream = self.client.open_stream(CONNECT)
        await asyncio.wait_for(stream.response, 5)
        up = Side("upstream", start_paused=True)
        stream.set_protocol(up)
        ends.source_stream = stream
        ends.source = Relay(down, up, ends.counter("source"),
                            lambda _r: ends.ended.append("source"))
        ends.source.start()
        self.naps.offer(ends.source)
        s_up, s_down, s_stream, ends.server_app = await self.served.get()
        ends.destination_stream = s_stream
        ends.destination = Relay(s_down, s_up, ends.counter("destination"),
                                 lambda _r: ends.ended.append("destination"))
        ends.destination.start()
        self.naps.offer(ends.destination)
        return ends

    def asleep(self, ends: Ends) -> bool:
        """Both relays asleep: both sides the shared stand-ins (no side of the flow's
        own, no transport for the socket anywhere), each relay its stream's reader."""
        return (ends.source.downstream is ASLEEP_SIDES[0]
                and ends.source.upstream is ASLEEP_SIDES[1]
                and ends.source_stream.protocol is ends.source
                and ends.destination.downstream is ASLEEP_SIDES[0]
                and ends.destination.upstream is ASLEEP_SIDES[1]
                and ends.destination_stream.protocol is ends.destination)

    def asleep_relays(self) -> set[int]:
        """The relays with a row in the table of half-asleep relays, by id."""
        halves = self.naps.halves
        assert halves is not None
        return {id(r) for r in map(halves.row_of, range(4096)) if r is not None}

    def sample(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


async def exchange(ends: Ends, up_n: int, down_n: int, tag: bytes) -> None:
    """Both applications send at once; each receives the other's bytes intact."""
    loop = asyncio.get_running_loop()
    to_server, to_client = payload(tag + b"c", up_n), payload(tag + b"s", down_n)
    sent = asyncio.gather(loop.sock_sendall(ends.client_app, to_server),
                          loop.sock_sendall(ends.server_app, to_client))
    got_server, got_client = await asyncio.gather(read_all(ends.server_app, up_n),
                                                  read_all(ends.client_app, down_n))
    await sent
    assert hashlib.sha256(got_server).hexdigest() == hashlib.sha256(to_server).hexdigest()
    assert hashlib.sha256(got_client).hexdigest() == hashlib.sha256(to_client).hexdigest()


async def expect_reset(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
            pass


@on_uvloop
async def test_a_quiet_cross_node_flow_sleeps_at_both_ends_and_wakes_intact_both_ways():
    mesh = Mesh()
    await mesh.start()
    flows = [await mesh.flow() for _ in range(3)]
    await until(lambda: all(mesh.asleep(f) for f in flows))
    assert mesh.naps.asleep == 6
    for f in flows:
        assert f.source_stream._side is None and not f.source_stream._takes_views
    # More than a stream window each way at once, from both applications: the wake, the
    # bytes held while the socket's transport is made, and flow control across it.
    big = STREAM_WINDOW + 300_001
    for i, f in enumerate(flows):
        await exchange(f, big if i == 0 else 1 + i, 70_000 * (i + 1), b"%d" % i)
        assert f.counted["source"] == [big if i == 0 else 1 + i, 70_000 * (i + 1)]
        assert f.counted["destination"] == f.counted["source"]
    assert mesh.sample("nodeproxy_relay_wakes_total") == 6
    await until(lambda: all(mesh.asleep(f) for f in flows))  # quiet again: asleep again
    assert mesh.sample("nodeproxy_relay_sleeps_total") == 12
    # Data from only the destination's application wakes both ends in turn.
    await exchange(flows[1], 0, 5, b"one way")
    await until(lambda: all(mesh.asleep(f) for f in flows))
    await exchange(flows[2], 9, 0, b"other way")


@on_uvloop
async def test_the_peer_nodes_rst_stream_on_an_asleep_stream_resets_the_application():
    mesh = Mesh()
    await mesh.start()
    victim, other = await mesh.flow(), await mesh.flow()
    await until(lambda: mesh.asleep(victim) and mesh.asleep(other))
    # The destination node resets the stream (a hostile or failing peer).
    mesh.client.data_received(rst_stream(victim.source_stream.stream_id, 0x2))
    await expect_reset(victim.client_app)
    await until(lambda: victim.source.finished)
    assert "source" in victim.ended
    # The source node resets a stream the destination has asleep.
    mesh.server.data_received(rst_stream(other.destination_stream.stream_id, 0x8))
    await expect_reset(other.server_app)
    await until(lambda: other.destination.finished)
    # The reset relays' rows are gone; the two other ends sleep on.
    assert mesh.naps.asleep == 2
    assert mesh.asleep_relays() == {id(victim.destination), id(other.source)}


@on_uvloop
async def test_window_updates_and_a_goaway_leave_asleep_streams_asleep_and_working():
    mesh = Mesh()
    await mesh.start()
    flows = [await mesh.flow(), await mesh.flow()]
    await until(lambda: all(mesh.asleep(f) for f in flows))
    wakes = mesh.sample("nodeproxy_relay_wakes_total")
    sid = flows[0].source_stream.stream_id
    window = flows[0].source_stream.send_window
    mesh.client.data_received(frames.window_update(sid, 1000)
                              + frames.window_update(0, 5000))
    mesh.server.data_received(frames.window_update(sid, 7))
    mesh.client.data_received(goaway(sid + 2))  # NO_ERROR: open streams may finish
    await asyncio.sleep(0.1)
    assert mesh.sample("nodeproxy_relay_wakes_total") == wakes
    assert all(mesh.asleep(f) for f in flows)
    assert flows[0].source_stream.send_window == window + 1000  # credited exactly
    for i, f in enumerate(flows):
        await exchange(f, 100_000 + i, 200_000 + i, b"after goaway %d" % i)


@on_uvloop
async def test_a_window_update_overflowing_an_asleep_stream_resets_it_and_its_application():
    mesh = Mesh()
    await mesh.start()
    f = await mesh.flow()
    await until(lambda: mesh.asleep(f))
    mesh.client.data_received(frames.window_update(f.source_stream.stream_id, 2**31 - 1))
    await expect_reset(f.client_app)
    await until(lambda: f.source.finished)


@on_uvloop
async def test_a_half_close_wakes_an_asleep_flow_and_the_other_direction_still_carries():
    mesh = Mesh()
    await mesh.start()
    f = await mesh.flow()
    await until(lambda: mesh.asleep(f))
    loop = asyncio.get_running_loop()
    last = payload(b"last", 50_000)
    await loop.sock_sendall(f.server_app, last)
    f.server_app.shutdown(socket.SHUT_WR)  # the server application's FIN
    assert await read_all(f.client_app, len(last)) == last
    assert await asyncio.wait_for(loop.sock_recv(f.client_app, 10), 5) == b""  # EOF
    reply = payload(b"reply", 3_000_000)
    sent = loop.create_task(loop.sock_sendall(f.client_app, reply))
    got = await read_all(f.server_app, len(reply))
    await sent
    assert hashlib.sha256(got).digest() == hashlib.sha256(reply).digest()
    await asyncio.sleep(0.3)  # half-closed: never asleep again
    assert not mesh.asleep(f)
    f.client_app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(loop.sock_recv(f.server_app, 10), 5) == b""
    await until(lambda: f.source.finished and f.destination.finished)


@on_uvloop
async def test_aborting_an_asleep_flow_resets_its_application_and_the_peer_stream():
    """Policy revocation and a vanished pod reset tracked relays, asleep ones too."""
    mesh = Mesh()
    await mesh.start()
    revoked, closed, kept = await mesh.flow(), await mesh.flow(), await mesh.flow()
    await until(lambda: all(mesh.asleep(f) for f in (revoked, closed, kept)))
    revoked.source.abort()
    assert revoked.source.finished and mesh.naps.asleep == 5
    await expect_reset(revoked.client_app)
    await expect_reset(revoked.server_app)  # the destination saw the stream's reset
    closed.destination.close()  # the idle timeout: a FIN to the application
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(closed.server_app, 10), 5) == b""
    await until(lambda: closed.destination.finished)
    await exchange(kept, 12_345, 54_321, b"kept")


@on_uvloop
async def test_the_pooled_connection_lost_ends_every_asleep_flow():
    mesh = Mesh()
    await mesh.start()
    flows = [await mesh.flow() for _ in range(3)]
    await until(lambda: all(mesh.asleep(f) for f in flows))
    assert mesh.client.transport is not None
    mesh.client.transport.abort()
    for f in flows:
        loop = asyncio.get_running_loop()
        for sock in (f.client_app, f.server_app):
            try:
                rest = await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
    await until(lambda: all(f.source.finished and f.destination.finished for f in flows))
    assert mesh.naps.asleep == 0


@on_uvloop
async def test_bytes_arriving_while_the_socket_is_being_adopted_keep_their_order():
    """Many small writes from the destination's application, the first waking both ends:
    the ones that come while the source's socket is re-adopted are held, then passed on
    in order."""
    mesh = Mesh()
    await mesh.start()
    f = await mesh.flow()
    await until(lambda: mesh.asleep(f))
    chunks = [os.urandom(1 + i % 700) for i in range(400)]
    for chunk in chunks:
        f.server_app.send(chunk)
        await asyncio.sleep(0)
    whole = b"".join(chunks)
    assert await read_all(f.client_app, len(whole)) == whole
    await exchange(f, 1000, 1000, b"after")


def sides_reading(stream: StreamTransport) -> list[Side]:
    """Every live `Side` whose transport is the stream (by exact type: a subclass does not
    count)."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Side and o.transport is stream]


@on_uvloop
async def test_an_asleep_flow_keeps_no_side_for_its_stream_and_wakes_with_one_joined():
    """Asleep, each relay is its stream's reader and no side of either stream is alive
    (the memory the sleep saves); woken, the stream reads into one new plain side
    joined to the relay, the frame reader's one-call path (views, `_side`) again, and
    it sleeps again the same way."""
    mesh = Mesh()
    await mesh.start()
    f = await mesh.flow()
    for rounds in range(2):
        await until(lambda: mesh.asleep(f))
        for stream, relay in ((f.source_stream, f.source),
                              (f.destination_stream, f.destination)):
            assert stream.protocol is relay
            assert stream._side is None and not stream._takes_views
            assert sides_reading(stream) == []
        await exchange(f, 300_001 + rounds, 200_003 + rounds, b"side %d" % rounds)
        for stream, relay, side in ((f.source_stream, f.source, f.source.upstream),
                                    (f.destination_stream, f.destination,
                                     f.destination.downstream)):
            assert type(side) is Side and side.relay is relay
            assert stream.protocol is side and stream._side is side
            assert stream._takes_views
            assert sides_reading(stream) == [side]


@on_uvloop
async def test_a_bare_fin_from_either_application_while_both_ends_sleep():
    """A half-close with no byte before it, from each application in turn, while both
    ends of its flow sleep: the FIN wakes the socket's end, the END_STREAM wakes the
    stream's end as an EOF, and the open direction then carries megabytes intact
    (SHA-256) before its own FIN."""
    mesh = Mesh()
    await mesh.start()
    loop = asyncio.get_running_loop()
    by_server, by_client = await mesh.flow(), await mesh.flow()
    await until(lambda: mesh.asleep(by_server) and mesh.asleep(by_client))
    for f, closer, other, n in ((by_server, "server_app", "client_app", 2_000_003),
                                (by_client, "client_app", "server_app", 1_500_007)):
        getattr(f, closer).shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(loop.sock_recv(getattr(f, other), 10), 5) == b""
        data = payload(closer.encode(), n)
        sent = loop.create_task(loop.sock_sendall(getattr(f, other), data))
        got = await read_all(getattr(f, closer), n)
        await sent
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        getattr(f, other).shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(loop.sock_recv(getattr(f, closer), 10), 5) == b""
        await until(lambda f=f: f.source.finished and f.destination.finished)
        expected = [n, 0] if closer == "server_app" else [0, n]
        assert f.counted["source"] == expected and f.counted["destination"] == expected
    assert mesh.naps.asleep == 0


@on_uvloop
async def test_a_hostile_peers_data_for_an_asleep_stream_arrives_exactly_or_resets():
    """DATA frames a peer node injects for an asleep stream (no END_STREAM): within the
    stream's window they reach the application exactly (SHA-256, the relay's count) and
    the flow goes on carrying both ways; past the window, the peer has broken flow
    control: the application is reset and never gets a byte beyond the window."""
    mesh = Mesh()
    await mesh.start()
    f, g = await mesh.flow(), await mesh.flow()
    await until(lambda: mesh.asleep(f) and mesh.asleep(g))
    injected = payload(b"injected", 40_000)
    sid = f.source_stream.stream_id
    mesh.client.data_received(frames.data_header(16_384, sid) + injected[:16_384]
                              + frames.data_header(40_000 - 16_384, sid)
                              + injected[16_384:])
    got = await read_all(f.client_app, len(injected))
    assert hashlib.sha256(got).digest() == hashlib.sha256(injected).digest()
    assert f.counted["source"] == [0, len(injected)]
    await exchange(f, 70_001, 90_001, b"after injected")
    await until(lambda: mesh.asleep(f) and mesh.asleep(g))
    # Past the window: the stream's own window is STREAM_WINDOW while asleep (nothing
    # credited for what the sleeping reader holds).
    flood = payload(b"flood", STREAM_WINDOW + 16_384)
    sid = g.source_stream.stream_id
    window = g.source_stream.receive_window
    wire = b"".join(frames.data_header(len(flood[i:i + 16_384]), sid) + flood[i:i + 16_384]
                    for i in range(0, len(flood), 16_384))
    mesh.client.data_received(wire)
    received = bytearray()
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        while chunk := await asyncio.wait_for(loop.sock_recv(g.client_app, 1 << 16), 5):
            received += chunk
    assert len(received) <= window and bytes(received) == flood[:len(received)]
    await until(lambda: g.source.finished)

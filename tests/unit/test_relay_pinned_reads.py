"""A peer node's tiny DATA frames against a destination that never reads (review7).

The tunnel hands a relay's side each DATA payload as a view of the read it came in
(tunnel/session.py's whole-frame path: no copy).  A view keeps its whole read alive, and
the relay's write buffer counts the view's length, not the read's: a peer that put one
1-byte DATA frame for a stalled stream in each read of 16 KiB (the rest for a stream that
flows) made the proxy hold 16 KiB per byte it buffered for the stalled stream, past the
512 KiB high-water mark that is meant to bound it.  Run with uvloop, as the daemon."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import tracemalloc

from nodeproxy.tcp.relay import Relay, Side
from tests.unit.test_tunnel_framing import Peer, Reader, Server, data_frame, on_uvloop

READS = 600
FLOWING_PER_READ = 16_384


async def held_while_sending(peer: Peer, stalled: int, flowing: int, flowing_reader: Reader,
                             byte: bytes) -> int:
    """READS tunnel reads, each a byte for the stalled stream and FLOWING_PER_READ for the
    flowing one (read on by its reader): the heap the proxy keeps for them, beyond what
    the flowing reader got."""
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        sent = 0
        for _ in range(READS):
            await peer.send(data_frame(stalled, byte)
                            + data_frame(flowing, os.urandom(FLOWING_PER_READ)))
            await asyncio.sleep(0)
            sent += FLOWING_PER_READ
            if len(flowing_reader.data) < sent - 1_000_000:
                await peer.pump(0.01)
        await peer.until(lambda: len(flowing_reader.data) == sent)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before - len(flowing_reader.data)
    finally:
        tracemalloc.stop()


@on_uvloop
async def test_one_byte_frames_for_a_stalled_stream_do_not_pin_whole_reads() -> None:
    loop = asyncio.get_running_loop()
    near, far = socket.socketpair()  # far: the destination pod, which never reads
    for sock, option in ((near, socket.SO_SNDBUF), (far, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)
    relays: list[Relay] = []
    flowing_reader = Reader()

    def on_request(sess, stream) -> None:
        sess.respond(stream, 200)
        if relays:
            stream.set_protocol(flowing_reader)
            return
        tunnel, pod = Side("tunnel"), Side("pod")
        relay = Relay(tunnel, pod, lambda *a: None, lambda r: None)
        relays.append(relay)
        stream.set_protocol(tunnel)
        loop.create_task(loop.create_connection(lambda: pod, sock=near)).add_done_callback(
            lambda _: relay.start())

    server = Server()
    server.on_request = on_request
    peer = Peer(await server.start())
    peer.conn.increment_flow_control_window(2**24)
    stalled = await peer.open()
    flowing = await peer.open()
    await peer.send(data_frame(stalled, os.urandom(64 * 1024)))  # fill the pod's socket
    for _ in range(20):
        await peer.pump(0.02)
    held = await held_while_sending(peer, stalled, flowing, flowing_reader, b"x")
    buffered = relays[0].upstream.transport.get_write_buffer_size()
    assert buffered >= READS // 2  # the stalled stream's bytes wait in the proxy
    # What the proxy holds for them is about what it counts (a few KiB), not a read each
    # (600 x 16 KiB = 9.8 MiB before).
    assert held < 2 * 1024 * 1024, (held, buffered)
    assert peer.goaway() is None
    near.close()
    far.close()


@on_uvloop
async def test_one_byte_frames_before_the_relay_joins_do_not_pin_whole_reads() -> None:
    """The same while the proxy is still dialling the destination: the tunnel's side
    holds what comes (Side.hold_early) until its relay joins; then every byte goes on."""
    loop = asyncio.get_running_loop()
    sides: list[Side] = []
    flowing_reader = Reader()

    def on_request(sess, stream) -> None:
        sess.respond(stream, 200)
        if sides:
            stream.set_protocol(flowing_reader)
            return
        sides.append(Side("tunnel"))
        stream.set_protocol(sides[0])

    server = Server()
    server.on_request = on_request
    peer = Peer(await server.start())
    peer.conn.increment_flow_control_window(2**24)
    stalled = await peer.open()
    flowing = await peer.open()
    held = await held_while_sending(peer, stalled, flowing, flowing_reader, b"y")
    assert held < 2 * 1024 * 1024, held
    near, far = socket.socketpair()
    pod = Side("pod")
    await loop.create_connection(lambda: pod, sock=near)
    Relay(sides[0], pod, lambda *a: None, lambda r: None).start()
    got = b""
    far.setblocking(False)
    while len(got) < READS:
        got += await asyncio.wait_for(loop.sock_recv(far, 65536), 5)
    assert got == b"y" * READS
    near.close()
    far.close()

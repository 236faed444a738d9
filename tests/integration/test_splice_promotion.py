"""A relayed flow promoted to the kernel splice once it has carried enough bytes
(fastPath.spliceAfterBytes: Splicer.offer, Promotion, Splicer.promote), with the real
programs and maps loaded into this process and the real relay and splicer in uvloop on
loopback sockets: client <-> [downstream | relay | upstream] <-> server.

The pods are hostile and fast: both stream from their first byte, so the promotion comes
with bytes in flight both ways; a client half-closes or either side resets right at the
threshold; a server stops reading so the proxy's write buffer is full when the flow is
due.  Judged as a user would: SHA-256 of every byte both ways, a reset reaching the
other side as a reset, the relay's byte counts (Python's plus the kernel's, added once
at the end) equal to what each side sent, the flow spliced when it carried enough and
not before, and no entry left in the splice maps once the flows ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct
from collections.abc import Iterator

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.capture.map_access import MapSet
from nodeproxy.capture.splice import SpliceMaps, socket_cookie
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.splicer import SpliceMetrics, Splicer
from tests.integration.test_splice_setup import entries, loaded

pytestmark = pytest.mark.privileged

__all__ = ["loaded"]  # the module's fixture: the programs loaded once

AFTER = 64 * 1024  # the shipped default of fastPath.spliceAfterBytes
LINGER_RESET = struct.pack("ii", 1, 0)
PODS = ("default/client", "default/web")
PACE = 0.002  # between a paced sender's chunks


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    peer.setblocking(False)
    ours.setblocking(False)
    return peer, ours


class Flow:
    """One proxied flow: the two pods' sockets, the relay between them, what it counted."""

    def __init__(self) -> None:
        self.counted = [0, 0]  # bytes from downstream, from upstream (Python and kernel)
        self.done = asyncio.get_running_loop().create_future()
        self.cookies: tuple[int, int] = (0, 0)
        self.was_spliced = False

    async def start(self, splicer: Splicer, small_buffers: bool = False) -> Relay:
        loop = asyncio.get_running_loop()
        self.client, down_sock = await tcp_pair()
        up_sock, self.server = await tcp_pair()
        if small_buffers:  # a stalled server fills the proxy's write buffer at once
            # (not tiny: a receive window of a few KiB stalls loopback TCP for its
            # persist timer)
            up_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.cookies = (socket_cookie(down_sock), socket_cookie(up_sock))
        down, up = Side("downstream"), Side("upstream")
        await loop.connect_accepted_socket(lambda: down, sock=down_sock)
        await loop.connect_accepted_socket(lambda: up, sock=up_sock)
        self.relay = Relay(down, up, self.count, self.end)
        self.relay.start()
        splicer.offer(self.relay, PODS)
        return self.relay

    def count(self, from_downstream: bool, n: int) -> None:
        self.counted[0 if from_downstream else 1] += n
        if self.relay.splice is not None:
            self.was_spliced = True

    def end(self, relay: Relay) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def send_all(sock: socket.socket, data: bytes, then: str = "fin",
                   pace: float = 0.0) -> None:
    """Send data in random-sized chunks (`pace` seconds apart: a sender the relay keeps
    up with, whose socket's queue empties between chunks), then a FIN (or a reset, or
    nothing)."""
    loop = asyncio.get_running_loop()
    rng = random.Random(len(data))
    at = 0
    while at < len(data):
        n = rng.choice((1, 57, 1000, 4096, 65536, 300_000))
        await loop.sock_sendall(sock, data[at:at + n])
        at += n
        if pace:
            await asyncio.sleep(pace)
    if then == "fin":
        sock.shutdown(socket.SHUT_WR)
    elif then == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()


async def receive_all(sock: socket.socket) -> tuple[str, bytes]:
    """Read until EOF: ("eof", bytes) or ("reset", bytes so far)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    try:
        while chunk := await loop.sock_recv(sock, 1 << 18):
            got += chunk
    except ConnectionResetError:
        return "reset", bytes(got)
    return "eof", bytes(got)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_splicer(loaded: MapSet, registry: CollectorRegistry, after: int = AFTER) -> Splicer:
    return Splicer(SpliceMaps(loaded), SpliceMetrics(registry), enabled=True,
                   after_bytes=after)


def spliced(registry: CollectorRegistry, event: str = "spliced") -> float:
    return registry.get_sample_value("nodeproxy_splice_flows_total", {"event": event}) or 0


async def finished(flow: Flow, seconds: float = 20) -> None:
    await asyncio.wait_for(asyncio.shield(flow.done), seconds)
    await asyncio.sleep(0)  # the relay's unlink


def no_entries_left(loaded: MapSet, splicer: Splicer, *flows: Flow) -> None:
    assert not splicer.flows
    for flow in flows:
        assert entries(loaded, *flow.cookies) == []
        assert flow.relay.splice is None and flow.relay.promotion is None


@pytest.mark.parametrize("up_size,down_size", [
    (3 * 1024 * 1024, 2 * 1024 * 1024),   # both ways at once, past the threshold
    (AFTER - 1, 5_000_000),                 # the client's direction alone stays below
    (0, 8_000_000),                         # one direction only
])
def test_a_flow_streaming_both_ways_is_promoted_mid_stream_intact_and_counted_once(
        loaded: MapSet, up_size: int, down_size: int):
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        flow = Flow()
        await flow.start(splicer)
        to_server, to_client = os.urandom(up_size), os.urandom(down_size)

        async def client() -> tuple[str, bytes]:
            # The client's FIN only after the answer: a flow half-closed before it is
            # due stays relayed (the sockhash refuses a socket in CLOSE_WAIT).
            await send_all(flow.client, to_server, then="none", pace=PACE)
            answer = await receive_all(flow.client)
            flow.client.shutdown(socket.SHUT_WR)
            return answer
        _, (how_s, at_server), (how_c, at_client) = await asyncio.gather(
            send_all(flow.server, to_client, pace=PACE), receive_all(flow.server),
            client())
        assert (how_s, how_c) == ("eof", "eof")
        assert sha(at_server) == sha(to_server) and sha(at_client) == sha(to_client)
        await finished(flow)
        assert flow.counted == [up_size, down_size]  # Python's and the kernel's, once
        assert spliced(registry) == 1 and flow.was_spliced
        no_entries_left(loaded, splicer, flow)
        for sock in (flow.client, flow.server):
            sock.close()
    uvloop.run(main())


def test_a_short_flow_is_never_spliced_and_an_idle_one_waits_relayed(loaded: MapSet):
    """The connect scenario's flow (25 bytes, 32 back, close) and an idle keep-alive:
    no map entry is ever made for them."""
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        loop = asyncio.get_running_loop()
        short, idle = Flow(), Flow()
        await short.start(splicer)
        await idle.start(splicer)
        await loop.sock_sendall(short.client, b"q" * 25)
        assert await loop.sock_recv(short.server, 100) == b"q" * 25
        await loop.sock_sendall(short.server, b"a" * 32)
        assert await loop.sock_recv(short.client, 100) == b"a" * 32
        short.client.shutdown(socket.SHUT_WR)
        short.server.shutdown(socket.SHUT_WR)
        await finished(short)
        await loop.sock_sendall(idle.client, b"x")
        assert await loop.sock_recv(idle.server, 10) == b"x"
        await asyncio.sleep(0.2)
        assert spliced(registry) == 0 and splicer.flows == set()
        assert short.counted == [25, 32] and idle.counted == [1, 0]
        assert idle.relay.promotion is not None  # still waiting to be busy
        assert entries(loaded, *short.cookies, *idle.cookies) == []
        idle.relay.close()
        await finished(idle)
        no_entries_left(loaded, splicer, short, idle)
        for flow in (short, idle):
            for sock in (flow.client, flow.server):
                sock.close()
    uvloop.run(main())


@pytest.mark.parametrize("extra", [-1, 0, 1, 4096])
@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_client_that_half_closes_or_resets_at_the_threshold(loaded: MapSet, extra: int,
                                                               how: str):
    """The client sends about the threshold and at once its FIN (the server then answers
    with 1 MB and closes) or a reset: whether the flow was promoted before the FIN or
    found it arriving, every byte arrives once, the FIN after them, a reset as a reset."""
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        flow = Flow()
        await flow.start(splicer)
        request, answer = os.urandom(AFTER + extra), os.urandom(1_000_000)
        await send_all(flow.client, request, then=how)
        how_s, at_server = await receive_all(flow.server)
        if how == "reset":
            assert how_s == "reset"
            assert at_server == request[:len(at_server)]  # a prefix, in order
            await finished(flow)
            flow.server.close()
        else:
            assert how_s == "eof" and sha(at_server) == sha(request)
            await send_all(flow.server, answer)
            how_c, at_client = await receive_all(flow.client)
            assert how_c == "eof" and sha(at_client) == sha(answer)
            await finished(flow)
            assert flow.counted == [len(request), len(answer)]
            flow.client.close()
            flow.server.close()
        no_entries_left(loaded, splicer, flow)
    uvloop.run(main())


def test_a_server_reset_right_after_the_promotion_reaches_the_client(loaded: MapSet):
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        flow = Flow()
        await flow.start(splicer)
        answer = os.urandom(AFTER + 10_000)
        await send_all(flow.server, answer, then="none")
        loop = asyncio.get_running_loop()
        got = bytearray()
        while len(got) < len(answer):
            got += await loop.sock_recv(flow.client, 1 << 18)
        assert sha(bytes(got)) == sha(answer)
        assert spliced(registry) == 1  # promoted once it carried AFTER
        flow.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        flow.server.close()
        how, rest = await receive_all(flow.client)
        assert (how, rest) == ("reset", b"")
        await finished(flow)
        assert flow.counted == [0, len(answer)]
        flow.client.close()
        no_entries_left(loaded, splicer, flow)
    uvloop.run(main())


@pytest.mark.parametrize("stall", [0.05, 0.5])
def test_a_flow_due_while_its_reader_stalls_never_delivers_a_byte_twice(
        loaded: MapSet, stall: float):
    """The server reads nothing for a while: the flow is due while the proxy's write
    buffer towards it holds bytes and the client's socket holds a segment the relay read
    only in part (uvloop reads 256,000 bytes at a time).  Spliced then, the kernel would
    hand that whole segment to the verdict and the server would get its first part twice
    (seen here before the check: 195,584 bytes twice in an 8 MB flow, in every run);
    so the flow is spliced only once no queue holds such a segment, or stays relayed.
    The bytes arrive once, in order, and are counted once."""
    async def main() -> None:
        registry = CollectorRegistry()
        # due past what the kernel's buffers hold (a few hundred KiB here) and before the
        # write buffer's high-water mark stops the client's side
        splicer = make_splicer(loaded, registry, after=1 << 19)
        flow = Flow()
        await flow.start(splicer, small_buffers=True)
        data = b"".join(i.to_bytes(8, "big") for i in range(1_000_000))  # positions
        sender = asyncio.ensure_future(send_all(flow.client, data))
        await asyncio.sleep(stall)
        how, got = await receive_all(flow.server)
        await sender
        assert how == "eof" and len(got) == len(data) and sha(got) == sha(data)
        flow.server.shutdown(socket.SHUT_WR)
        assert await receive_all(flow.client) == ("eof", b"")
        await finished(flow)
        assert flow.counted == [len(data), 0]
        assert spliced(registry) <= 1
        no_entries_left(loaded, splicer, flow)
        flow.client.close()
        flow.server.close()
    uvloop.run(main())


def test_a_flow_due_right_after_a_full_read_is_not_handed_a_segment_read_in_part(
        loaded: MapSet):
    """Deterministic: 2 MB wait in the client's socket before the relay reads; the flow
    is due at the relay's first read (256,000 bytes, which ends inside a segment), with
    nothing in its write buffers (big kernel buffers towards the server).  Spliced
    there, the kernel hands the verdict that segment whole and the server gets its first
    part twice; the check defers the splice until the queue holds no such segment."""
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry, after=1)
        loop = asyncio.get_running_loop()
        client, down_sock = await tcp_pair()
        up_sock, server = await tcp_pair()
        for sock, opt in ((up_sock, socket.SO_SNDBUF), (server, socket.SO_RCVBUF),
                          (client, socket.SO_SNDBUF), (down_sock, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        data = b"".join(i.to_bytes(8, "big") for i in range(250_000))  # 2 MB, positions
        sent = 0
        while sent < len(data):  # queued before the relay reads anything
            try:
                sent += client.send(data[sent:])
            except BlockingIOError:
                break
        down, up = Side("downstream"), Side("upstream")
        await loop.connect_accepted_socket(lambda: down, sock=down_sock)
        await loop.connect_accepted_socket(lambda: up, sock=up_sock)
        done = loop.create_future()
        counted = [0, 0]

        def count(from_downstream: bool, n: int) -> None:
            counted[0 if from_downstream else 1] += n
        relay = Relay(down, up, count, lambda _r: done.set_result(None))
        relay.start()
        splicer.offer(relay, PODS)
        rest = asyncio.ensure_future(loop.sock_sendall(client, data[sent:]))
        got = bytearray()
        while len(got) < len(data):
            chunk = await asyncio.wait_for(loop.sock_recv(server, 1 << 20), 5)
            assert chunk
            got += chunk
        await rest
        assert bytes(got) == data  # once, in order
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert await receive_all(server) == ("eof", b"")
        assert await receive_all(client) == ("eof", b"")
        await asyncio.wait_for(done, 10)
        assert counted == [len(data), 0]
        assert not splicer.flows
        for sock in (client, server):
            sock.close()
    uvloop.run(main())


def test_a_workload_opted_out_before_its_flow_is_due_is_never_spliced(loaded: MapSet):
    """A reload switching a workload's splice off while its flow is still relayed (the
    splicer's opted_out) or switching splicing off: the flow stays in Python."""
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        flows = [Flow(), Flow()]
        for flow in flows:
            await flow.start(splicer)
        splicer.opted_out.add(PODS[1])  # reload.py: web's splice now false
        data = os.urandom(2 * AFTER)
        await send_all(flows[0].client, data)
        splicer.opted_out.clear()
        splicer.enabled = False  # fastPath.splice off at reload
        await send_all(flows[1].client, data)
        for flow in flows:
            how, got = await receive_all(flow.server)
            assert how == "eof" and sha(got) == sha(data)
            flow.server.shutdown(socket.SHUT_WR)
            await finished(flow)
        assert spliced(registry) == 0
        no_entries_left(loaded, splicer, *flows)
        for flow in flows:
            flow.client.close()
            flow.server.close()
    uvloop.run(main())


def test_64_flows_around_the_threshold_with_half_closes_and_resets(loaded: MapSet):
    """64 flows at once, sizes spread around the threshold both ways, a quarter reset by
    the client at its end: every completed direction intact, every reset seen, nothing
    left in the maps, and the spliced ones exactly those that carried enough."""
    async def main() -> None:
        registry = CollectorRegistry()
        splicer = make_splicer(loaded, registry)
        rng = random.Random(20261207)
        flows = [Flow() for _ in range(64)]
        for flow in flows:
            await flow.start(splicer)

        async def one(flow: Flow) -> tuple[bool, bool]:
            up = os.urandom(rng.choice((10, AFTER // 2, AFTER - 1, AFTER, 3 * AFTER, 2_000_000)))
            down = os.urandom(rng.choice((0, 32, AFTER // 2, AFTER, 1_000_000)))
            resets = rng.random() < 0.25
            pace = rng.choice((0.0, PACE))
            results = await asyncio.gather(
                send_all(flow.client, up, then="reset" if resets else "fin", pace=pace),
                send_all(flow.server, down, pace=pace), receive_all(flow.server),
                *(() if resets else (receive_all(flow.client),)))
            how_s, at_server = results[2]
            if resets:
                assert how_s in ("reset", "eof") and at_server == up[:len(at_server)]
            else:
                how_c, at_client = results[3]
                assert (how_s, how_c) == ("eof", "eof")
                assert sha(at_server) == sha(up) and sha(at_client) == sha(down)
            await finished(flow, 30)
            if not resets:
                assert flow.counted == [len(up), len(down)]
            big = len(up) + len(down) >= AFTER
            assert big or not flow.was_spliced  # never before it carried enough
            return resets, big
        outcomes = await asyncio.gather(*(one(flow) for flow in flows))
        assert 0 < spliced(registry) <= sum(1 for _, big in outcomes if big)
        no_entries_left(loaded, splicer, *flows)
        for flow in flows:
            flow.client.close()
            flow.server.close()
    uvloop.run(main())


@pytest.fixture(autouse=True)
def _no_leaked_descriptors() -> Iterator[None]:
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) <= before + 2

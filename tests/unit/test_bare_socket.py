"""A socket taken out of its uvloop transport lives on untouched, and a new transport
reports what arrived meanwhile, in order, only once every socket of the group has one."""

from __future__ import annotations

import asyncio
import socket
import struct

import uvloop

from nodeproxy.tcp.bare_socket import adopt, borrowed, detach


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.events: list[tuple[str, object]] = []
        self.made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))


async def pair(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, asyncio.Transport,
                                                          Recorder]:
    """A plain peer socket and the other end in a uvloop transport."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    accepted.setblocking(False)
    transport, protocol = await loop.create_connection(Recorder, sock=accepted)
    return peer, transport, protocol


def test_detach_keeps_the_connection_and_adopt_replays_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        (peer_a, ta, pa), (peer_b, tb, pb) = await pair(loop), await pair(loop)
        socks = [detach(ta), detach(tb)]
        await asyncio.sleep(0.05)
        assert pa.events == [] and pb.events == []  # the old protocol hears nothing
        # No FIN, no reset reached the peers: they still talk to the kept sockets.
        peer_a.setblocking(False)
        try:
            assert peer_a.recv(1) == b""
            raise AssertionError("the peer saw a FIN")
        except BlockingIOError:
            pass
        peer_a.sendall(b"one")
        peer_a.sendall(b"two")
        peer_a.shutdown(socket.SHUT_WR)
        peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer_b.close()
        await asyncio.sleep(0.05)
        new_a, new_b = Recorder(), Recorder()
        await adopt(socks, [new_a, new_b])
        assert new_a.made == new_b.made == 0 and new_a.transport and new_b.transport
        new_a.transport.resume_reading()
        await asyncio.sleep(0.05)
        assert b"".join(d for k, d in new_a.events if k == "data") == b"onetwo"  # type: ignore[misc]
        assert new_a.events[-1] == ("eof", None)
        assert new_b.events == [("lost", "ConnectionResetError")]
        new_a.transport.write(b"back")
        new_a.transport.close()
        await asyncio.sleep(0.05)
        peer_a.setblocking(True)
        assert peer_a.recv(10) == b"back" and peer_a.recv(10) == b""
        peer_a.close()

    uvloop.run(main())


def test_adopting_a_closed_socket_reports_it_lost() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        peer, transport, _ = await pair(loop)
        sock = detach(transport)
        sock.close()  # e.g. the descriptor went away
        lost = Recorder()
        await adopt([sock], [lost])
        assert lost.transport is None and lost.events[0][0] == "lost"
        peer.close()

    uvloop.run(main())


def test_a_borrowed_descriptor_stays_open_and_answers() -> None:
    """An asleep spliced flow keeps only its sockets' descriptor numbers: a query through
    `borrowed` answers for the socket and leaves the descriptor open and the caller's."""
    a, b = socket.socketpair()
    fd = a.detach()
    try:
        for _ in range(3):
            with borrowed(fd) as sock:
                assert sock.fileno() == fd
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        b.sendall(b"still here")
        again = socket.socket(fileno=fd)
        assert again.recv(32) == b"still here"
        again.close()
    finally:
        b.close()


def test_adopting_a_closed_socket_object_is_lost_not_an_error() -> None:
    """A wake whose descriptor could not be taken back passes a closed socket: lost."""
    async def main() -> None:
        gone = socket.socket()
        gone.close()
        lost = Recorder()
        await adopt([gone], [lost])
        assert lost.transport is None and lost.events[0][0] == "lost"

    uvloop.run(main())


def test_detached_socket_is_what_the_kernel_says_without_asking_it_twice() -> None:
    """The kept socket's family, type and protocol are taken from the transport (no
    getsockopt for them), and they are the kernel's own: IPv4 and IPv6 alike, and the
    kept socket still reaches its peer."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            listener = socket.socket(family)
            listener.bind((host, 0))
            listener.listen()
            peer = socket.create_connection(listener.getsockname()[:2])
            accepted, _ = listener.accept()
            listener.close()
            accepted.setblocking(False)
            transport, _protocol = await loop.create_connection(Recorder, sock=accepted)
            kept = detach(transport)
            try:
                asked = socket.socket(fileno=kept.fileno())  # the kernel's answer
                try:
                    assert (kept.family, kept.type, kept.proto) == \
                        (asked.family, asked.type, asked.proto) == \
                        (family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                finally:
                    asked.detach()
                kept.setblocking(True)
                peer.sendall(b"still here")
                assert kept.recv(64) == b"still here"
            finally:
                kept.close()
                peer.close()

    uvloop.run(main())


def test_a_detach_that_fails_leaves_no_descriptor_behind(monkeypatch) -> None:
    """The socket object cannot be made (here: the descriptor table full for it): the
    duplicate is closed again, the transport keeps its socket."""
    import os

    from nodeproxy.tcp import bare_socket

    async def main() -> None:
        loop = asyncio.get_running_loop()
        peer, transport, _protocol = await pair(loop)
        before = set(os.listdir("/proc/self/fd"))

        def refuse(*_args: object, **_kwargs: object) -> socket.socket:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(bare_socket.socket, "socket", refuse)
        try:
            detach(transport)
        except OSError:
            pass
        else:
            raise AssertionError("detach should have failed")
        finally:
            monkeypatch.undo()
        assert set(os.listdir("/proc/self/fd")) == before
        assert not transport.is_closing()
        transport.close()
        peer.close()

    uvloop.run(main())

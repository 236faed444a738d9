"""tcp/dial.connect_socket: the dial's own non-blocking connect (uvloop's sock_connect
resolves every address in a thread pool).  On loopback, with the event loop the daemon
runs (uvloop): it connects, reports a refusal as connect() does, and a timeout leaves
nothing registered with the loop."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
import uvloop

from nodeproxy.tcp.dial import connect_socket


def _listener(backlog: int = 16) -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    return srv


def _client() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_it_connects_and_the_peer_sees_the_connection():
    async def main() -> None:
        with _listener() as srv, _client() as sock:
            await connect_socket(sock, srv.getsockname())
            peer, address = srv.accept()
            with peer:
                assert address == sock.getsockname()
                sock.send(b"x")
                assert peer.recv(1) == b"x"
    uvloop.run(main())


def test_a_refused_connect_raises_as_connect_does():
    async def main() -> None:
        with _listener() as srv:
            address = srv.getsockname()
        with _client() as sock, pytest.raises(ConnectionRefusedError) as caught:
            await connect_socket(sock, address)
        assert caught.value.errno == errno.ECONNREFUSED
    uvloop.run(main())


def test_a_timed_out_connect_leaves_no_writer_behind():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # A listener whose queue is full drops further SYNs: the next connect hangs.
        with _listener(backlog=0) as srv:
            fillers = []
            try:
                for _ in range(8):
                    filler = _client()
                    fillers.append(filler)
                    filler.connect_ex(srv.getsockname())
                with _client() as sock:
                    started = loop.time()
                    with pytest.raises(TimeoutError):
                        await connect_socket(sock, srv.getsockname(), timeout=0.3)
                    assert 0.25 <= loop.time() - started < 5
                    assert not loop.remove_writer(sock.fileno())  # nothing was left
                with _client() as sock:  # cancelled from outside: the same
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await connect_socket(sock, srv.getsockname(), timeout=60)
                    assert not loop.remove_writer(sock.fileno())
            finally:
                for filler in fillers:
                    filler.close()
    uvloop.run(main())


def test_on_host_a_connect_done_inside_connect_waits_for_nothing(monkeypatch):
    """A loopback connect is established before connect() returns: with on_host the dial
    asks getpeername() and registers no writer (so no epoll change, no loop turn)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _listener() as srv, _client() as sock:
            def no_writer(*args: object) -> None:
                raise AssertionError("the dial waited for writability")
            monkeypatch.setattr(loop, "add_writer", no_writer)
            await connect_socket(sock, srv.getsockname(), 5, on_host=True)
            monkeypatch.undo()
            peer, address = srv.accept()
            with peer:
                assert address == sock.getsockname()
                sock.send(b"x")
                assert peer.recv(1) == b"x"
    uvloop.run(main())


def test_on_host_a_refusal_and_a_dropped_syn_are_reported_as_before():
    """on_host changes nothing for a connect that did not complete: refused is
    ECONNREFUSED, a SYN the full listener dropped times out, nothing left registered."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _listener() as srv:
            address = srv.getsockname()
        with _client() as sock, pytest.raises(ConnectionRefusedError):
            await connect_socket(sock, address, 5, on_host=True)
        with _listener(backlog=0) as srv:
            fillers = []
            try:
                for _ in range(8):
                    filler = _client()
                    fillers.append(filler)
                    filler.connect_ex(srv.getsockname())
                with _client() as sock:
                    with pytest.raises(TimeoutError):
                        await connect_socket(sock, srv.getsockname(), 0.3, on_host=True)
                    assert not loop.remove_writer(sock.fileno())
            finally:
                for filler in fillers:
                    filler.close()
    uvloop.run(main())

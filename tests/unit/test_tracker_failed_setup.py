"""A connection whose set-up fails with an unexpected error (tcp/tracker.py): the client
gets a reset at once instead of a connection nobody reads or closes, the log names the
peer, and the other connections on the listener keep being served."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from nodeproxy.tcp.relay import Side
from nodeproxy.tcp.tracker import ConnectionTracker


async def _listen(tracker: ConnectionTracker, serve) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: tracker.client_side(serve), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


async def _outcome(sock: socket.socket, seconds: float) -> str:
    """What the client sees within `seconds`: 'reset', 'eof', a reply, or 'nothing'."""
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 100), seconds)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "nothing"
    return data.decode() if data else "eof"


@pytest.mark.parametrize("error", [RuntimeError("bug"), TypeError("bug"), KeyError("k")])
def test_a_failing_set_up_resets_its_client_and_the_next_connection_is_served(
        error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def serve(side: Side) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        assert side.transport is not None
        side.transport.write(b"served")

    async def main() -> tuple[str, str, str]:
        tracker = ConnectionTracker()
        server, port = await _listen(tracker, serve)
        try:
            first = _client(port)
            failed = await _outcome(first, 3.0)
            second = _client(port)
            served = await _outcome(second, 3.0)
            host, port_ = first.getsockname()[:2]
            peer = f"{host}:{port_}"
            first.close()
            second.close()
            return failed, served, peer
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="nodeproxy.tcp.tracker"):
        failed, served, peer = asyncio.run(main())
    assert failed == "reset"
    assert served == "served"
    host, port = peer.split(":")
    assert any(host in r.getMessage() and port in r.getMessage() and r.exc_info
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_set_up_that_returns_leaves_the_connection_to_whoever_took_it() -> None:
    """No reset when the set-up ends normally: the connection belongs to what it handed
    it to (here nothing closes it, so the client still sees it open)."""

    async def serve(side: Side) -> None:
        return None

    async def main() -> str:
        tracker = ConnectionTracker()
        server, port = await _listen(tracker, serve)
        try:
            sock = _client(port)
            seen = await _outcome(sock, 0.5)
            sock.close()
            return seen
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == "nothing"

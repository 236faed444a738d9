"""A finished HBONE stream is freed by reference counting alone: its StreamTransport and
the protocol on it (a relay's side in the daemon) hold each other while the stream is
open, and must let go when it ends, or every cross-node connection is a cycle left to
the cyclic collector (4-5 objects per connection in a daemon under the bench's
cross-node connect load, docs/benchmarks.md "The heap after a busy period").  Both real
tunnel ends over the mesh's TLS, through hbonecalls' short streams.

The streams are counted among the objects the collector tracks (`live_streams`), not
through weak references: the compiled build's StreamTransport (nodeproxy/native.py) is
a native class, which takes none, and whose __init__ cannot be wrapped."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from nodeproxy.tunnel import session
from nodeproxy_dev.bench import hbonecalls


def live_streams() -> int:
    """StreamTransports alive (each is tracked by the cyclic collector, compiled or not)."""
    return sum(1 for o in gc.get_objects() if type(o) is session.StreamTransport)


def test_finished_streams_and_their_protocols_are_freed_without_the_collector(
        capsys: pytest.CaptureFixture[str]) -> None:
    gc.collect()
    before = live_streams()
    gc.disable()
    try:
        assert hbonecalls.main(["--streams", "64", "--connections", "4"]) == 0
        alive = live_streams() - before
    finally:
        gc.enable()
    assert "64 streams, 4 at once" in capsys.readouterr().out
    assert alive == 0


def test_a_relay_sides_stream_is_freed_too() -> None:
    """The same with a relay's side reading the stream (the tunnel keeps it twice: as
    the protocol and for the whole-frame path), DATA through the whole-frame path both
    ways: after both ends finish, the stream objects and the sides are gone without the
    collector."""
    import asyncio
    import socket

    from nodeproxy.tcp.relay import Side

    class Echo(Side):
        def data_received(self, data: Any) -> None:
            self.transport.write(bytes(data))

        def eof_received(self) -> bool:
            self.transport.write_eof()
            return True

    class Back(Side):
        def __init__(self) -> None:
            super().__init__("tunnel")
            self.got = bytearray()
            self.ended = asyncio.get_event_loop().create_future()

        def data_received(self, data: Any) -> None:
            self.got += data

        def eof_received(self) -> bool:
            self.ended.set_result(None)
            return True

    refs: list[weakref.ref[Any]] = []

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()

        def on_request(sess: session.H2Session, stream: session.StreamTransport) -> None:
            sess.respond(stream, 200)
            side = Echo("tunnel")
            stream.set_protocol(side)
            refs.append(weakref.ref(side))

        server = session.H2Session(client_side=False, on_request=on_request)
        await loop.create_connection(lambda: server, sock=a)
        client = session.H2Session(client_side=True)
        await loop.create_connection(lambda: client, sock=b)
        stream = client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        await asyncio.wait_for(stream.response, 10)
        back = Back()
        stream.set_protocol(back)
        for i in range(50):
            stream.write(b"%d;" % i)
            await asyncio.sleep(0)
        stream.write_eof()
        await asyncio.wait_for(back.ended, 10)
        got = bytes(back.got)
        refs.append(weakref.ref(back))
        counted.append(live_streams())
        del stream, back
        for _ in range(5):
            await asyncio.sleep(0)
        client.close()
        server.close()
        await asyncio.sleep(0.05)
        return got

    counted: list[int] = []
    gc.collect()
    before = live_streams()
    gc.disable()
    try:
        got = asyncio.run(main())
        alive = [ref() for ref in refs if ref() is not None]
        streams_alive = live_streams() - before
    finally:
        gc.enable()
    assert got == b"".join(b"%d;" % i for i in range(50))
    assert counted and counted[0] - before >= 1  # the count sees the one still held
    assert alive == []
    assert streams_alive == 0

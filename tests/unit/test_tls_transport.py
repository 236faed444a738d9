"""The MemoryBIO TLS transport HBONE runs on, over real loopback sockets and the mesh's
own contexts: bytes intact both ways through backpressure, identities, close_notify, and
every handshake refusal raised and labelled as before (tls.classify_handshake_error)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from nodeproxy.identity import (
    CertificateManager,
    MeshCA,
    SpiffeId,
    classify_handshake_error,
    client_context,
    server_context,
    tls_transport,
    verify_peer,
)
from nodeproxy.identity.tls import build_context

TD = "cluster.local"
TIMEOUT = 5.0
CART = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.generate(TD)


@pytest.fixture()
def manager(ca: MeshCA) -> CertificateManager:
    return CertificateManager(ca, TD, ttl_seconds=3600)


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop_kind: str) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main(), 30)
    return (uvloop.run if loop_kind == "uvloop" else asyncio.run)(bounded())


class Collector(asyncio.Protocol):
    """Hashes what it receives; pauses its reading now and then (backpressure)."""

    def __init__(self, pause_every: int = 0):
        self.transport: asyncio.Transport | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof = False
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.paused_writing = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self._pause_every = pause_every
        self._next_pause = pause_every

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)
        if self._pause_every and self.received >= self._next_pause:
            self._next_pause += self._pause_every
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.005, self.transport.resume_reading)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def pause_writing(self) -> None:
        self.paused_writing += 1
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def send(self, payload: bytes, chunk: int) -> None:
        assert self.transport is not None
        for i in range(0, len(payload), chunk):
            await self.can_write.wait()
            self.transport.write(payload[i:i + chunk])


async def _listener() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    return listener, listener.getsockname()[1]


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_bulk_both_ways_intact(manager: CertificateManager, loop_kind: str) -> None:
    up, down = os.urandom(6 * 1024 * 1024 + 123), os.urandom(3 * 1024 * 1024 + 7)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        listener, port = await _listener()
        server = Collector(pause_every=512 * 1024)
        client = Collector(pause_every=256 * 1024)

        async def serve() -> tls_transport.TlsTransport:
            conn, _ = await loop.sock_accept(listener)
            return await tls_transport.accept(server, server_context(manager, "shop", "cart"),
                                              conn, handshake_timeout=TIMEOUT)

        accepting = asyncio.create_task(serve())
        client_transport = await tls_transport.connect(
            client, client_context(manager, "web", "frontend"), "127.0.0.1", port,
            handshake_timeout=TIMEOUT)
        server_transport = await accepting
        listener.close()
        # Small writes (one turn's ciphertext is sent at once) and large ones.
        await asyncio.gather(server.send(down, 1000), client.send(up, 200_000))
        while server.received < len(up) or client.received < len(down):
            await asyncio.sleep(0.01)
        seen = {
            "client_peer": verify_peer(client_transport.get_extra_info("ssl_object"), TD,
                                       expected=CART),
            "server_peer": verify_peer(server_transport.get_extra_info("ssl_object"), TD),
            "cipher": client_transport.get_extra_info("cipher"),
            "peername": server_transport.get_extra_info("peername"),
            "paused": client.paused_writing + server.paused_writing,
            "up": server.digest.digest(), "down": client.digest.digest(),
            "up_len": server.received, "down_len": client.received,
            "can_write_eof": client_transport.can_write_eof(),
            # No resumption between nodes: the server sends no ticket.
            "ticket": getattr(client_transport.get_extra_info("ssl_object").session,
                              "has_ticket", False),
        }
        client_transport.close()        # close_notify: the server sees EOF, then the end
        seen["server_lost"] = await asyncio.wait_for(server.lost, TIMEOUT)
        seen["server_eof"] = server.eof
        seen["client_lost"] = await asyncio.wait_for(client.lost, TIMEOUT)
        return seen

    seen = run(main, loop_kind)
    assert (seen["up_len"], seen["down_len"]) == (len(up), len(down))
    assert seen["up"] == hashlib.sha256(up).digest()
    assert seen["down"] == hashlib.sha256(down).digest()
    assert seen["client_peer"] == SpiffeId(TD, "shop", "cart")
    assert seen["server_peer"] == SpiffeId(TD, "web", "frontend")
    assert seen["cipher"][1] == "TLSv1.3"
    assert seen["peername"][0] == "127.0.0.1"
    assert seen["paused"] > 0           # the writers met backpressure and went on
    assert seen["can_write_eof"] is False
    assert seen["ticket"] is False
    assert seen["server_eof"] is True and seen["server_lost"] is None
    assert seen["client_lost"] is None


def _untrusted_context(mesh: MeshCA, server_side: bool) -> ssl.SSLContext:
    """Trusts the mesh's root but presents a leaf of another CA (same trust domain)."""
    leaf = MeshCA.generate(TD).issue("spiffe://cluster.local/ns/web/sa/frontend", 3600)
    return build_context(leaf, mesh.trust_anchor_pem, server_side=server_side)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_refusals_are_raised_and_labelled(ca: MeshCA, manager: CertificateManager,
                                          loop_kind: str) -> None:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        listener, port = await _listener()
        server_reasons: list[str] = []
        served: list[Collector] = []

        async def serve_one(conn: socket.socket) -> None:
            proto = Collector()
            try:
                await tls_transport.accept(proto, server_context(manager, "shop", "cart"),
                                           conn, handshake_timeout=0.5)
            except Exception as e:  # noqa: BLE001 - labelled as the listener does
                server_reasons.append(classify_handshake_error(e))
                return
            served.append(proto)

        async def accept_loop() -> None:
            tasks = set()
            while True:
                conn, _ = await loop.sock_accept(listener)
                task = asyncio.create_task(serve_one(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def wait_reasons(n: int) -> list[str]:
            for _ in range(300):
                if len(server_reasons) >= n:
                    break
                await asyncio.sleep(0.01)
            return list(server_reasons)

        acceptor = asyncio.create_task(accept_loop())
        seen: dict[str, Any] = {}
        # A client certificate from another CA: the server refuses it; in TLS 1.3 the
        # client learns it as an error after its own handshake finished.
        client = Collector()
        await tls_transport.connect(client, _untrusted_context(ca, False), "127.0.0.1", port,
                                    handshake_timeout=TIMEOUT)
        lost = await asyncio.wait_for(client.lost, TIMEOUT)
        seen["client_side"] = classify_handshake_error(lost) if lost else None
        seen["untrusted"] = await wait_reasons(1)
        # Garbage, a stalled ClientHello, a peer that leaves mid-handshake.
        for i, (data, close) in enumerate(((b"GET / HTTP/1.1\r\n\r\n", False),
                                           (b"\x16", False), (b"\x16\x03\x01", True))):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            await writer.drain()
            if close:
                writer.close()
            else:
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
                writer.close()
            await wait_reasons(2 + i)
        seen["early"] = await wait_reasons(4)
        # The client refuses a server from another CA: raised from connect itself.
        evil_listener, evil_port = await _listener()

        async def evil() -> None:
            conn, _ = await loop.sock_accept(evil_listener)
            try:
                await tls_transport.accept(Collector(), _untrusted_context(ca, True), conn,
                                           handshake_timeout=TIMEOUT)
            except Exception:  # noqa: BLE001 - the client's refusal, expected
                pass

        evil_task = asyncio.create_task(evil())
        with pytest.raises(ssl.SSLError) as info:
            await tls_transport.connect(Collector(), client_context(manager, "web", "frontend"),
                                        "127.0.0.1", evil_port, handshake_timeout=TIMEOUT)
        seen["client_refused"] = classify_handshake_error(info.value)
        await asyncio.wait_for(evil_task, TIMEOUT)
        evil_listener.close()
        # A server that never answers: the client's handshake times out.
        mute = socket.create_server(("127.0.0.1", 0))
        with pytest.raises(TimeoutError) as timeout_info:
            await tls_transport.connect(Collector(), client_context(manager, "web", "frontend"),
                                        "127.0.0.1", mute.getsockname()[1],
                                        handshake_timeout=0.3)
        seen["client_timeout"] = classify_handshake_error(timeout_info.value)
        mute.close()
        seen["served"] = len(served)
        acceptor.cancel()
        listener.close()
        return seen

    seen = run(main, loop_kind)
    assert seen["untrusted"] == ["untrusted_ca"]
    assert seen["client_side"] == "peer_rejected"
    assert sorted(seen["early"][1:]) == ["connection_closed", "protocol_error", "timeout"]
    assert seen["client_refused"] == "untrusted_ca"
    assert seen["client_timeout"] == "timeout"
    assert seen["served"] == 0          # no refused peer ever reached the protocol


def test_peer_vanishing_without_close_notify_ends_the_protocol(
        manager: CertificateManager) -> None:
    async def main() -> tuple[bool, Any, int]:
        loop = asyncio.get_running_loop()
        listener, port = await _listener()
        server = Collector()

        async def serve() -> tls_transport.TlsTransport:
            conn, _ = await loop.sock_accept(listener)
            return await tls_transport.accept(server, server_context(manager, "shop", "cart"),
                                              conn, handshake_timeout=TIMEOUT)

        accepting = asyncio.create_task(serve())
        raw = socket.create_connection(("127.0.0.1", port))
        dup = raw.dup()             # the transport's socket cannot be shut down through it
        client = Collector()
        transport = await tls_transport.handshake_connected(
            client, client_context(manager, "web", "frontend"), raw,
            handshake_timeout=TIMEOUT)
        await accepting
        transport.write(b"x" * 1000)
        while server.received < 1000:
            await asyncio.sleep(0.01)
        # The client's TCP goes away with no TLS close_notify (a crashed node).
        dup.shutdown(socket.SHUT_WR)
        lost = await asyncio.wait_for(server.lost, TIMEOUT)
        dup.close()
        transport.abort()
        listener.close()
        return server.eof, lost, server.received

    eof, lost, received = run(main, "uvloop")
    assert received == 1000
    assert eof is True
    assert lost is None


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_turns_first_write_leaves_at_once_the_rest_in_one_send(
        manager: CertificateManager, loop_kind: str) -> None:
    """A lone small write is not held to the end of the event-loop turn (that would add a
    turn to every message's latency); the turn's later writes wait for its end and leave
    together, and so does the first write of a turn after a busy one (load). A burst of
    small writes arrives intact and in order."""

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        listener, port = await _listener()
        server, client = Collector(), Collector()

        async def serve() -> tls_transport.TlsTransport:
            conn, _ = await loop.sock_accept(listener)
            return await tls_transport.accept(server, server_context(manager, "shop", "cart"),
                                              conn, handshake_timeout=TIMEOUT)

        accepting = asyncio.create_task(serve())
        transport = await tls_transport.connect(
            client, client_context(manager, "web", "frontend"), "127.0.0.1", port,
            handshake_timeout=TIMEOUT)
        await accepting
        listener.close()
        await asyncio.sleep(0.05)       # the handshake's last bytes are out
        sent = bytearray()
        seen: dict[str, Any] = {}
        transport.write(b"first")
        sent += b"first"
        seen["held_after_first"] = transport.get_write_buffer_size()
        for i in range(1000):
            chunk = i.to_bytes(2, "big") * (1 + i % 7)
            transport.write(chunk)
            sent += chunk
        seen["held_after_burst"] = transport.get_write_buffer_size()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen["held_after_turn"] = transport.get_write_buffer_size()
        # After a busy turn (load) the next turn's lone write is batched too; after a
        # turn with one write, a lone write leaves at once again.
        transport.write(b"after-burst")
        sent += b"after-burst"
        seen["held_after_busy_turn"] = transport.get_write_buffer_size()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        transport.write(b"quiet")
        sent += b"quiet"
        seen["held_after_quiet_turn"] = transport.get_write_buffer_size()
        while server.received < len(sent):
            await asyncio.sleep(0.01)
        seen["digest"] = server.digest.digest()
        seen["expected"] = hashlib.sha256(sent).digest()
        transport.close()
        await asyncio.wait_for(server.lost, TIMEOUT)
        return seen

    seen = run(main, loop_kind)
    assert seen["held_after_first"] == 0     # sent before the turn ended
    assert seen["held_after_burst"] > 0      # batched behind it
    assert seen["held_after_turn"] == 0
    assert seen["held_after_busy_turn"] > 0
    assert seen["held_after_quiet_turn"] == 0
    assert seen["digest"] == seen["expected"]


async def _pair(manager: CertificateManager, server: asyncio.Protocol,
                client: asyncio.Protocol) -> tuple[tls_transport.TlsTransport,
                                                   tls_transport.TlsTransport]:
    """A connected client and server transport over loopback (server's is the second)."""
    loop = asyncio.get_running_loop()
    listener, port = await _listener()

    async def serve() -> tls_transport.TlsTransport:
        conn, _ = await loop.sock_accept(listener)
        return await tls_transport.accept(server, server_context(manager, "shop", "cart"),
                                          conn, handshake_timeout=TIMEOUT)

    accepting = asyncio.create_task(serve())
    transport = await tls_transport.connect(
        client, client_context(manager, "web", "frontend"), "127.0.0.1", port,
        handshake_timeout=TIMEOUT)
    served = await accepting
    listener.close()
    await asyncio.sleep(0.05)       # the handshake's last bytes are out
    return transport, served


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_busy_turns_small_writes_are_one_record_in_order_with_large_ones(
        manager: CertificateManager, loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a turn's small writes become one TLS record (a record per write costs
    both ends a record's work each): the ciphertext of 1000 small writes in one turn
    carries far less than the ~22 bytes of record overhead each would have. Large writes
    in between (past RECORD, encrypted at once from the caller's bytes) keep their place:
    the receiver gets every byte in order, before the close_notify that follows them."""
    cipher_in = {"bytes": 0}
    original = tls_transport._TlsRecords.buffer_updated

    def counting(self: Any, nbytes: int) -> None:
        cipher_in["bytes"] += nbytes
        original(self, nbytes)

    monkeypatch.setattr(tls_transport._TlsRecords, "buffer_updated", counting)

    async def main() -> dict[str, Any]:
        server, client = Collector(), Collector()
        transport, _ = await _pair(manager, server, client)
        # A busy turn first: the next turn's writes are all held to its end.
        for _ in range(3):
            transport.write(b"warm")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        while server.received < 12:
            await asyncio.sleep(0.01)
        before = cipher_in["bytes"]
        sent = bytearray(b"warm" * 3)
        small = 0
        for i in range(1000):
            chunk = i.to_bytes(2, "big") * (1 + i % 7)
            transport.write(chunk)
            sent += chunk
            small += len(chunk)
        seen = {"held": transport.get_write_buffer_size()}
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        while server.received < len(sent):
            await asyncio.sleep(0.01)
        seen["overhead"] = cipher_in["bytes"] - before - small
        # Small and large writes mixed in one turn, a memoryview of a buffer the caller
        # reuses among them, then close at once: order kept, nothing lost.
        scratch = bytearray(b"A" * 100)
        for i in range(50):
            chunk = os.urandom(1 + i * 37) if i % 5 else os.urandom(tls_transport.RECORD + i)
            transport.write(chunk)
            sent += chunk
            transport.write(memoryview(scratch)[:10])
            sent += scratch[:10]
            scratch[:10] = os.urandom(10)     # reused: what was written must not change
        transport.close()
        await asyncio.wait_for(server.lost, TIMEOUT)
        seen["eof"] = server.eof
        seen["digest"] = server.digest.digest()
        seen["expected"] = hashlib.sha256(sent).digest()
        return seen

    seen = run(main, loop_kind)
    assert seen["held"] > 0
    # One record per write would be >= 22 000 bytes of overhead; a record per 16 KiB is
    # one or two.
    assert seen["overhead"] < 200
    assert seen["digest"] == seen["expected"]


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_held_small_writes_are_dropped_by_abort_and_counted_until_sent(
        manager: CertificateManager, loop_kind: str) -> None:
    """The write buffer size counts held plaintext; abort drops it (the peer sees the
    connection end, none of the held bytes, and no error in this process)."""

    async def main() -> dict[str, Any]:
        server, client = Collector(), Collector()
        transport, _ = await _pair(manager, server, client)
        for _ in range(3):
            transport.write(b"warm")          # a busy turn: the next turn's writes wait
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        while server.received < 12:
            await asyncio.sleep(0.01)
        transport.write(b"x" * 100)
        transport.write(b"y" * 100)
        seen = {"held": transport.get_write_buffer_size()}
        transport.abort()
        await asyncio.sleep(0)
        await asyncio.wait_for(server.lost, TIMEOUT)
        seen["received"] = server.received
        return seen

    seen = run(main, loop_kind)
    assert seen["held"] >= 200
    assert seen["received"] == 12


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_large_write_is_encrypted_in_slices_the_bio_never_holds_it_whole(
        manager: CertificateManager, loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory BIO keeps the largest size it ever held until its connection closes, so a
    pooled HBONE connection that once took an 8 MiB write (a turn of eight bulk streams)
    would keep 8 MiB: writes are encrypted FLUSH_AT at a time, the ciphertext sent between
    slices. Whole writes of 4 MiB and 3 MiB + 5 (the turn's first, then a later one) and
    a memoryview: every byte arrives, in order."""
    largest = {"plain": 0, "pending": 0}

    class Recording:
        """The C object under an SSLObject (what the records call), its writes measured."""

        def __init__(self, inner: Any):
            self._inner = inner

        def write(self, data: Any) -> int:
            largest["plain"] = max(largest["plain"], len(data))
            written: int = self._inner.write(data)
            return written

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    original_wrap = ssl.SSLContext.wrap_bio

    def wrapping(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        sslobj = original_wrap(self, *args, **kwargs)
        sslobj._sslobj = Recording(sslobj._sslobj)  # type: ignore[attr-defined]
        return sslobj

    monkeypatch.setattr(ssl.SSLContext, "wrap_bio", wrapping)
    original_send = tls_transport._TlsRecords._send

    def measuring(self: Any) -> None:
        largest["pending"] = max(largest["pending"], self.outgoing.pending)
        original_send(self)

    monkeypatch.setattr(tls_transport._TlsRecords, "_send", measuring)

    async def main() -> dict[str, Any]:
        server, client = Collector(), Collector()
        transport, _ = await _pair(manager, server, client)
        big, bigger = os.urandom(4 * 1024 * 1024), os.urandom(3 * 1024 * 1024 + 5)
        transport.write(big)                       # the turn's first write
        transport.write(memoryview(bigger))        # a later one in the same turn
        sent = big + bigger
        while server.received < len(sent):
            await asyncio.sleep(0.01)
        transport.close()
        await asyncio.wait_for(server.lost, TIMEOUT)
        return {"digest": server.digest.digest(), "expected": hashlib.sha256(sent).digest()}

    seen = run(main, loop_kind)
    assert seen["digest"] == seen["expected"]
    assert 0 < largest["plain"] <= tls_transport.FLUSH_AT
    # At most a slice's ciphertext on top of what had not reached FLUSH_AT yet.
    assert largest["pending"] < 2 * tls_transport.FLUSH_AT + 4096


def test_the_records_call_the_c_object_under_ssl_sslobject() -> None:
    """The records call `SSLObject._sslobj`'s read, write and pending directly (no Python
    wrapper frame per call); if a Python release renames or reshapes that attribute, this
    fails naming it instead of the transport breaking at run time."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    sslobj = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=None)
    inner = sslobj._sslobj  # type: ignore[attr-defined]
    for name in ("read", "write", "pending"):
        assert callable(getattr(inner, name, None)), f"ssl.SSLObject._sslobj.{name} is gone"
    assert inner.pending() == 0
    with pytest.raises(ssl.SSLWantReadError):
        inner.read(16, bytearray(16))
    # The wrappers the records skip still only forward (what they would have added).
    import inspect
    for name in ("read", "write", "pending"):
        assert "self._sslobj." + name in inspect.getsource(getattr(ssl.SSLObject, name))

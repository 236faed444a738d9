"""The TLS transport HBONE runs on: `ssl.MemoryBIO` records over a plain TCP transport.

Why not uvloop's own SSL transport (``loop.create_connection(ssl=...)``): it decrypts one
16 KiB record per `SSLObject.read(256 KiB)` call, each of which allocates a 256 KiB bytes and
shrinks it, then joins the records into yet another bytes; on a bulk HBONE stream the
receiving node spent 2–3× the CPU per byte of this module (docs/benchmarks.md, "TLS layer
under HBONE"). Here:

- The socket is read into a 256 KiB buffer (a `BufferedProtocol`), all of it given to
  OpenSSL at once; every complete record is decrypted *into* a 256 KiB plaintext buffer
  (`SSLObject.read(n, buffer)`: no allocation per record), and each full buffer, then the
  rest, reaches the protocol as one `bytes`: one copy per byte. The two buffers are shared
  by every connection of the thread (`_thread_buffers`): their content matters only from a read
  to the copy that follows it, with no other code in between, so an idle connection holds
  none of them.
- The first write of an event-loop turn is encrypted and goes to the socket at once (a
  lone small message waits for nothing) unless the previous turn that wrote had several
  writes (load). The turn's other writes wait for its end and leave in one `write`, so
  under load a burst of HTTP/2 frames is one `send`, as a quiet flow's message is. Small
  ones (below `RECORD`, a TLS record's most plaintext) wait as plaintext and are encrypted
  together into one record at the end of the turn (or once `RECORD` bytes are held): a
  record costs OpenSSL and the `SSLObject` wrappers the same whether it carries 60 bytes
  or 16 KiB, on both ends, so a loaded tunnel's many small frames (one per request of a
  relayed HTTP connection) become one record instead of one each. A large write is
  encrypted at once from the caller's bytes (no join, no copy), after what was held, at
  most `FLUSH_AT` bytes at a time; at most `FLUSH_AT` bytes of ciphertext wait (a memory
  BIO never gives back the size it once reached). Flow control is the TCP transport's: its
  pause_writing and resume_writing reach the protocol unchanged, and the write buffer
  size counts the plaintext and ciphertext not yet handed over too.
- TLS 1.3 only (the contexts of `nodeproxy.identity.tls`): no renegotiation; no
  half-close (`can_write_eof` is False); `close` sends close_notify, then closes once the
  queued bytes are out; a close_notify from the peer is `eof_received`, then a close.

The handshake's failure is raised to the caller as the `ssl` exception it is (or
TimeoutError after `handshake_timeout`, ConnectionResetError if the peer closes), the socket
closed, so `tls.classify_handshake_error` labels it as before. A TLS error after the
handshake (in TLS 1.3 a client learns that the server refused its certificate this way)
reaches the protocol's `connection_lost` as that exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from nodeproxy.stream_protocol import StreamProtocol

READ_BUFFER = 256 * 1024     # ciphertext read from the socket at once
PLAIN_BUFFER = 256 * 1024    # plaintext decrypted before it is handed to the protocol
FLUSH_AT = 256 * 1024        # ciphertext sent at once rather than at the end of the turn
RECORD = 16 * 1024           # a TLS record's most plaintext: smaller writes are coalesced


# The thread's read buffers (see the module docstring).  A plain threading.local with
# attributes, not a subclass of it: mypyc compiles a subclass of that C type into a class
# on which isinstance() crashes the interpreter (tests/unit/test_native.py walks every
# object with isinstance to keep it so).
_THREAD = threading.local()


def _thread_buffers() -> tuple[memoryview, memoryview]:
    """This thread's two read buffers (ciphertext, plaintext), made on first use."""
    buffers: tuple[memoryview, memoryview] | None = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = (memoryview(bytearray(READ_BUFFER)), memoryview(bytearray(PLAIN_BUFFER)))
        _THREAD.buffers = buffers
    return buffers


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class TlsTransport(asyncio.Transport):
    """The protocol's side: plaintext in and out over `_TlsRecords`' TCP transport.

    `write` is the records' own method (an instance attribute: one Python call per write,
    not two, on the tunnel's per-message path); it drops what is written once the
    transport is closing, so a caller need not ask `is_closing` first
    (`drops_writes_when_closing`)."""

    drops_writes_when_closing = True

    def __init__(self, records: _TlsRecords):
        super().__init__()
        self._records = records
        self.write = records.write  # type: ignore[method-assign]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._records.extra(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._records.write(data)  # shadowed per instance by the records' write (above)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self._records.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def is_closing(self) -> bool:
        return self._records.closing

    def close(self) -> None:
        self._records.close()

    def abort(self) -> None:
        self._records.abort(None)

    def pause_reading(self) -> None:
        self._records.pause_reading()

    def resume_reading(self) -> None:
        self._records.resume_reading()

    def is_reading(self) -> bool:
        return not self._records.reading_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._records.tcp().set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._records.tcp().get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        records = self._records
        return records.tcp().get_write_buffer_size() + records.outgoing.pending + records.held

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._records.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._records.app  # type: ignore[return-value]


class _TlsRecords(asyncio.BufferedProtocol):
    """The TCP side: ciphertext in and out; runs the handshake, then the records."""

    def __init__(self, app: StreamProtocol, context: ssl.SSLContext, *, server_side: bool,
                 waiter: asyncio.Future):
        self.app = app
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # No SNI from a client: the server's SPIFFE ID is what is checked (tls.verify_peer).
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=None)
        # The records' calls go to the C object under ssl.SSLObject: its read, write and
        # pending are one-line Python wrappers (a Python frame each, three per message
        # through a daemon).  CPython's own asyncio.sslproto calls the same object the
        # same way; test_tls_transport.py fails if the attribute goes away.
        self._ssl: Any = self.sslobj._sslobj  # type: ignore[attr-defined]
        self.transport: asyncio.Transport | None = None
        self.app_transport = TlsTransport(self)
        self.closing = False
        self.reading_paused = False
        self._waiter = waiter
        waiter.add_done_callback(_retrieve)   # a handshake abandoned by its caller too
        self._handshaken = False      # app.connection_made was called
        self._lost = False            # app.connection_lost was called
        self._error: BaseException | None = None
        self._flush_scheduled = False
        self._turn_writes = 0         # writes in the current turn
        # Small writes of this turn not encrypted yet (see the module docstring).
        self._held: list[bytes] = []
        self.held = 0                 # their bytes
        self._busy = False            # the last turn that wrote had several writes
        self._loop = asyncio.get_running_loop()
        self._buffers = _thread_buffers()

    def tcp(self) -> asyncio.Transport:
        if self.transport is None:
            raise RuntimeError("the TLS transport has no connection yet")
        return self.transport

    def extra(self, name: str, default: Any) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        if name == "compression":
            return self.sslobj.compression()
        return self.tcp().get_extra_info(name, default)

    # -- TCP protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        # The thread's shared buffers (a reference, not a buffer of this connection's own).
        self._buffers = _thread_buffers()
        return self._buffers[0]

    def buffer_updated(self, nbytes: int) -> None:
        self.incoming.write(self._buffers[0][:nbytes])
        if not self._handshaken:
            self._handshake()
            if not self._handshaken:
                return
        if not self.reading_paused:
            self._decrypt()

    def eof_received(self) -> bool:
        # The peer closed TCP without a close_notify (a truncation, or a peer that died).
        if not self._handshaken:
            self._fail(ConnectionResetError("the peer closed the connection during the "
                                            "TLS handshake"))
        elif not self.closing:
            self.app.eof_received()
            self.abort(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError(
                "the connection was lost during the TLS handshake"))
        if self._handshaken and not self._lost:
            self._lost = True
            self.app.connection_lost(exc or self._error)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # -- records ---------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send()
            return
        except Exception as e:  # noqa: BLE001 - the handshake's failure goes to the waiter
            self._send()   # the alert, if OpenSSL wrote one
            self._fail(e)
            return
        self._handshaken = True
        self._send()
        if not self._waiter.done():
            self._waiter.set_result(None)
        self.app.connection_made(self.app_transport)

    def _decrypt(self) -> None:
        """Decrypt every complete record into the plaintext buffer; hand each full buffer,
        then the rest, to the protocol as one bytes."""
        view = self._buffers[1]     # copied out before any other code runs
        # SSLObject.read(n, buffer) returns a count, not the bytes typeshed declares
        # (the compiled build checks a declared result).
        sslobj = self._ssl
        read: Callable[[int, memoryview], Any] = sslobj.read
        incoming = self.incoming
        size, filled = len(view), 0
        eof = False
        try:
            while incoming.pending or sslobj.pending():
                n: int = read(size - filled, view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
                if filled == size:
                    filled = 0
                    self.app.data_received(bytes(view))
                    if self.reading_paused or self.closing:
                        break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:   # a bad record, or the peer's alert
            if filled:
                self.app.data_received(bytes(view[:filled]))
            self._send()
            self.abort(e)
            return
        if filled:
            self.app.data_received(bytes(view[:filled]))
        if self.outgoing.pending:
            self._send()
        if eof and not self.closing:  # close_notify
            self.app.eof_received()
            self.close()

    def _fail(self, exc: BaseException, *, drop: bool = False) -> None:
        """The handshake failed: tell the waiter; close (the alert OpenSSL wrote goes out
        first), or drop the connection at once."""
        self.closing = True
        if not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            if drop:
                self.transport.abort()
            else:
                self.transport.close()

    def _end_turn(self) -> None:
        """The turn that wrote is over: what it queued goes in one send; whether the next
        turn's first write may leave at once depends on how many writes this one had."""
        self._flush_scheduled = False
        self._busy = self._turn_writes > 1
        if self.held:
            self._encrypt_held()
        if self.outgoing.pending:
            self._send()

    def _encrypt_held(self) -> bool:
        """The held writes into one record (False: the connection failed)."""
        held, self._held = self._held, []
        self.held = 0
        try:
            self._ssl.write(held[0] if len(held) == 1 else b"".join(held))
        except ssl.SSLError as e:
            self.abort(e)
            return False
        return True

    def _send(self) -> None:
        if self.outgoing.pending and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.write(self.outgoing.read())

    # -- the protocol's calls --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        if not self._flush_scheduled:
            # The turn's first write leaves at once unless the last turn had several (a
            # lone small message is not held to the end of the turn: that would be a loop
            # pass on the latency path); later writes of the turn, and all of a turn after
            # a busy one (under load), are batched into one send at its end.
            self._flush_scheduled = True
            self._turn_writes = 1
            self._loop.call_soon(self._end_turn)
            if not self._busy:
                if self._encrypt(data):
                    self._send()
                return
        else:
            self._turn_writes += 1
        size = len(data)
        if size < RECORD:
            # Held as plaintext, encrypted with the turn's other small writes in one record.
            if self.held + size > RECORD and not self._encrypt_held():
                return
            self._held.append(data if type(data) is bytes else bytes(data))
            self.held += size
            return
        if self.held and not self._encrypt_held():
            return
        if self._encrypt(data) and self.outgoing.pending >= FLUSH_AT:
            self._send()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bool:
        """`data` into the outgoing BIO, at most FLUSH_AT plaintext bytes at a time, the
        ciphertext sent whenever FLUSH_AT of it waits (False: the connection failed).  A
        memory BIO keeps the largest size it ever held until the connection closes: one
        8 MiB write (eight bulk streams' frames of a turn) would be 8 MiB of a pooled
        connection's memory for good (docs/benchmarks.md, "The heap after a busy period")."""
        try:
            if len(data) <= FLUSH_AT:
                self._ssl.write(data)
                return True
            view = memoryview(data)
            for start in range(0, len(view), FLUSH_AT):
                self._ssl.write(view[start:start + FLUSH_AT])
                if self.outgoing.pending >= FLUSH_AT:
                    self._send()
        except ssl.SSLError as e:
            self.abort(e)
            return False
        return True

    def close(self) -> None:
        if self.closing:
            return
        if self.held:
            self._encrypt_held()          # what the protocol wrote goes before close_notify
        self.closing = True
        with contextlib.suppress(ssl.SSLError):
            self.sslobj.unwrap()          # queues close_notify; the peer's is not awaited
        self._send()
        if self.transport is not None:
            self.transport.close()

    def abort(self, exc: BaseException | None) -> None:
        self.closing = True
        self._held.clear()
        self.held = 0
        if exc is not None and self._error is None:
            self._error = exc
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.reading_paused:
            return
        self.reading_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
            self._decrypt()   # what was read before the pause


async def _established(records: _TlsRecords, timeout: float) -> TlsTransport:
    try:
        await asyncio.wait_for(asyncio.shield(records._waiter), max(timeout, 0.0))
    except BaseException:
        records._fail(ConnectionAbortedError("TLS handshake abandoned"), drop=True)
        raise
    return records.app_transport


async def connect(app: StreamProtocol, context: ssl.SSLContext, host: str, port: int, *,
                  handshake_timeout: float) -> TlsTransport:
    """Dial host:port and run the client handshake; `app` gets `connection_made` once it is
    done. Raises what the handshake raised (TimeoutError past `handshake_timeout`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + handshake_timeout
    records = _TlsRecords(app, context, server_side=False, waiter=loop.create_future())
    await asyncio.wait_for(loop.create_connection(lambda: records, host, port),
                           handshake_timeout)
    return await _established(records, deadline - loop.time())


async def handshake_connected(app: StreamProtocol, context: ssl.SSLContext, sock: socket.socket,
                         *, handshake_timeout: float) -> TlsTransport:
    """The client handshake on an already connected socket (as `connect`)."""
    loop = asyncio.get_running_loop()
    records = _TlsRecords(app, context, server_side=False, waiter=loop.create_future())
    sock.setblocking(False)
    await loop.create_connection(lambda: records, sock=sock)
    return await _established(records, handshake_timeout)


async def accept(app: StreamProtocol, context: ssl.SSLContext, sock: socket.socket, *,
                 handshake_timeout: float) -> TlsTransport:
    """The server handshake on an accepted socket; `app` gets `connection_made` once it is
    done. Raises what the handshake raised (TimeoutError past `handshake_timeout`)."""
    loop = asyncio.get_running_loop()
    records = _TlsRecords(app, context, server_side=True, waiter=loop.create_future())
    sock.setblocking(False)
    await loop.connect_accepted_socket(lambda: records, sock)
    return await _established(records, handshake_timeout)

"""Moving bytes between two TCP connections, both ways, as a transparent proxy must.

A FIN from one side becomes a FIN (shutdown of writing) on the other once
everything before it is written; a reset from one side becomes a reset
(SO_LINGER 0, abort) on the other; each side's write buffer pauses the other
side's reading so memory stays bounded.  Byte counts go to a callback.

A relay may hand its flow to the kernel (nodeproxy/tcp/splicer.py): while spliced,
its bytes never reach Python; EOFs still arrive here and are forwarded by the splice
once the kernel has delivered every byte before them.  With fastPath.spliceAfterBytes a
flow is relayed here first and spliced once it has carried that many bytes
(`promotion`, checked where bytes are forwarded).  While Python has no part in a
spliced flow its sides may have no transport at all (SplicedFlow.sleep): the splice
gives them new ones before anything here needs them.  A relayed flow sleeps the same
way once it is quiet (tcp/relay_sleep.py, `Relay.nap`); close and abort reach its
sockets through the nap.

Compiled with the HBONE group when there is a build (nodeproxy/native.py): `Side` and
`Relay` are then native classes that interpreted subclasses may extend (the accepted
side of tcp/tracker.py, the asleep stand-ins of tcp/dormancy.py, tests' sides); `Side`
does not subclass asyncio.Protocol (a subclass of it compiles as a Python-level class),
it has a protocol's methods, which is all uvloop and the tunnel's streams call.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from nodeproxy.tcp.fairshare import Lease
    from nodeproxy.tcp.splicer import Promotion, SplicedFlow

WRITE_HIGH_WATER = 512 * 1024
# What a side reads: bytes from a socket's transport, a view of the decrypted read from a
# tunnel stream (tunnel/session.py hands a relay's side views; the compiled build checks
# declared argument types, so the view is declared).
Bytes = bytes | memoryview
_LINGER_RESET = struct.pack("ii", 1, 0)


class Nap(Protocol):
    """A relayed flow's sleep (tcp/relay_sleep.py): the relay's own while it is awake
    and may fall asleep, its naps' table while it is asleep (a row there, `sleep_row`)."""

    def end(self, relay: Relay, how_reset: bool) -> bool: ...

    def finish(self, relay: Relay) -> None: ...


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a connection with RST instead of FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    cast(asyncio.Transport, transport).abort()


# A side's attributes (its __slots__ in the pure-Python build; tcp/dormancy.py copies them).
SIDE_FIELDS = ("_arrival", "_start_paused", "early", "eof_forwarded", "error", "got_eof",
               "lease", "lost", "name", "relay", "transport", "write_paused")


@mypyc_attr(allow_interpreted_subclasses=True)
class Side:
    """One of the two connections of a relay (an asyncio protocol).

    Thousands of these sit idle at once (two per proxied connection), so they have slots
    and allocate nothing until bytes come: `early` is a shared empty tuple until then."""

    __slots__ = SIDE_FIELDS  # (a compiled Side has no __slots__: a native class's layout)

    def __init__(self, name: str, start_paused: bool = False):
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.relay: Relay | None = None
        self.got_eof = False
        self.eof_forwarded = False
        self.write_paused = False  # our write buffer is above its high-water mark
        self.lost = False
        self.error: BaseException | None = None
        self._start_paused = start_paused
        # Bytes that arrived before the relay was joined (uvloop may start
        # reading right after connection_made despite pause_reading there): a list once
        # something came, the empty tuple before (take_early / hold_early).
        self.early: list[Bytes] | tuple[()] = ()
        self._arrival: asyncio.Future[None] | None = None
        # An accepted connection's hold on its source's fair share (tcp/fairshare.py).
        self.lease: Lease | None = None

    def hold_early(self, data: Bytes) -> None:
        """Keep bytes for the relay to send first once it joins (a tunnel's view copied:
        it would keep its whole read alive while the relay is not joined)."""
        if type(data) is not bytes:
            data = bytes(data)
        if self.early:
            self.early.append(data)  # type: ignore[union-attr]
        else:
            self.early = [data]

    def take_early(self) -> bytes:
        """Every byte held so far, joined; nothing is held afterwards."""
        early, self.early = self.early, ()
        return b"".join(early)

    async def wait_early(self, timeout: float | None, seen: int = 0) -> None:
        """Read until something more arrives before the relay is joined (more than `seen`
        early chunks, EOF or loss), or the timeout passes.  The proxy sniffs a connection's
        first bytes this way."""
        if len(self.early) > seen or self.got_eof or self.lost:
            return
        self._arrival = asyncio.get_running_loop().create_future()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self._arrival), timeout)
        except TimeoutError:
            pass
        finally:
            self._arrival = None

    def _arrived(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = ours = cast(asyncio.Transport, transport)
        ours.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._start_paused:
            ours.pause_reading()

    def data_received(self, data: Bytes) -> None:
        if self.relay is not None:
            self.relay.forward(self, data)
        else:
            self.hold_early(data)
            self.pause()
            self._arrived()

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.relay is not None:
            self.relay.on_eof(self)
        self._arrived()
        return True  # keep our writing side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        if self.relay is not None:
            self.relay.on_lost(self, exc)
        self._arrived()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.relay is not None:
            self.relay.peer(self).pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.relay is not None:
            self.relay.peer(self).resume()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        """Read again, unless what we read would only pile up in the peer's write buffer."""
        if self.relay is not None and self.relay.peer(self).write_paused:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


@mypyc_attr(allow_interpreted_subclasses=True)
class Relay:
    """Joins a downstream (client) side and an upstream (server) side."""

    __slots__ = ("_on_bytes", "_on_done", "bytes_from_downstream", "bytes_from_upstream",
                 "_done", "downstream", "finished", "last_active", "nap", "promotion",
                 "sleep_row", "splice", "upstream")

    def __init__(
        self,
        downstream: Side,
        upstream: Side,
        on_bytes: Callable[[bool, int], None],
        on_done: Callable[[Relay], None],
    ):
        self.downstream = downstream
        self.upstream = upstream
        self._on_bytes = on_bytes  # (from_downstream, n)
        self._on_done = on_done
        self._done: asyncio.Future[None] | None = None  # made when someone waits (done)
        self.finished = False  # both sides closed
        self.bytes_from_downstream = 0
        self.bytes_from_upstream = 0
        self.splice: SplicedFlow | None = None  # set while the kernel moves the bytes
        # Set while the flow is to be spliced once it has carried enough (Splicer.offer).
        self.promotion: Promotion | None = None
        self.last_active = time.monotonic()  # the last byte either way (idle timeout)
        self.nap: Nap | None = None  # set once offered to sleep while quiet
        # Asleep: its row in the naps' table (tcp/relay_sleep.py), its sides then the
        # table's two shared stand-ins; -1 awake.
        self.sleep_row = -1
        downstream.relay = self
        upstream.relay = self

    def start(self) -> None:
        """Both sides are connected: let bytes flow, replaying anything that already ended."""
        for side in (self.downstream, self.upstream):
            early, side.early = side.early, ()
            for data in early:
                self.forward(side, data)
        for side in (self.downstream, self.upstream):
            if side.lost:
                self.on_lost(side, side.error)
                return
        for side in (self.downstream, self.upstream):
            if side.got_eof:
                self.on_eof(side)
        self.downstream.resume()
        self.upstream.resume()

    @property
    def done(self) -> asyncio.Future[None]:
        """Resolved once both sides are closed.  Made on first use (drain, run): an idle
        relay holds no future."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self.finished:
                self._done.set_result(None)
        return self._done

    async def run(self) -> None:
        """Start, then wait until both sides are closed; cancelled, both are reset."""
        self.start()
        try:
            await asyncio.shield(self.done)  # the future is the relay's, not the waiter's
        except asyncio.CancelledError:
            self.abort()
            raise

    def peer(self, side: Side) -> Side:
        return self.upstream if side is self.downstream else self.downstream

    def forward(self, src: Side, data: Bytes) -> None:
        """Every read of either side comes here: kept to a few operations (account is
        written out inline)."""
        if self.splice is not None and self.splice.hold(src, data):
            return  # the kernel's earlier bytes go first
        from_downstream = src is self.downstream
        dst = self.upstream if from_downstream else self.downstream
        transport = dst.transport
        if transport is None or transport.is_closing():
            return
        if type(data) is not bytes and transport.get_write_buffer_size():
            # A tunnel's view keeps its whole read alive, and the buffer counts only the
            # view: one queued behind others is copied, or a peer's 1-byte frames, one
            # per read, made a stalled flow hold a read per byte past the high-water mark.
            data = bytes(data)
        transport.write(data)
        n = len(data)
        self.last_active = time.monotonic()
        if from_downstream:
            self.bytes_from_downstream += n
        else:
            self.bytes_from_upstream += n
        self._on_bytes(from_downstream, n)
        if self.splice is not None:
            self.splice.python_forwarded(src, n)
        elif self.promotion is not None and (
                self.bytes_from_downstream + self.bytes_from_upstream >= self.promotion.at):
            self.promotion.due(self, src, n)  # busy enough for the kernel: splice it

    def account(self, src: Side, n: int) -> None:
        """n bytes went from src to its peer (by Python or by the kernel)."""
        self.last_active = time.monotonic()
        if src is self.downstream:
            self.bytes_from_downstream += n
        else:
            self.bytes_from_upstream += n
        self._on_bytes(src is self.downstream, n)

    def idle(self) -> bool:
        """Nothing of this relay waits in Python: both write buffers are empty."""
        return all(side.transport is not None and not side.transport.is_closing()
                   and side.transport.get_write_buffer_size() == 0
                   for side in (self.downstream, self.upstream))

    def on_eof(self, src: Side) -> None:
        if self.splice is not None:
            self.splice.on_eof(src)  # once the kernel has delivered src's bytes
        else:
            self.forward_eof(src)

    def forward_eof(self, src: Side) -> None:
        dst = self.peer(src)
        if dst.transport is not None and not dst.transport.is_closing():
            dst.transport.write_eof()  # sent after the buffered bytes
        src.eof_forwarded = True
        if dst.eof_forwarded:
            self.close()

    def on_lost(self, src: Side, exc: BaseException | None) -> None:
        dst = self.peer(src)
        if exc is not None:
            reset(dst.transport)
        elif dst.transport is not None and not dst.transport.is_closing():
            dst.transport.close()
        self._finish()

    def close(self) -> None:
        if self.splice is not None and self.splice.end_asleep(how_reset=False):
            return
        if self.nap is not None and self.nap.end(self, how_reset=False):
            return
        for side in (self.downstream, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def abort(self) -> None:
        """Reset both sides (drain deadline passed, or the pod went away)."""
        if self.splice is not None and self.splice.end_asleep(how_reset=True):
            return
        if self.nap is not None and self.nap.end(self, how_reset=True):
            return
        reset(self.downstream.transport)
        reset(self.upstream.transport)

    # -- its tunnel stream's reader while the flow sleeps (tcp/half_sleep.py) --------
    # An asleep cross-node flow keeps no side for its stream: the relay itself reads
    # the stream, and whatever the stream reports wakes it (its nap, then the table of
    # asleep relays, gives the stream a new side) and goes to that side.

    def _stream_reported(self) -> asyncio.Protocol:
        return self.nap.stream_reported(self)  # type: ignore[union-attr]

    def data_received(self, data: Bytes) -> None:
        self._stream_reported().data_received(data)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return self._stream_reported().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream_reported().connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream_reported().pause_writing()

    def resume_writing(self) -> None:
        self._stream_reported().resume_writing()

    def finish_lost(self) -> None:
        """Both sides' sockets were closed without their transports (an asleep splice,
        tcp/splicer.py, or relay, tcp/relay_sleep.py): the relay is over."""
        self._finish()

    def _finish(self) -> None:
        if self.downstream.lost and self.upstream.lost and not self.finished:
            self.finished = True
            self.promotion = None
            if self.splice is not None:
                self.splice.finish()
            if self.nap is not None:
                self.nap.finish(self)
            if self._done is not None:
                self._done.set_result(None)
            self._on_done(self)
            # No reference cycle outlives the relay (sides <-> relay): freed when the
            # last reference goes, not at the collector's next full pass, which
            # thousands of flows closing at once wait for with several MiB.
            asyncio.get_running_loop().call_soon(_unlink, self)


def _unlink(relay: Relay) -> None:
    """After a relay ended and everything it called has run: its sides forget it."""
    relay.downstream.relay = relay.upstream.relay = None


"""Relays with one socket asleep: a quiet cross-node flow gives up its socket's transport.

A relay between a socket of this process and a stream of a pooled connection (an HBONE
tunnel stream, tunnel/session.py: the client socket at the source node, the server
socket at the destination) cannot sleep as a same-node relay does (tcp/relay_sleep.py):
its stream has no descriptor of its own, the pooled TLS connection reads for every
stream of it.  What it can give up is its socket's side and uvloop transport (about
1.1 KiB of Python objects and 2 KiB of the C heap), and what the stream would need to
read is already there: the stream's side.  Once the relay has moved no byte either way
for the quiet wait (relay_sleep.quiet_wait) and nothing of it is in Python (no byte in
either write buffer, no EOF, nothing held), it sleeps:

- the socket is kept as a bare descriptor number, watched by the daemon's epoll
  (tcp/dormancy.py), its row in `HalfRows` (keyed by that number: the relay, when it fell
  asleep, its early wakes); its side becomes the shared read-only stand-in of its
  direction (`dormancy.ASLEEP_SIDES`), the relay's nap the table;
- the stream keeps its side, which becomes a `_Bell` (the same object: its class is
  swapped, no allocation): what the stream reports (DATA, its END_STREAM, a reset,
  the pooled connection's loss) is held on the side as before a relay joins (its
  reading paused, so the stream withholds its WINDOW_UPDATEs: flow control stays exact)
  and wakes the relay.  A WINDOW_UPDATE or SETTINGS from the peer reaches only the
  stream's send window, and a GOAWAY only the connection: none of them wakes it;
- the stream's state in h2 (its H2Stream, state machine and window manager, about
  0.55 KiB) is dropped if the stream offers to (`shelve()`, tunnel/session.py's
  StreamTransport.shelve: an open stream exactly as h2 would make it again), and made
  again (`unshelve()`) before the relay wakes or ends, and by the session itself
  before any frame or call for that stream reaches h2.

Readability on the socket (bytes, a FIN, a reset) or anything the stream reports wakes
it: the socket gets a transport again (bare_socket.adopt, which replays what it read),
then the stream's side becomes a `Side` again and what it held is passed on in order,
as Relay.start passes on what came before a relay joined.  close and abort (the idle
timeout, drain, a revoked policy, a vanished pod) end an asleep relay directly: its
socket closed with a FIN or a reset, its stream closed or reset.

A half-closed relay never sleeps, and a restless peer makes the wait double, as for a
relay asleep whole (relay_sleep.restless_after_wake).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import TYPE_CHECKING, Any

from nodeproxy.tcp.bare_socket import adopt
from nodeproxy.tcp.dormancy import (
    ASLEEP_SIDES,
    close_bare,
    detach_sides,
    quiet_side,
    take_back,
)
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.tcp.relay_sleep import RelayNap, restless_after_wake

if TYPE_CHECKING:
    from nodeproxy.tcp.relay_sleep import RelayNaps


def _shelve(stream: Any) -> None:
    """Let the stream drop what it can while its flow sleeps (a tunnel stream's h2
    state), if it is a transport that can."""
    shelve = getattr(stream, "shelve", None)
    if shelve is not None:
        shelve()


def _unshelve(stream: Any) -> None:
    unshelve = getattr(stream, "unshelve", None)
    if unshelve is not None:
        unshelve()


def socket_side(relay: Relay) -> int | None:
    """Which of the relay's sides (0 downstream, 1 upstream) is a socket of this process
    when the other is not, or None."""
    has = [side.transport is not None and side.transport.get_extra_info("socket") is not None
           for side in (relay.downstream, relay.upstream)]
    if has == [True, False]:
        return 0
    if has == [False, True]:
        return 1
    return None


class _Bell(Side):
    """An asleep relay's stream side: what the stream reports is held (as a side holds
    what comes before its relay joins: early bytes, EOF, loss) and rings the relay's nap
    (the table while asleep, the waking nap after).  Swapped in and out by class
    assignment: a `Side` with nothing added."""

    __slots__ = ()

    def _ring(self) -> None:
        relay = self.relay
        if relay is not None and relay.nap is not None:
            relay.nap.ring(relay)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.hold_early(data)
        self.pause()  # the stream withholds its WINDOW_UPDATEs for what is held
        self._ring()

    def eof_received(self) -> bool:
        self.got_eof = True
        self._ring()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._ring()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False


class HalfRows:
    """The relays asleep with one socket, one row each keyed by its descriptor's number
    (the dormancy's sleeper for those numbers, and their relays' nap while asleep):
    `_relay[fd]`, `_slept_at[fd]`, `_restless[fd]`.  Counted with the whole-asleep
    relays (RelayNaps.asleep and its metrics)."""

    def __init__(self, naps: RelayNaps):
        self.naps = naps
        self._relay: list[Relay | None] = []
        self._slept_at = array("d")
        self._restless = array("B")

    def offer(self, relay: Relay) -> None:
        nap = relay.nap = HalfNap(self.naps, relay, self)
        nap.park(relay.last_active)

    # -- the table ----------------------------------------------------------------

    def put(self, relay: Relay, fd: int, restless: int) -> bool:
        missing = fd + 1 - len(self._relay)
        if missing > 0:
            self._relay.extend([None] * missing)
            self._slept_at.extend([0.0] * missing)
            self._restless.extend(bytes(missing))
        if self._relay[fd] is not None or self.naps.row_of(fd) is not None:
            return False
        self._relay[fd] = relay
        self._slept_at[fd] = time.monotonic()
        self._restless[fd] = restless
        relay.sleep_row = fd
        return True

    def take(self, relay: Relay) -> tuple[int, int, float] | None:
        """Clear the relay's row: (fd, restless, slept at), or None; the descriptor is
        unwatched, not closed."""
        fd = relay.sleep_row
        if fd < 0 or fd >= len(self._relay) or self._relay[fd] is not relay:
            return None
        self._relay[fd] = None
        relay.sleep_row = -1
        self.naps.dormancy.unwatch(fd)
        self.naps.asleep -= 1
        return fd, self._restless[fd], self._slept_at[fd]

    def row_of(self, fd: int) -> Relay | None:
        return self._relay[fd] if 0 <= fd < len(self._relay) else None

    # -- asleep relays: the dormancy's sleeper, and their nap -----------------------

    def woken(self, fd: int) -> None:
        relay = self.row_of(fd)
        if relay is None:
            self.naps.dormancy.unwatch(fd)
        else:
            self.wake(relay)

    def ring(self, relay: Relay) -> None:
        """The asleep relay's stream reported something (held on its side)."""
        self.wake(relay)

    def wake(self, relay: Relay) -> None:
        row = self._take_row(relay)
        if row is None:
            return
        fd, restless, slept_at, which, stream_side = row
        _unshelve(stream_side.transport)
        self.naps.metrics.wakes.inc()
        sock_side = _fresh_side(relay, which)
        nap = relay.nap = HalfNap(self.naps, relay, self)
        nap._restless = restless_after_wake(restless, time.monotonic() - slept_at)
        nap._waking = asyncio.get_running_loop().create_task(
            nap.readopt(take_back(fd), sock_side, stream_side))

    def end(self, relay: Relay, how_reset: bool) -> bool:
        """Close an asleep relay: its socket (reset, or FIN) and its stream (reset, or
        closed), then the relay ends."""
        row = self._take_row(relay)
        if row is None:
            return False
        fd, _restless, _slept_at, which, stream_side = row
        _unshelve(stream_side.transport)
        close_bare(fd, how_reset)
        _fresh_side(relay, which).lost = True
        relay.nap = None
        stream_side.__class__ = Side  # the stream's report of its end reaches the relay
        stream = stream_side.transport
        if how_reset:
            reset(stream)
        elif stream is not None and not stream.is_closing():
            stream.close()
        stream_side.lost = True  # whether or not the stream reported it
        relay.finish_lost()
        return True

    def finish(self, relay: Relay) -> None:
        relay.nap = None

    def _take_row(self, relay: Relay) -> tuple[int, int, float, int, Side] | None:
        """The row cleared, with which side was the socket's and the stream's side."""
        row = self.take(relay)
        if row is None:
            return None
        which = 0 if relay.downstream is ASLEEP_SIDES[0] else 1
        stream_side = relay.upstream if which == 0 else relay.downstream
        return (*row, which, stream_side)


def _fresh_side(relay: Relay, which: int) -> Side:
    """A new side for the socket's direction of a relay waking or ending asleep."""
    side = Side(ASLEEP_SIDES[which].name)
    side.relay = relay
    if which == 0:
        relay.downstream = side
    else:
        relay.upstream = side
    return side


class HalfNap(RelayNap):
    """One awake relay's sleep when only one of its sides is a socket: parked as a
    RelayNap is (same wait, same wheel), asleep as a row of `HalfRows`."""

    __slots__ = ("_rows",)

    def __init__(self, naps: RelayNaps, relay: Relay, rows: HalfRows):
        super().__init__(naps, relay)
        self._rows = rows

    def sleep(self) -> bool:
        relay = self.relay
        which = socket_side(relay)
        if self._waking is not None or relay.nap is not self or which is None or not (
                quiet_side(relay.downstream) and quiet_side(relay.upstream)):
            return False
        sides = (relay.downstream, relay.upstream)
        sock_side, stream_side = sides[which], sides[1 - which]
        if type(stream_side) is not Side:
            return False  # only a plain side becomes a bell (the same slots)
        socks = detach_sides([sock_side])
        if not socks:
            return False  # no descriptor free: the transport was left as it was
        rows, naps = self._rows, self._naps
        if not rows.put(relay, socks[0].fileno(), self._restless):
            self._waking = asyncio.get_running_loop().create_task(
                self._adopt(socks, (sock_side,)))
            return False
        if self._parked is not None:
            naps.dormancy.unpark(self, self._parked)
            self._parked = None
        sock_side.relay = None  # the old side goes with its closed transport
        fd = socks[0].detach()
        stream_side.__class__ = _Bell
        _shelve(stream_side.transport)
        if which == 0:
            relay.downstream = ASLEEP_SIDES[0]
        else:
            relay.upstream = ASLEEP_SIDES[1]
        relay.nap = rows
        naps.asleep += 1
        naps.metrics.sleeps.inc()
        try:
            naps.dormancy.watch(fd, rows)
        except OSError:
            rows.wake(relay)  # the kernel would not watch it: the transport back
            return False
        return True

    def ring(self, relay: Relay) -> None:
        """The stream reported something while the socket's transport is being made:
        held on the stream's side until then."""

    async def readopt(self, sock: Any, sock_side: Side, stream_side: Side) -> None:
        """The socket's transport back (what it read is passed on once made); then the
        stream's side is a Side again and passes on what it held, in order."""
        relay = self.relay
        try:
            await adopt([sock], [sock_side])
        finally:
            self._waking = None
            stream_side.__class__ = Side
        if not relay.finished:
            early, stream_side.early = stream_side.early, ()
            for data in early:
                relay.forward(stream_side, data)
            if stream_side.lost:
                relay.on_lost(stream_side, stream_side.error)
            elif stream_side.got_eof:
                relay.on_eof(stream_side)
        if relay.finished:
            return
        sock_side.resume()
        stream_side.resume()
        if relay.nap is self and not relay.finished:
            self.park(relay.last_active)

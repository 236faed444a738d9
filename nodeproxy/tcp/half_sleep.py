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
  (tcp/dormancy.py), its row in `HalfRows` (keyed by that number: the relay, its
  stream, which side was the socket's, when it fell asleep, its early wakes); both of
  the relay's sides become the shared read-only stand-ins (`dormancy.ASLEEP_SIDES`),
  the relay's nap the table;
- the stream's side is dropped too (about 130 bytes): while the flow sleeps the relay
  itself is the stream's reader (`StreamTransport.swap_reader`; Relay's protocol
  methods), so no object is swapped or made for it.  The first thing the stream
  reports (DATA, its END_STREAM, a reset, the pooled connection's loss) wakes the
  relay, which gives the stream a new side at once, not yet joined to the relay: it
  holds what comes (as a side holds what comes before its relay joins: bytes, EOF,
  loss), its reading paused so the stream withholds its WINDOW_UPDATEs for what is held
  (flow control stays exact).  A WINDOW_UPDATE or SETTINGS from the peer reaches only
  the stream's send window, and a GOAWAY only the connection: none of them wakes it;
- the stream's state in h2 (its H2Stream, state machine and window manager, about
  0.55 KiB) is dropped if the stream offers to (`shelve()`, tunnel/session.py's
  StreamTransport.shelve: an open stream exactly as h2 would make it again), and made
  again (`unshelve()`) before the relay wakes or ends, and by the session itself
  before any frame or call for that stream reaches h2.

Readability on the socket (bytes, a FIN, a reset) or anything the stream reports wakes
it: the socket gets a transport again (bare_socket.adopt, which replays what it read),
then the stream's new side joins the relay and what it held is passed on in order, as
Relay.start passes on what came before a relay joined.  close and abort (the idle
timeout, drain, a revoked policy, a vanished pod) end an asleep relay directly: its
socket closed with a FIN or a reset, its stream closed or reset.

A half-closed relay never sleeps, and a restless peer makes the wait double, as for a
relay asleep whole (relay_sleep.restless_after_wake).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

from nodeproxy.tcp.bare_socket import adopt
from nodeproxy.tcp.dormancy import (
    ASLEEP_SIDES,
    Dormancy,
    close_bare,
    detach_sides,
    quiet_side,
    take_back,
)
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.tcp.relay_sleep import (
    RelayNap,
    RelayNaps,
    RelaySleepMetrics,
    restless_after_wake,
)


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


def _may_drop(side: Side) -> bool:
    """The stream's side holds nothing a new side would not: a plain `Side` whose
    stream reads into it (a transport that can take another reader), its writing not
    paused, no EOF forwarded, no lease, nobody waiting on it (quiet_side has checked the
    rest: no EOF read, not lost, nothing held)."""
    stream = side.transport
    return (type(side) is Side and stream is not None
            and getattr(stream, "protocol", None) is side
            and hasattr(stream, "swap_reader")
            and not side.write_paused and not side.eof_forwarded
            and side.lease is None and side._arrival is None)


class HalfNaps(RelayNaps):
    """The daemon's naps: whole relays as RelayNaps sleeps them, and relays with one socket
    (a tunnel stream on the other side) in `halves`, made on the first such relay."""

    def __init__(self, dormancy: Dormancy, metrics: RelaySleepMetrics):
        super().__init__(dormancy, metrics)
        self.halves: HalfRows | None = None

    def offer_half(self, relay: Relay) -> None:
        if self.halves is None:
            self.halves = HalfRows(self)
        self.halves.offer(relay)


class HalfRows:
    """The relays asleep with one socket, one row each keyed by its descriptor's number
    (the dormancy's sleeper for those numbers, and their relays' nap while asleep):
    `_relay[fd]`, `_stream[fd]` (its tunnel stream, whose reader the relay is while
    asleep), `_which[fd]` (0: the socket was downstream, 1: upstream), `_slept_at[fd]`,
    `_restless[fd]`.  Counted with the whole-asleep relays (RelayNaps.asleep and its
    metrics)."""

    def __init__(self, naps: RelayNaps):
        self.naps = naps
        self._relay: list[Relay | None] = []
        self._stream: list[Any] = []
        self._which = array("B")
        self._slept_at = array("d")
        self._restless = array("B")

    def offer(self, relay: Relay) -> None:
        nap = relay.nap = HalfNap(self.naps, relay, self)
        nap.park(relay.last_active)

    # -- the table ----------------------------------------------------------------

    def put(self, relay: Relay, fd: int, restless: int, stream: Any, which: int) -> bool:
        missing = fd + 1 - len(self._relay)
        if missing > 0:
            self._relay.extend([None] * missing)
            self._stream.extend([None] * missing)
            self._which.extend(bytes(missing))
            self._slept_at.extend([0.0] * missing)
            self._restless.extend(bytes(missing))
        if self._relay[fd] is not None or self.naps.row_of(fd) is not None:
            return False
        self._relay[fd] = relay
        self._stream[fd] = stream
        self._which[fd] = which
        self._slept_at[fd] = time.monotonic()
        self._restless[fd] = restless
        relay.sleep_row = fd
        return True

    def take(self, relay: Relay) -> tuple[int, int, float, int, Any] | None:
        """Clear the relay's row: (fd, restless, slept at, which side was the socket's,
        the stream), or None; the descriptor is unwatched, not closed."""
        fd = relay.sleep_row
        if fd < 0 or fd >= len(self._relay) or self._relay[fd] is not relay:
            return None
        stream = self._stream[fd]
        self._relay[fd] = self._stream[fd] = None
        relay.sleep_row = -1
        self.naps.dormancy.unwatch(fd)
        self.naps.asleep -= 1
        return fd, self._restless[fd], self._slept_at[fd], self._which[fd], stream

    def row_of(self, fd: int) -> Relay | None:
        return self._relay[fd] if 0 <= fd < len(self._relay) else None

    # -- asleep relays: the dormancy's sleeper, and their nap -----------------------

    def woken(self, fd: int) -> None:
        relay = self.row_of(fd)
        if relay is None:
            self.naps.dormancy.unwatch(fd)
        else:
            self.wake(relay)

    def stream_reported(self, relay: Relay) -> asyncio.Protocol:
        """The asleep relay's stream reported something (Relay's protocol methods, the
        stream's reader while asleep): the relay wakes, and what was reported goes to the
        stream's new side, which holds it until the socket's transport is made."""
        fd = relay.sleep_row
        stream = self._stream[fd] if 0 <= fd < len(self._stream) \
            and self._relay[fd] is relay else None
        if stream is None:
            # Never: every way out of the row gives the stream its side back first.
            raise RuntimeError("a relay is a stream's reader without a row")
        self.wake(relay)
        protocol: asyncio.Protocol = stream.protocol
        return protocol

    def wake(self, relay: Relay) -> None:
        row = self._take_row(relay)
        if row is None:
            return
        fd, restless, slept_at, which, stream_side = row
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
        stream_side.relay = relay  # the stream's report of its end reaches the relay
        close_bare(fd, how_reset)
        _fresh_side(relay, which).lost = True
        relay.nap = None
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
        """The row cleared, with which side was the socket's; the stream has a new side
        as its reader (the relay's, not yet joined to it: it holds what the stream
        reports) and h2's state of the stream back."""
        row = self.take(relay)
        if row is None:
            return None
        fd, restless, slept_at, which, stream = row
        stream_side = Side(ASLEEP_SIDES[1 - which].name)
        stream_side.transport = stream
        stream.swap_reader(stream_side)
        if which == 0:
            relay.upstream = stream_side
        else:
            relay.downstream = stream_side
        _unshelve(stream)
        return fd, restless, slept_at, which, stream_side


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
        if not _may_drop(stream_side):
            return False
        stream = stream_side.transport
        socks = detach_sides([sock_side])
        if not socks:
            return False  # no descriptor free: the transport was left as it was
        rows, naps = self._rows, self._naps
        if not rows.put(relay, socks[0].fileno(), self._restless, stream, which):
            self._waking = asyncio.get_running_loop().create_task(
                self._adopt(socks, (sock_side,)))
            return False
        if self._parked is not None:
            naps.dormancy.unpark(self, self._parked)
            self._parked = None
        sock_side.relay = None  # the old side goes with its closed transport
        fd = socks[0].detach()
        # The stream's side goes too: the relay is the stream's reader while asleep.
        stream.swap_reader(relay)  # type: ignore[union-attr]
        stream_side.relay = stream_side.transport = None
        _shelve(stream)
        relay.downstream, relay.upstream = ASLEEP_SIDES
        relay.nap = rows
        naps.asleep += 1
        naps.metrics.sleeps.inc()
        try:
            naps.dormancy.watch(fd, rows)
        except OSError:
            rows.wake(relay)  # the kernel would not watch it: the transport back
            return False
        return True

    async def readopt(self, sock: Any, sock_side: Side, stream_side: Side) -> None:
        """The socket's transport back (what it read is passed on once made); then the
        stream's new side joins the relay and passes on what it held, in order."""
        relay = self.relay
        try:
            await adopt([sock], [sock_side])
        finally:
            self._waking = None
            if not relay.finished:  # an ended relay's sides forget it (no cycle)
                stream_side.relay = relay
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

"""Relayed flows asleep: a quiet relay gives up its two transports until bytes come.

A relay that Python moves (fastPath.splice off, the shipped default; the sk_msg fast
path between the application and the proxy's socket) holds two uvloop transports, about
2.2 KiB, for as long as the connection lives, and most of a node's connections are idle
keep-alives.  Once a relay has moved no byte either way for QUIET_SECONDS and nothing
of it is in Python, it sleeps as a spliced flow does (tcp/dormancy.py): its sockets
kept as two descriptor numbers, watched by the daemon's epoll, the transports closed
(no FIN, no reset).  The first readability on either socket (bytes, a FIN, a reset)
wakes it: new transports, which pass on what they read in order once both are made,
and the relay goes on exactly as before.  close and abort (the idle timeout, drain, a
vanished pod) close an asleep relay's sockets themselves, with a FIN or a reset.

Which relays: those whose two sides are sockets of this process (same-node pod to pod,
inbound plaintext, a passthrough destination).  A relay with an HBONE stream on one side
(cross-node) gives up its socket's transport only (tcp/half_sleep.py: the stream lives
in its pooled TLS connection, which reads for every stream of it).  A half-closed
relay never sleeps (its remaining direction's end is near, and the reset watch of the
closed side needs its transport).  A spliced relay sleeps by its own rules.

An asleep relay is a row of its naps' table, not objects (`RelayNaps`): its two
descriptor numbers, when it fell asleep and how restless it is, in arrays indexed by
descriptor number; the relay itself stays (the tracker, drain, the idle timeout and a
vanished pod's resets find it as before) with the table's two shared stand-ins
(`ASLEEP_SIDES`, read-only) for its sides and the table as its nap.  Waking makes two
new sides and a new `RelayNap`.  That is about 0.5 KiB of Python objects less per asleep
relay than a nap object, a tuple of two descriptor numbers, a float and two sides each
(4.6 MiB with 8,988 asleep; what the allocator gives back of it depends on what is
allocated after: docs/benchmarks.md, "Idle memory, ninth round").  The table grows to the highest
descriptor an asleep relay held and never shrinks (about 21 bytes a descriptor number:
bounded by the open-file limit, as the epoll's map of sleepers is); a row is cleared
before its descriptors are closed or taken back, so a number the kernel gives again
to another connection never finds the old row.

A flow woken soon after it fell asleep (a peer that sends a byte just after each quiet
while) waits twice as long before its next sleep, up to 2**MAX_RESTLESS times
QUIET_SECONDS, so a hostile or chatty pod costs one sleep and one wake per that long.

While a crowd of flows is awake and quiet at once (the dormancy's wheel holds at least
CROWDED_PARKED: a burst of connections opening), a flow that never woke early sleeps
after CROWDED_QUIET_SECONDS instead: each of them holds its transports (about 2 KiB)
until it sleeps, and what a burst's flows free when they sleep at last is left in the
allocator's pools among what the later connections keep (the daemon's RSS with 8,988
idle cross-node connections, docs/benchmarks.md, "Idle cross-node memory, thirteenth
round").  Whether a wake was early is still judged against QUIET_SECONDS, so a flow
that wakes within a second of such a sleep waits 2 s before its next one, as any early
waker does: a chatty pod costs at most one sleep and wake more than without a crowd.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeproxy.tcp.dormancy import (
    ASLEEP_SIDES,
    Dormancy,
    close_bare,
    detach_sides,
    fresh_sides,
    quiet_side,
    readopt,
    take_back,
)

if TYPE_CHECKING:
    from nodeproxy.tcp.relay import Relay

# A relay that moved nothing for this long sleeps (looked at within the wheel's tick).
QUIET_SECONDS = 1.0
# ... and while the wheel is crowded (dormancy.CROWDED_PARKED), for a relay that never
# woke early.
CROWDED_QUIET_SECONDS = 0.25
# Woken within its last quiet wait of falling asleep: the next wait doubles, up to
# QUIET_SECONDS * 2**MAX_RESTLESS (64 s).
MAX_RESTLESS = 6


def quiet_wait(restless: int) -> float:
    """How long a relay must move nothing before it sleeps, after `restless` early wakes."""
    return QUIET_SECONDS * (1 << min(restless, MAX_RESTLESS))


def restless_after_wake(restless: int, slept_for: float) -> int:
    """A wake within the quiet wait that preceded the sleep counts as early (the sleep
    did not pay for itself); a longer sleep forgets the earlier ones."""
    if slept_for < quiet_wait(restless):
        return min(restless + 1, MAX_RESTLESS)
    return 0


class RelaySleepMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.sleeps = Counter(
            "nodeproxy_relay_sleeps",
            "Times a quiet relayed flow with nothing in the proxy gave up its two "
            "transports (the proxy then only watches its sockets)", registry=registry)
        self.wakes = Counter(
            "nodeproxy_relay_wakes",
            "Times a sleeping relayed flow got transports back (bytes, an EOF or reset)",
            registry=registry)
        self.asleep = Gauge(
            "nodeproxy_relays_asleep", "Relayed flows asleep now (no transports)",
            registry=registry)


_FREE = -1


class RelayNaps:
    """Puts quiet relays to sleep and wakes them (one per daemon); the table of asleep
    relays, one row each, keyed by the downstream descriptor's number:

    - `_peer[fd]`: for either descriptor of an asleep relay, the other one (-1: free);
    - `_relay[down]`: the relay (None on an upstream's number and on free rows);
    - `_slept_at[down]`, `_restless[down]`: when it fell asleep, its early wakes.
    """

    def __init__(self, dormancy: Dormancy, metrics: RelaySleepMetrics):
        self.dormancy = dormancy
        self.metrics = metrics
        self.asleep = 0
        metrics.asleep.set_function(lambda: self.asleep)
        self._peer = array("i")
        self._relay: list[Relay | None] = []
        self._slept_at = array("d")
        self._restless = array("B")

    def offer(self, relay: Relay) -> None:
        """A relay has just started: let it sleep when it is quiet, whole if both of its
        sides are sockets of this process; one with a single socket (a tunnel stream on
        the other) goes to `offer_half`."""
        sockets = [side.transport is not None
                   and side.transport.get_extra_info("socket") is not None
                   for side in (relay.downstream, relay.upstream)]
        if not all(sockets):
            if any(sockets):
                self.offer_half(relay)
            return
        nap = relay.nap = RelayNap(self, relay)
        nap.park(relay.last_active)

    def offer_half(self, relay: Relay) -> None:
        """A relay with one socket of this process: these naps sleep whole relays only
        (tcp/half_sleep.py's HalfNaps sleeps its socket too)."""

    # -- the table ----------------------------------------------------------------

    def _grow(self, fd: int) -> None:
        missing = fd + 1 - len(self._peer)
        if missing > 0:
            self._peer.extend([_FREE] * missing)
            self._relay.extend([None] * missing)
            self._slept_at.extend([0.0] * missing)
            self._restless.extend(bytes(missing))

    def _put(self, relay: Relay, down: int, up: int, restless: int) -> bool:
        """A row for an asleep relay; False (nothing written) if either number is in a
        row already (never, while rows are cleared before their descriptors close)."""
        self._grow(max(down, up))
        if down == up or self._peer[down] != _FREE or self._peer[up] != _FREE:
            return False
        self._peer[down], self._peer[up] = up, down
        self._relay[down] = relay
        self._slept_at[down] = time.monotonic()
        self._restless[down] = restless
        relay.sleep_row = down
        relay.downstream, relay.upstream = ASLEEP_SIDES
        relay.nap = self
        return True

    def _take(self, relay: Relay) -> tuple[int, int, int, float] | None:
        """Clear the relay's row: (downstream fd, upstream fd, restless, slept at), or
        None if it has none.  Its descriptors are unwatched, not closed."""
        down = relay.sleep_row
        if down < 0 or down >= len(self._relay) or self._relay[down] is not relay:
            return None
        up = self._peer[down]
        row = (down, up, self._restless[down], self._slept_at[down])
        self._peer[down] = self._peer[up] = _FREE
        self._relay[down] = None
        relay.sleep_row = -1
        self.dormancy.unwatch(down)
        self.dormancy.unwatch(up)
        self.asleep -= 1
        return row

    def row_of(self, fd: int) -> Relay | None:
        """The asleep relay whose socket fd is, if any."""
        if not 0 <= fd < len(self._peer) or self._peer[fd] == _FREE:
            return None
        relay = self._relay[fd]
        if relay is None:  # an upstream's number: its row is its peer's
            relay = self._relay[self._peer[fd]]
        return relay

    # -- asleep relays: the Dormancy's sleeper, and the relay's nap ------------------

    def woken(self, fd: int) -> None:
        """One of an asleep relay's sockets is readable (the epoll)."""
        relay = self.row_of(fd)
        if relay is None:
            self.dormancy.unwatch(fd)  # no row: nothing sleeps on it
        else:
            self.wake(relay)

    def wake(self, relay: Relay) -> None:
        """Give an asleep relay sides, a nap and transports back; they read once both
        transports are made."""
        row = self._take(relay)
        if row is None:
            return
        down_fd, up_fd, restless, slept_at = row
        self.metrics.wakes.inc()
        down, up = fresh_sides(relay)
        nap = relay.nap = RelayNap(self, relay)
        nap._restless = restless_after_wake(restless, time.monotonic() - slept_at)
        socks = [take_back(down_fd), take_back(up_fd)]
        nap._waking = asyncio.get_running_loop().create_task(nap._adopt(socks, (down, up)))

    def end(self, relay: Relay, how_reset: bool) -> bool:
        """Close an asleep relay's sockets (reset, or FIN) and end the relay."""
        row = self._take(relay)
        if row is None:
            return False
        for fd in row[:2]:
            close_bare(fd, how_reset)
        fresh_sides(relay, lost=True)
        relay.nap = None
        relay.finish_lost()
        return True

    def finish(self, relay: Relay) -> None:
        """Never reached: an asleep relay ends through end(), which leaves it no nap."""
        relay.nap = None


class RelayNap:
    """One awake relay's sleep: parked while it waits to be looked at, or waking."""

    __slots__ = ("_naps", "_parked", "_restless", "_waking", "relay")

    def __init__(self, naps: RelayNaps, relay: Relay):
        self._naps = naps
        self.relay = relay
        self._parked: int | None = None  # the wheel slot while it waits to be looked at
        self._waking: asyncio.Task | None = None
        self._restless = 0

    def park(self, since: float) -> None:
        """Look at the relay once it may have been quiet long enough since `since`
        (time.monotonic(), as relay.last_active)."""
        if self._parked is not None:  # never in two slots at once
            self._naps.dormancy.unpark(self, self._parked)
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, since + self._wait() - time.monotonic())
        self._parked = self._naps.dormancy.park(self, due)

    def _wait(self) -> float:
        """How long this relay must stay quiet before it sleeps: less in a crowd, unless
        it woke early before."""
        if self._restless == 0 and self._naps.dormancy.crowded:
            return CROWDED_QUIET_SECONDS
        return quiet_wait(self._restless)

    def turned(self) -> None:
        """The wheel reached this relay: sleep if it stayed quiet, else look again once
        it may have."""
        self._parked = None
        relay = self.relay
        if relay.finished or relay.splice is not None or relay.nap is not self:
            return  # over, the splicer's, or asleep
        if relay.downstream.got_eof or relay.upstream.got_eof:
            return  # half-closed: never sleeps
        if time.monotonic() - relay.last_active >= self._wait() - 0.001:
            if self.sleep():
                return
            self.park(time.monotonic())  # refused for a passing reason: a full wait again
            return
        self.park(relay.last_active)

    def sleep(self) -> bool:
        """Close the two transports and watch the sockets instead, if nothing of the
        relay is in Python; the relay becomes a row of the table and this nap is
        dropped.  True when it is asleep."""
        relay = self.relay
        if self._waking is not None or relay.nap is not self or not (
                quiet_side(relay.downstream) and quiet_side(relay.upstream)):
            return False
        sides = (relay.downstream, relay.upstream)
        socks = detach_sides(sides)
        if len(socks) < 2:  # no descriptor free: the first gets its transport back
            self._waking = asyncio.get_running_loop().create_task(
                self._adopt(socks, sides[:len(socks)]))
            return False
        naps = self._naps
        if not naps._put(relay, socks[0].fileno(), socks[1].fileno(), self._restless):
            self._waking = asyncio.get_running_loop().create_task(self._adopt(socks, sides))
            return False
        if self._parked is not None:
            naps.dormancy.unpark(self, self._parked)
            self._parked = None
        for side in sides:
            side.relay = None  # the old sides go with their closed transports
        down, up = socks[0].detach(), socks[1].detach()  # only the numbers are kept
        naps.asleep += 1
        naps.metrics.sleeps.inc()
        try:
            naps.dormancy.watch(down, naps)
            naps.dormancy.watch(up, naps)
        except OSError:
            naps.wake(relay)  # the kernel would not watch it (memory): transports back
            return False
        return True

    async def _adopt(self, socks: list, sides: tuple) -> None:
        try:
            await readopt(socks, sides)
        finally:
            self._waking = None
        if not self.relay.finished and self.relay.nap is self:
            self.park(self.relay.last_active)

    def end(self, relay: Relay, how_reset: bool) -> bool:
        """A waking relay is reset or closed once its transports are made (True); an
        awake one is the relay's to close (False)."""
        if self._waking is not None:
            self._waking.add_done_callback(
                lambda _t: relay.abort() if how_reset else relay.close())
            return True
        return False

    def finish(self, relay: Relay) -> None:
        """The relay ended: out of the wheel; the relay forgets this nap (no cycle)."""
        if self._parked is not None:
            self._naps.dormancy.unpark(self, self._parked)
            self._parked = None
        relay.nap = None

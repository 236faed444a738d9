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
(cross-node) keeps its transports: the stream lives in its pooled TLS connection, which
reads for every stream of it, so only one transport would be given up.  A half-closed
relay never sleeps (its remaining direction's end is near, and the reset watch of the
closed side needs its transport).  A spliced relay sleeps by its own rules.

A flow woken soon after it fell asleep (a peer that sends a byte just after each quiet
while) waits twice as long before its next sleep, up to 2**MAX_RESTLESS times
QUIET_SECONDS, so a hostile or chatty pod costs one sleep and one wake per that long.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeproxy.tcp.dormancy import (
    Dormancy,
    close_bare,
    detach_sides,
    quiet_side,
    readopt,
    take_back,
)

if TYPE_CHECKING:
    from nodeproxy.tcp.relay import Relay

# A relay that moved nothing for this long sleeps (looked at within the wheel's tick).
QUIET_SECONDS = 1.0
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


class RelayNaps:
    """Puts quiet relays to sleep and wakes them (one per daemon)."""

    def __init__(self, dormancy: Dormancy, metrics: RelaySleepMetrics):
        self.dormancy = dormancy
        self.metrics = metrics
        self.asleep = 0
        metrics.asleep.set_function(lambda: self.asleep)

    def offer(self, relay: Relay) -> None:
        """A relay has just started: let it sleep when it is quiet, if both of its sides
        are sockets of this process."""
        for side in (relay.downstream, relay.upstream):
            if side.transport is None or side.transport.get_extra_info("socket") is None:
                return
        nap = relay.nap = RelayNap(self, relay)
        nap.park(relay.last_active)


class RelayNap:
    """One relay's sleep: parked while awake, its descriptors while asleep."""

    __slots__ = ("_fds", "_naps", "_parked", "_restless", "_slept_at", "_waking", "relay")

    def __init__(self, naps: RelayNaps, relay: Relay):
        self._naps = naps
        self.relay = relay
        self._parked: int | None = None  # the wheel slot while it waits to be looked at
        self._fds: tuple[int, int] | None = None  # asleep: downstream's, upstream's
        self._waking: asyncio.Task | None = None
        self._restless = 0
        self._slept_at = 0.0

    def park(self, since: float) -> None:
        """Look at the relay once it may have been quiet long enough since `since`
        (time.monotonic(), as relay.last_active)."""
        if self._parked is not None:  # never in two slots at once
            self._naps.dormancy.unpark(self, self._parked)
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, since + quiet_wait(self._restless) - time.monotonic())
        self._parked = self._naps.dormancy.park(self, due)

    def turned(self) -> None:
        """The wheel reached this relay: sleep if it stayed quiet, else look again once
        it may have."""
        self._parked = None
        relay = self.relay
        if relay.finished or relay.splice is not None or self._fds is not None:
            return  # over, or the splicer's
        if relay.downstream.got_eof or relay.upstream.got_eof:
            return  # half-closed: never sleeps
        if time.monotonic() - relay.last_active >= quiet_wait(self._restless) - 0.001:
            if self.sleep():
                return
            self.park(time.monotonic())  # refused for a passing reason: a full wait again
            return
        self.park(relay.last_active)

    def sleep(self) -> bool:
        """Close the two transports and watch the sockets instead, if nothing of the
        relay is in Python.  True when it is asleep."""
        relay = self.relay
        if self._waking is not None or not (quiet_side(relay.downstream)
                                            and quiet_side(relay.upstream)):
            return False
        sides = (relay.downstream, relay.upstream)
        socks = detach_sides(sides)
        if len(socks) < 2:  # no descriptor free: the first gets its transport back
            self._waking = asyncio.get_running_loop().create_task(
                self._adopt(socks, sides[:len(socks)]))
            return False
        down, up = socks[0].detach(), socks[1].detach()  # only the numbers are kept
        self._fds = (down, up)
        self._slept_at = time.monotonic()
        naps = self._naps
        naps.asleep += 1
        naps.metrics.sleeps.inc()
        try:
            naps.dormancy.watch(down, self)
            naps.dormancy.watch(up, self)
        except OSError:
            self.wake()  # the kernel would not watch it (memory): transports back
            return False
        return True

    def wake(self) -> None:
        """Give an asleep relay its transports back (a socket became readable); they
        read once both are made."""
        fds = self._fds
        if fds is None:
            return
        self._unwatch(fds)
        self._fds = None
        naps = self._naps
        naps.asleep -= 1
        naps.metrics.wakes.inc()
        self._restless = restless_after_wake(self._restless, time.monotonic() - self._slept_at)
        socks = [take_back(fd) for fd in fds]
        self._waking = asyncio.get_running_loop().create_task(
            self._adopt(socks, (self.relay.downstream, self.relay.upstream)))

    async def _adopt(self, socks: list, sides: tuple) -> None:
        try:
            await readopt(socks, sides)
        finally:
            self._waking = None
        if not self.relay.finished:
            self.park(self.relay.last_active)

    def end(self, how_reset: bool) -> bool:
        """Close an asleep relay's sockets (reset, or FIN) and end the relay; True when
        it was asleep or waking (a waking relay is reset or closed once its transports
        are made)."""
        if self._waking is not None:
            relay = self.relay
            self._waking.add_done_callback(
                lambda _t: relay.abort() if how_reset else relay.close())
            return True
        fds = self._fds
        if fds is None:
            return False
        self._unwatch(fds)
        self._fds = None
        self._naps.asleep -= 1
        for fd in fds:
            close_bare(fd, how_reset)
        self.relay.downstream.lost = self.relay.upstream.lost = True
        self.relay.finish_lost()
        return True

    def finish(self) -> None:
        """The relay ended: out of the wheel; the relay forgets this nap (no cycle).
        Never asleep here: an asleep relay's ending goes through end(), which closes
        its descriptors first."""
        if self._parked is not None:
            self._naps.dormancy.unpark(self, self._parked)
            self._parked = None
        self.relay.nap = None

    def _unwatch(self, fds: tuple[int, int]) -> None:
        for fd in fds:
            self._naps.dormancy.unwatch(fd)

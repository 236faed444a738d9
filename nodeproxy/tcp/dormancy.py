"""Flows asleep: a quiet flow's two sockets without transports, watched by the kernel.

An idle proxied connection spends most of its memory in uvloop's two transports (about
1.1 KiB each).  A flow with nothing of it in Python (no byte in a write buffer, no EOF,
nothing held) may give them up: each socket is kept as a bare descriptor number, both
go into one epoll of the daemon's, which the loop watches as one descriptor, and the
first readability on either (bytes, a FIN, a reset) gives the flow new transports
(bare_socket.adopt), which replay what they read in order once both are made.  Both the
spliced flows (tcp/splicer.py) and the relayed ones (tcp/relay_sleep.py) sleep this way;
this module owns what they share:

- `Dormancy`: the epoll of sleeping sockets, and the wheel where quiet flows wait for
  their next look (one slot per WHEEL_TICK, turned by one timer: no timer per flow);
- `detach_sides`, `take_back`, `close_bare`, `readopt`: falling asleep, waking, and
  ending a flow while it sleeps;
- `ASLEEP_SIDES`: what an asleep flow's relay has for sides (two shared read-only
  stand-ins, about 280 bytes less per asleep flow than its own two), `fresh_sides`
  when it wakes or ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from nodeproxy.tcp.bare_socket import adopt, borrowed, detach
from nodeproxy.tcp.relay import _LINGER_RESET, SIDE_FIELDS, Relay, Side

# The wheel's slots: a parked flow is looked at within this long after it is due.  A
# quarter of a second, not a whole one: a relayed flow that is due after its quiet wait
# sleeps then, not up to a second later (while a burst of connections opens, the flows
# awake and quiet at once are what the daemon's memory peaks with, and the pools their
# freed transports leave are not given back: docs/benchmarks.md, "Idle cross-node
# memory, thirteenth round").  Four timer calls a second while anything is parked.
WHEEL_TICK = 0.25
# Flows looked at per loop iteration when many are due at once; the rest in the next
# iterations.  Falling asleep closes a transport a loop turn after its socket was
# duplicated, so a turn that put thousands of flows to sleep at once held thousands of
# descriptors more until the next: an upstream dial in between got a number in
# limits.reservedFiles and was refused (measured: 2 of 8,988 connections opening while
# the first ones slept; docs/benchmarks.md, "Idle relayed flows, seventh round").  At
# most 2 x TURN_BATCH descriptors are duplicated at once.
TURN_BATCH = 64

# A burst of sleeps is over ("settled", for the daemon's memory trim) once a turn of the
# wheel leaves at most SETTLED_PARKED flows parked and nothing due, after at least
# SETTLED_CHURN sockets fell asleep or woke since the last time it was: told
# SETTLED_DELAY later, once the last flows' closed transports are freed (a loop turn or
# two after their sleep).
SETTLED_CHURN = 256
SETTLED_PARKED = 16
SETTLED_DELAY = 0.1

# So many flows parked at once (awake and quiet, each with its transports) is a crowd:
# the relays' sleep then waits less (relay_sleep.CROWDED_QUIET_SECONDS).
CROWDED_PARKED = 512

# What a socket becomes once its descriptor is gone (a failed wake): every query on it
# fails (EBADF), as on a transport's own socket after it closed; never a bare number that
# another connection's socket may have taken since.
GONE = socket.socket()
GONE.close()


class _AsleepSide(Side):
    """What an asleep flow's side reads as: no transport, no EOF, not lost, nothing
    held.  One per direction for all asleep flows, so nothing may be set on
    it (a bug that would write to one relay's side through it fails loudly instead of
    reaching every asleep relay).  With the compiled build (tcp/relay.py is in it) the
    refusal catches writes from interpreted code; compiled code sets a native class's
    attributes directly, so the pure-Python pass of the tests is what checks it there."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        template = Side(name)
        for slot in SIDE_FIELDS:
            object.__setattr__(self, slot, getattr(template, slot))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"an asleep flow's {self.name} side is shared: "
                             f"{name} cannot be set")


# The stand-ins of every asleep flow's sides, spliced or relayed (they hold nothing of
# any flow).
ASLEEP_SIDES = (_AsleepSide("downstream"), _AsleepSide("upstream"))


def fresh_sides(relay: Relay, lost: bool = False) -> tuple[Side, Side]:
    """New sides for a relay whose sides were the asleep stand-ins (waking, or ending
    asleep: `lost`), set as its own."""
    down, up = Side("downstream"), Side("upstream")
    down.relay = up.relay = relay
    down.lost = up.lost = lost
    relay.downstream, relay.upstream = down, up
    return down, up


class Sleeper(Protocol):
    def woken(self, fd: int) -> None:
        """The socket fd, one of this sleeper's, is readable, has hung up or failed."""


class Parked(Protocol):
    def turned(self) -> None: ...


class Dormancy:
    """The daemon's sleeping sockets and its wheel of quiet flows (one of each, shared
    by the splicer and the relays)."""

    def __init__(self) -> None:
        # Quiet flows by the tick their next look is due in (loop time / WHEEL_TICK,
        # rounded up); `parked` counts them, so `crowded` is not a walk of the wheel.
        self._wheel: dict[int, set[Parked]] = {}
        self.parked = 0  # flows in the wheel
        self._wheel_timer: asyncio.Handle | None = None
        # The sockets of sleeping flows: one epoll, watched by the loop as one
        # descriptor; the kernel keeps each socket's entry (a loop.add_reader per socket
        # costs about 640 bytes of the daemon's memory).  Who sleeps on a descriptor, by
        # its number: descriptors are small dense numbers, so a list indexed by them
        # (8 bytes a number) costs less than a dict (about 37 bytes a sleeping socket).
        self._epoll: select.epoll | None = None
        self._sleeping: list[Sleeper | None] = []
        # Sockets that started or stopped sleeping since start: falling asleep frees a
        # flow's transports (about 2 KiB of the C heap each), so the daemon's memory trim
        # (daemon/memory_trim.py) waits for a burst of sleeps to be over as it does for
        # one of connections.
        self.churn = 0
        # Told (with `churn`) when a burst of sleeps is over, as the wheel sees it: the
        # quiet flows it held have been looked at and few wait (the daemon's memory
        # trim, which would otherwise see the burst's end only at its next check).
        self.settled: Callable[[int], object] | None = None
        self._churn_at_settled = 0

    def watch(self, fd: int, sleeper: Sleeper) -> None:
        """Wake `sleeper` when the socket fd is readable, has hung up or failed."""
        if self._epoll is None:
            self._epoll = select.epoll()
            asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._ready)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.churn += 1
        if fd >= len(self._sleeping):
            self._sleeping.extend([None] * (fd + 1 - len(self._sleeping)))
        self._sleeping[fd] = sleeper

    def unwatch(self, fd: int) -> None:
        if 0 <= fd < len(self._sleeping) and self._sleeping[fd] is not None:
            self._sleeping[fd] = None
            self.churn += 1
            if self._epoll is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # never registered (watch failed for it)

    def _ready(self) -> None:
        assert self._epoll is not None
        for fd, _events in self._epoll.poll(0, 256):
            sleeper = self._sleeping[fd] if fd < len(self._sleeping) else None
            if sleeper is not None:
                sleeper.woken(fd)  # unwatches all of the flow's sockets
            else:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

    def park(self, flow: Parked, due: float) -> int:
        """Keep a quiet flow until `due` (loop time; looked at within WHEEL_TICK after
        it): its `turned()` is called then.  Returns its slot."""
        slot = math.ceil(due / WHEEL_TICK)
        waiting = self._wheel.setdefault(slot, set())
        if flow not in waiting:
            waiting.add(flow)
            self.parked += 1
        if self._wheel_timer is None:
            self._wheel_timer = asyncio.get_running_loop().call_later(WHEEL_TICK, self._turn)
        return slot

    def unpark(self, flow: Parked, slot: int) -> None:
        waiting = self._wheel.get(slot)
        if waiting is not None and flow in waiting:
            waiting.remove(flow)
            self.parked -= 1
            if not waiting:
                del self._wheel[slot]

    def _turn(self) -> None:
        """Look at the parked flows whose slot is due, at most TURN_BATCH of them (the
        rest at the next loop iteration); turn again while any is parked."""
        self._wheel_timer = None
        loop = asyncio.get_running_loop()
        now, budget = loop.time(), TURN_BATCH
        due = math.floor(now / WHEEL_TICK)  # the last slot that is due
        for slot in sorted(slot for slot in self._wheel if slot <= due):
            flows = self._wheel[slot]
            while flows and budget:
                budget -= 1
                self.parked -= 1
                flows.pop().turned()
            if not flows and self._wheel.get(slot) is flows:
                del self._wheel[slot]
            if not budget:
                break
        if any(slot <= due for slot in self._wheel):
            self._wheel_timer = loop.call_soon(self._turn)
            return
        if self._wheel:
            self._wheel_timer = loop.call_later(WHEEL_TICK, self._turn)
        if self.settled is not None and self.churn - self._churn_at_settled >= SETTLED_CHURN \
                and self.parked <= SETTLED_PARKED:
            self._churn_at_settled = self.churn
            loop.call_later(SETTLED_DELAY, self._tell_settled)

    @property
    def crowded(self) -> bool:
        """Whether so many flows are parked, awake and quiet, that they should sleep
        sooner (CROWDED_PARKED)."""
        return self.parked >= CROWDED_PARKED

    def _tell_settled(self) -> None:
        if self.settled is not None:
            self.settled(self.churn)


def quiet_side(side: Side) -> bool:
    """Nothing of this side is in Python: it has a live transport with an empty write
    buffer, read no EOF, holds no early bytes."""
    transport = side.transport
    return not (transport is None or transport.is_closing() or side.got_eof or side.lost
                or transport.get_write_buffer_size() or side.early)


def detach_sides(sides: Sequence[Side]) -> list[socket.socket]:
    """Each side's socket kept and its transport closed (no FIN, no reset), in order;
    the sides' `transport` becomes None.  Stops at the first that cannot be (no
    descriptor free, or the duplicate would take one of limits.reservedFiles): the list
    is then shorter than `sides`, and the caller gives those back their transports."""
    socks: list[socket.socket] = []
    for side in sides:
        assert side.transport is not None
        try:
            sock = detach(side.transport)
        except OSError:
            break
        side.transport = None
        socks.append(sock)
    return socks


def take_back(fd: int) -> socket.socket:
    """A socket object owning the bare descriptor again, or GONE if it cannot be made
    (the descriptor is closed then: adopt reports the side lost)."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        return GONE


def close_bare(fd: int, how_reset: bool) -> None:
    """Close an asleep flow's socket: with a reset (SO_LINGER 0) or a FIN."""
    if how_reset:
        with contextlib.suppress(OSError), borrowed(fd) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        os.close(fd)


async def readopt(socks: list[socket.socket], sides: Sequence[Side]) -> None:
    """New transports for sockets taken back (bare_socket.adopt), then read again."""
    await adopt(socks, list(sides))
    for side in sides:
        side.resume()

"""Every connection the proxy is relaying, whatever path it came by: for drain, for
resetting a vanished pod's connections, and for closing those a new policy no longer
allows (each carries what it was admitted as, judged again by the daemon when the mesh
state changes).  A connection accepted under a fair-share lease (tcp/fairshare.py) gives
it back when it leaves the tracker, or, if it never joined (refused, failed), when its
set-up ends.  A set-up that fails with an unexpected error resets its connection and
logs the peer, so the client is never left waiting on a connection nobody serves."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, NamedTuple, Protocol

from nodeproxy.tcp.fairshare import Lease
from nodeproxy.tcp.relay import Relay, Side, reset

log = logging.getLogger(__name__)

# Decides on an accepted connection before anything is spawned for it: its lease, or None
# (refused: the gate has reset the connection and counted why).
Gate = Callable[[Side], Lease | None]


class Meter(Protocol):
    """What counts a connection's end (telemetry's ConnectionMeter)."""

    def closed(self) -> None: ...


class Tracked(NamedTuple):
    """What the tracker keeps beside a connection; shared by the connections that have the
    same (interned: one object for a pod pair's thousands of idle connections)."""

    pods: tuple[str, ...]  # keys of the local pods it touches
    admitted: Hashable | None  # what its admission decided on (policy.admission.AdmittedAs)


# Interned Tracked values kept at most; past it the table starts again (the values
# connections hold stay valid, they are only no longer shared with newcomers).
_INTERNED_LIMIT = 4096


class ConnectionTracker:
    def __init__(self) -> None:
        self.relays: dict[Relay, Tracked] = {}
        self._interned: dict[Tracked, Tracked] = {}
        self._leases: dict[Relay, Lease] = {}
        self._pending: set[asyncio.Task] = set()
        self._enders: dict[Meter, Callable[[Relay], None]] = {}
        self.accepting = True
        # Connections added plus those that left since start: how much came and went
        # (the daemon's memory trim waits for a burst of them to be over).
        self.churn = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's set-up; drain waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def client_side(self, serve: Callable[[Side], Coroutine[Any, Any, None]],
                    gate: Gate | None = None) -> Side:
        """A protocol for a connection accepted on a proxy listener: paused until `serve`
        has decided where it goes; reset at once while the proxy drains or when `gate`
        refuses it."""
        return _Accepted(self, serve, gate)

    def add(self, relay: Relay, *pods: str, lease: Lease | None = None,
            admitted: Hashable | None = None) -> tuple[str, ...]:
        """Track ``relay``; ``admitted``: what the decision that let it in read, for
        ``revoke`` (None: no admission decided on it here).  Returns its pod keys as the
        tracker keeps them (shared with the connections between the same pods: a splice
        keeps that tuple rather than one of its own)."""
        tracked = Tracked(pods, admitted)
        interned = self._interned.get(tracked)
        if interned is None:
            if len(self._interned) >= _INTERNED_LIMIT:
                self._interned.clear()
            interned = self._interned[tracked] = tracked
        self.relays[relay] = interned
        self.churn += 1
        if lease is not None:
            lease.adopted = True
            self._leases[relay] = lease
        return interned.pods

    def ender(self, meter: Meter) -> Callable[[Relay], None]:
        """What a relay calls when it ends: leave the tracker and count the end on meter.
        One per meter (a label set), not a closure per connection."""
        ender = self._enders.get(meter)
        if ender is None:
            ender = self._enders[meter] = functools.partial(self._ended, meter)
        return ender

    def _ended(self, meter: Meter, relay: Relay) -> None:
        self.discard(relay)
        meter.closed()

    def discard(self, relay: Relay) -> None:
        if self.relays.pop(relay, None) is not None:
            self.churn += 1
        lease = self._leases.pop(relay, None)
        if lease is not None:
            lease.release()

    async def drain(self, grace: float) -> int:
        """Stop accepting; wait up to `grace` seconds for relays to end; reset the rest.
        Returns how many had to be reset."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=grace)
        for tracked in list(self.relays):
            begin_drain = getattr(tracked, "begin_drain", None)
            if begin_drain is not None:
                begin_drain()  # HTTP: close idle keep-alive connections, GOAWAY the rest
        while self.relays and loop.time() < deadline:
            await asyncio.wait([r.done for r in self.relays], timeout=deadline - loop.time())
        leftover = list(self.relays)
        for relay in leftover:
            relay.abort()
        return len(leftover)

    def close_idle(self, idle_seconds: float, now: float) -> int:
        """Close relayed (opaque TCP) flows that moved no byte either way for idle_seconds;
        how many.  Spliced flows are the kernel's (their bytes are not seen here) and HTTP
        connections have timeouts of their own."""
        idle = [relay for relay in self.relays
                if isinstance(relay, Relay) and relay.splice is None
                and now - relay.last_active >= idle_seconds]
        for relay in idle:
            relay.close()
        return len(idle)

    def abort_pod(self, key: str) -> None:
        for relay, tracked in list(self.relays.items()):
            if key in tracked.pods:
                relay.abort()

    def revoke(self, still_allowed: Callable[[Hashable], bool]) -> list[Hashable]:
        """Reset every connection whose admission ``still_allowed`` now refuses (asked once
        per distinct admission); what each reset one was admitted as."""
        verdicts: dict[Hashable, bool] = {}
        revoked = []
        for relay, tracked in list(self.relays.items()):
            admitted = tracked.admitted
            if admitted is None:
                continue
            allowed = verdicts.get(admitted)
            if allowed is None:
                allowed = verdicts[admitted] = still_allowed(admitted)
            if not allowed:
                revoked.append(admitted)
                relay.abort()
        return revoked


class _Accepted(Side):
    __slots__ = ("_gate", "_serve", "_tracker")

    def __init__(self, tracker: ConnectionTracker,
                 serve: Callable[[Side], Coroutine[Any, Any, None]], gate: Gate | None):
        super().__init__("downstream", start_paused=True)
        self._tracker = tracker
        self._serve = serve
        self._gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._tracker.accepting:
            reset(self.transport)
            return
        if self._gate is not None:
            self.lease = self._gate(self)
            if self.lease is None:
                return
        self._tracker.spawn(self._run())

    async def _run(self) -> None:
        try:
            await self._serve(self)
        except Exception:
            # A defect in the set-up (the serve's own refusals reset and return): the
            # connection is reset, not left open with nobody reading it.
            transport = self.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            log.exception("connection from %s: set-up failed; reset", peer)
            reset(transport)
        finally:
            lease = self.lease
            if lease is not None and not lease.adopted:
                lease.release()  # refused or failed before a relay took the connection

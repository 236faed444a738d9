"""Every connection the proxy is relaying, whatever path it came by: for drain and for
resetting a vanished pod's connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from nodeproxy.proxy.relay import Relay, Side, reset


class ConnectionTracker:
    def __init__(self) -> None:
        self.relays: dict[Relay, set[str]] = {}  # relay -> keys of the local pods it touches
        self._pending: set[asyncio.Task] = set()
        self.accepting = True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's set-up; drain waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def client_side(self, serve: Callable[[Side], Coroutine[Any, Any, None]]) -> Side:
        """A protocol for a connection accepted on a proxy listener: paused until `serve`
        has decided where it goes; reset at once while the proxy drains."""
        return _Accepted(self, serve)

    def add(self, relay: Relay, *pods: str) -> None:
        self.relays[relay] = set(pods)

    def discard(self, relay: Relay) -> None:
        self.relays.pop(relay, None)

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

    def abort_pod(self, key: str) -> None:
        for relay, pods in list(self.relays.items()):
            if key in pods:
                relay.abort()


class _Accepted(Side):
    def __init__(self, tracker: ConnectionTracker,
                 serve: Callable[[Side], Coroutine[Any, Any, None]]):
        super().__init__("downstream", start_paused=True)
        self._tracker = tracker
        self._serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._tracker.accepting:
            reset(self.transport)
            return
        self._tracker.spawn(self._serve(self))

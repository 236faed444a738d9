"""Upstream HTTP connections per endpoint, reused across client connections.

A pool is keyed by (source pod, endpoint address and port, upstream protocol, service):
the connection's path depends on the source (a transparent connection into a local pod
carries the client pod's address; an HBONE stream carries its identity), so two source
pods never share one.  HTTP/1.1 connections carry one request at a time and go back to
the pool when their response ends; HTTP/2 connections carry many streams.  Connections
idle for the service's idleTimeoutSeconds are closed.  Each endpoint keeps its
balancing statistics (balancer.EndpointStats) across configuration reloads.

HTTP/2 connections grow with the streams in use, not with requests: a request that finds
no free stream waits for a connection being opened while that one's first streams
(h2.INITIAL_STREAMS) are not all spoken for, as Envoy's pool does, rather than open a
connection of its own; and an HTTP/2 pool keeps at most one connection idle past a sweep.
A burst of requests (or of a client's cancelled streams) opens one connection per
INITIAL_STREAMS requests in flight and leaves one behind.

A pool belongs to one service, whose circuit breaker (circuit_breaker.py) counts its
connections and makes requests wait (pending) when the service is at maxConnections;
an HTTP/1.1 connection going idle or an HTTP/2 stream ending wakes the pool's oldest
waiter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nodeproxy.codec.h1 import H1Client
from nodeproxy.codec.h2 import INITIAL_STREAMS, H2Client
from nodeproxy.codec.message import UpstreamConnection, UpstreamError, UpstreamResponse
from nodeproxy.http.balancer import EndpointStats
from nodeproxy.http.circuit_breaker import CircuitBreaker
from nodeproxy.mesh.destinations import Backend

log = logging.getLogger(__name__)

# Opens a connection for the given protocol object (upstream.Upstreams.open, bound).
Connector = Callable[[UpstreamConnection], Awaitable[object]]


class Endpoint:
    """One backend address of a service, as the balancer sees it.

    ``key`` ("address:port", "[v6]:port") is read several times per request, so it is
    made here, once: an attribute, not a ``functools.cached_property``, which a compiled
    build (nodeproxy/native.py) runs as a plain property, formatting the address again
    at every read (docs/benchmarks.md, "L7 per-request cost, tenth round")."""

    def __init__(self, backend: Backend, stats: EndpointStats | None = None):
        self.backend = backend
        self.stats = stats if stats is not None else EndpointStats()
        address = backend.address
        host = f"[{address}]" if address.version == 6 else str(address)
        self.key = f"{host}:{backend.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.key}, {self.stats!r})"


class EndpointPool:
    def __init__(self, connector: Connector, *, http2: bool, idle_timeout: float,
                 breaker: CircuitBreaker | None = None):
        self._connector = connector
        self.http2 = http2
        self.idle_timeout = idle_timeout
        self.breaker = breaker
        self._connections: list[UpstreamConnection] = []
        self._idle_since: dict[int, float] = {}  # HTTP/1.1 connections back in the pool
        # HTTP/1.1 connections as they went idle, the latest last: a request takes the
        # latest without walking the busy ones (entries are checked when taken).
        self._free: list[UpstreamConnection] = []
        self.opened = 0
        self._connecting = 0  # connections being opened
        self._joined = 0  # HTTP/2 requests waiting for a connection being opened
        self._opening_waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first open

    def take(self) -> UpstreamConnection | None:
        """A pooled connection that can take a request now, or None (then acquire()); as
        acquire, the caller must call send() before its next await."""
        return self._take()

    def _take(self) -> UpstreamConnection | None:
        """The HTTP/1.1 connection that went idle last, else the first connection that can
        take a request now, or None; closed connections met on the way are dropped (all
        of them when None is returned, so the count the circuit breaker is asked about
        holds only live ones)."""
        free = self._free
        while free:
            connection = free.pop()
            if connection.can_take():
                self._idle_since.pop(id(connection), None)
                return connection
        stale = False
        found = None
        for connection in self._connections:
            if connection.closed:
                stale = True
            elif connection.can_take():
                found = connection
                break
        if stale:
            self._connections = [c for c in self._connections if not c.closed]
        if found is not None:
            self._idle_since.pop(id(found), None)
        return found

    async def acquire(self) -> UpstreamConnection:
        """A connection that can take a request now: pooled, or newly opened, or (the
        service at maxConnections) the next one to come free, waiting as a pending
        request (circuit_breaker.Overflow past maxPendingRequests).  The caller must call
        send() before its next await (that is what marks it taken)."""
        connection = self._take()
        if connection is not None:
            return connection
        if self.http2:
            connection = await self._join_opening()
            if connection is not None:
                return connection
        breaker = self.breaker
        if breaker is None or breaker.may_open(len(self._connections) + self._connecting):
            return await self._open()
        breaker.begin_pending()
        try:
            woken = False
            while True:
                await breaker.wait(self, front=woken)
                woken = True
                connection = self._take()
                if connection is not None:
                    return connection
                if breaker.may_open(len(self._connections) + self._connecting):
                    return await self._open()
        finally:
            breaker.end_pending()

    async def _join_opening(self) -> UpstreamConnection | None:
        """HTTP/2: wait for a connection being opened while its first streams are not all
        spoken for; None when there is none to wait for (open one)."""
        loop = asyncio.get_running_loop()
        while self._connecting and self._joined < self._connecting * INITIAL_STREAMS:
            future: asyncio.Future[None] = loop.create_future()
            self._opening_waiters.append(future)
            self._joined += 1
            try:
                await future
            finally:
                self._joined -= 1
                if not future.done():
                    future.cancel()
                    self._opening_waiters.remove(future)
            connection = self._take()
            if connection is not None:
                return connection
        return None

    def _opening_done(self) -> None:
        waiters, self._opening_waiters = self._opening_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _open(self) -> UpstreamConnection:
        connection: UpstreamConnection
        breaker = self.breaker
        if breaker is None:
            connection = H2Client() if self.http2 else H1Client(on_idle=self._idle)
        else:
            breaker.opened()
            release = _once(breaker.closed)
            connection = (_CountedH2(release, lambda: breaker.idle(self)) if self.http2
                          else _CountedH1(release, on_idle=self._idle))
        self._loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            await self._connector(connection)
        except BaseException:
            connection.close()
            raise
        finally:
            self._connecting -= 1
            if self.http2:
                # Wake the joined requests after ours has taken its stream (a failure
                # wakes them now: they try the pool, then open their own).
                asyncio.get_running_loop().call_soon(self._opening_done)
        self.opened += 1
        if connection.closed:
            connection.close()
            raise UpstreamError("UF", "upstream connection closed at once")
        self._connections.append(connection)
        return connection

    def _idle(self, connection: H1Client) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._idle_since[id(connection)] = loop.time()
        self._free.append(connection)
        if self.breaker is not None:
            self.breaker.idle(self)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout, and every idle
        HTTP/2 connection but one."""
        h2_idle_kept = False
        for connection in self._connections:
            if connection.closed:
                continue
            if isinstance(connection, H2Client):
                since = connection.idle_since
                if since is not None and now - since < self.idle_timeout and not h2_idle_kept:
                    h2_idle_kept = True
                    continue
            else:
                since = self._idle_since.get(id(connection)) if connection.can_take() else None
            if since is not None and (isinstance(connection, H2Client)
                                      or now - since >= self.idle_timeout):
                connection.close()
        self._connections = [c for c in self._connections if not c.closed]
        live = {id(c) for c in self._connections}
        self._idle_since = {k: v for k, v in self._idle_since.items() if k in live}
        self._free = [c for c in self._free if c.can_take()]

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()
        self._idle_since.clear()
        self._free.clear()

    @property
    def size(self) -> int:
        return sum(not c.closed for c in self._connections)


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            callback()

    return call


class _CountedH1(H1Client):
    """An HTTP/1.1 connection that tells its service's circuit breaker when it ends."""

    def __init__(self, release: Callable[[], None],
                 on_idle: Callable[[H1Client], None] | None = None):
        super().__init__(on_idle=on_idle)
        self._on_breaker_close = release

    def close(self) -> None:
        super().close()
        self._on_breaker_close()

    def abort(self) -> None:
        super().abort()
        self._on_breaker_close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._on_breaker_close()


class _CountedH2(H2Client):
    """An HTTP/2 connection that tells its service's circuit breaker when it ends, and
    when one of its streams ends (a request waiting for a stream may go)."""

    def __init__(self, release: Callable[[], None], stream_ended: Callable[[], None]):
        super().__init__(on_lost=lambda _c: release())
        self._on_breaker_close = release
        self._on_stream_end = stream_ended

    def _forget(self, stream: Any) -> None:
        super()._forget(stream)
        self._on_stream_end()

    def close(self) -> None:
        super().close()
        self._on_breaker_close()


def abort_exchange(connection: UpstreamConnection,
                   response: UpstreamResponse | None = None) -> None:
    """Give up one exchange on a pooled connection.  HTTP/1.1 carries one exchange, so the
    connection goes; HTTP/2 resets just the stream (cancelling the response body, or the
    cancelled send did it already) and its other streams carry on."""
    if isinstance(connection, H2Client):
        cancel = getattr(response.body, "cancel", None) if response is not None else None
        if cancel is not None:
            cancel()
        return
    abort = getattr(connection, "abort", None)
    if abort is not None:
        abort()
    else:
        connection.close()

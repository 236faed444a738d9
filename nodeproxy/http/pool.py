"""Upstream HTTP connections per endpoint, reused across client connections.

A pool is keyed by (source pod, endpoint address and port, upstream protocol): the
connection's path depends on the source (a transparent connection into a local pod
carries the client pod's address; an HBONE stream carries its identity), so two source
pods never share one.  HTTP/1.1 connections carry one request at a time and go back to
the pool when their response ends; HTTP/2 connections carry many streams.  Connections
idle for the service's idleTimeoutSeconds are closed.  Each endpoint keeps its
balancing statistics (balancer.EndpointStats) across configuration reloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nodeproxy.http.balancer import EndpointStats
from nodeproxy.http.h1 import H1Client
from nodeproxy.http.h2 import H2Client
from nodeproxy.http.message import UpstreamConnection, UpstreamError
from nodeproxy.proxy.destinations import Backend

log = logging.getLogger(__name__)

# Opens a connection for the given protocol object (upstream.Upstreams.open, bound).
Connector = Callable[[UpstreamConnection], Awaitable[object]]


@dataclass(eq=False)
class Endpoint:
    """One backend address of a service, as the balancer sees it."""

    backend: Backend
    stats: EndpointStats = field(default_factory=EndpointStats)

    @property
    def key(self) -> str:
        address = self.backend.address
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{host}:{self.backend.port}"


class EndpointPool:
    def __init__(self, connector: Connector, *, http2: bool, idle_timeout: float):
        self._connector = connector
        self.http2 = http2
        self.idle_timeout = idle_timeout
        self._connections: list[UpstreamConnection] = []
        self._idle_since: dict[int, float] = {}  # HTTP/1.1 connections back in the pool
        self.opened = 0

    async def acquire(self) -> UpstreamConnection:
        """A connection that can take a request now: pooled, or newly opened.  The caller
        must call send() before its next await (that is what marks it taken)."""
        self._connections = [c for c in self._connections if not c.closed]
        for connection in self._connections:
            if connection.can_take():
                self._idle_since.pop(id(connection), None)
                return connection
        connection: UpstreamConnection
        connection = H2Client() if self.http2 else H1Client(on_idle=self._idle)
        await self._connector(connection)
        self.opened += 1
        if connection.closed:
            raise UpstreamError("UF", "upstream connection closed at once")
        self._connections.append(connection)
        return connection

    def _idle(self, connection: H1Client) -> None:
        self._idle_since[id(connection)] = asyncio.get_running_loop().time()

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout."""
        for connection in self._connections:
            if connection.closed:
                continue
            if isinstance(connection, H2Client):
                since = connection.idle_since
            else:
                since = self._idle_since.get(id(connection)) if connection.can_take() else None
            if since is not None and now - since >= self.idle_timeout:
                connection.close()
        self._connections = [c for c in self._connections if not c.closed]
        live = {id(c) for c in self._connections}
        self._idle_since = {k: v for k, v in self._idle_since.items() if k in live}

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()
        self._idle_since.clear()

    @property
    def size(self) -> int:
        return sum(not c.closed for c in self._connections)

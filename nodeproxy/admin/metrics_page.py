"""The Prometheus page of the daemon's metrics faces, and how often it is rendered.

The metrics port listens on every address, so any enrolled pod can ask for the page as
fast as it reads it, on as many connections as a face admits; each rendering walks every
series of the registry on the daemon's one event-loop thread, the thread every pod's
traffic needs.  A client other than the node itself (a pod, Prometheus) therefore gets
a page at most SHARE_SECONDS old: within that time after a rendering it is served the
same bytes, so a flood of scrapes costs one rendering per SHARE_SECONDS however many
pods join it.  The node itself (loopback: the admin port, `nodeproxy stat`, a probe run
on the node) always gets a fresh page, and refreshes the shared one.  Prometheus
scrapes every 15 s or more by default; a page up to 1 s old is what it would have read
a moment earlier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from nodeproxy.admin.http_server import NODE_SOURCES

SHARE_SECONDS = 1.0


class MetricsPage:
    def __init__(self, registry: CollectorRegistry, *, share_seconds: float = SHARE_SECONDS,
                 node_sources: frozenset[str] = NODE_SOURCES,
                 clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._share_seconds = share_seconds
        self._node_sources = node_sources
        self._clock = clock
        self._body: bytes | None = None
        self._rendered_at = -math.inf
        self.rendered = 0  # pages rendered
        self.shared = 0  # pages served from the last rendering

    def body(self, source: str) -> bytes:
        """The page for a client at ``source`` (its address, as the face saw it)."""
        now = self._clock()
        if (source not in self._node_sources and self._body is not None
                and now - self._rendered_at < self._share_seconds):
            self.shared += 1
            return self._body
        self._body = generate_latest(self._registry)
        self._rendered_at = now
        self.rendered += 1
        return self._body

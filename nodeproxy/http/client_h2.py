"""The HTTP/2 server of a captured client connection: H2Server (codec/h2.py) plus the
request-header timeout and the tracker's close callback (client_connections.py makes
one per HTTP/2 client connection).

Its own module because it is compiled with the codec (nodeproxy/native.py): H2Server is
a native class in the compiled build, and a native class refuses to construct an
interpreted subclass ("interpreted classes cannot inherit from compiled"), so a subclass
defined in an interpreted module would fail every HTTP/2 client connection
(docs/benchmarks.md, "HTTP/2 compiled, third round").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nodeproxy.codec.h2 import ErrorCodes, H2Server

log = logging.getLogger(__name__)


class ClientH2Server(H2Server):
    """An HTTP/2 client connection that tells its tracker when it ends, and holds the
    client to the request-header timeout: its first request's header block must be
    complete within it of the connection's start, and any header block (HEADERS and its
    CONTINUATIONs: h2 refuses every other frame until it ends, so one unfinished block
    stalls the whole connection) within it of its first byte.  Past it: GOAWAY
    (ENHANCE_YOUR_CALM) and close."""

    on_closed: Callable[[], None] | None = None
    _headers_timeout: float | None = None
    _on_timeout: Callable[[str], None] | None = None
    _head_since: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def watch_heads(self, timeout: float, since: float | None,
                    on_timeout: Callable[[str], None]) -> None:
        """Start the first request's clock (at loop time `since`, default now)."""
        self._headers_timeout = timeout
        self._on_timeout = on_timeout
        self._head_since = since if since is not None else self._loop.time()
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_timeout is None or self.requests == 0:
            return  # before the first request the connection's own clock runs
        if self._head_pending():
            if self._head_since is None:
                self._head_since = self._loop.time()
                self._arm_head_timer()
        else:
            self._head_since = None

    def _head_pending(self) -> bool:
        """A header block has begun and not ended (h2_connection.CheckedFrameBuffer, the
        buffer of every ProxyH2Connection; h2's stubs type it as h2's own FrameBuffer)."""
        buffer: Any = self.conn.incoming_buffer
        return bool(buffer.head_pending)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._headers_timeout is not None \
                and self._head_since is not None:
            delay = self._head_since + self._headers_timeout - self._loop.time()
            self._head_timer = self._loop.call_later(max(delay, 0.0), self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        if self._head_since is None or not self.usable or self._headers_timeout is None:
            return
        if self.requests and not self._head_pending():
            self._head_since = None
            return
        left = self._head_since + self._headers_timeout - self._loop.time()
        if left > 0:
            self._arm_head_timer()
            return
        self._head_since = None
        if self._on_timeout is not None:
            self._on_timeout("request_headers")
        log.info("HTTP/2 client %s sent no whole request head within %.1fs: closing",
                 self.peername, self._headers_timeout)
        # Past H2Server's _protocol_error: a timeout is counted as one, not as a bad request.
        self._close_for_error(int(ErrorCodes.ENHANCE_YOUR_CALM), "request header timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)
        if self.on_closed is not None:
            self.on_closed()

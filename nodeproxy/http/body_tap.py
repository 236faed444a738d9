"""The client's request body as the primary exchange reads it, with a copy kept for
mirrored requests (mirror.py) while the body stays small enough to copy.

Its own module because the request's context (context.py) carries the tap and the
mirrors need the context: neither imports the other through it.
"""

from __future__ import annotations

import asyncio

from nodeproxy.codec.message import Body, BodyError, Headers


class BodyTap:
    """The client's request body as the primary reads it (ReplayableBody's source), with
    a copy kept for mirrors while the whole body stays within ``limit`` bytes.

    ``copy()`` waits until the body is complete and returns it, or returns why there is
    none: ``body_too_large`` (past the limit, or a Content-Length above it),
    ``body_incomplete`` (the client broke off, or the primary ended without reading it
    all).  Reading never waits for a mirror.
    """

    def __init__(self, source: Body, limit: int, content_length: int | None):
        self.source = source
        self._limit = limit
        # One buffer, not the chunks as read: a client's body in 2-byte chunks (HTTP/1.1
        # chunked, HTTP/2 DATA frames) kept ~21 bytes per byte counted as a list of bytes.
        self._copy = bytearray()
        self._size = 0
        self._settled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if content_length is not None and content_length > limit:
            self._settle("body_too_large")
        elif source.ended and source.buffered == 0:
            self._settle("")

    # What ReplayableBody reads of its source.
    @property
    def ended(self) -> bool:
        return self.source.ended

    @property
    def buffered(self) -> int:
        return self.source.buffered

    @property
    def trailers(self) -> Headers | None:
        return self.source.trailers

    async def read(self) -> bytes:
        try:
            data = await self.source.read()
        except BodyError:
            self._settle("body_incomplete")
            raise
        if self._settled.done():
            return data
        if not data:
            self._settle("")
        else:
            self._size += len(data)
            if self._size > self._limit:
                self._copy = bytearray()
                self._settle("body_too_large")
            else:
                self._copy += data
        return data

    def primary_done(self) -> None:
        """The primary exchange ended: a body not read to its end cannot be mirrored."""
        self._settle("body_incomplete")

    def _settle(self, reason: str) -> None:
        if not self._settled.done():
            self._settled.set_result(reason)

    async def copy(self) -> Body | str:
        """The whole body (a fresh Body, trailers included), or the reason there is none."""
        reason = await self._settled
        if reason:
            return reason
        body = Body()
        body.feed(bytes(self._copy))
        body.end(self.source.trailers)
        return body

"""A hostile client's body fed in tiny chunks (each HTTP/1.1 chunk, each HTTP/2 DATA frame
arrives alone): what a body's reader holds meanwhile, measured with tracemalloc, and the
digest of what the reader passed on (tests of the retry record and the mirrors' tap)."""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
from collections.abc import Awaitable, Callable

from nodeproxy.codec.message import Body


async def feed_in_tiny_chunks(source: Body, read: Callable[[], Awaitable[bytes]],
                              payload: bytes, step: int = 2) -> tuple[int, bytes]:
    """Feed `payload` into `source` `step` bytes at a time, reading each through `read`:
    (bytes newly held when the last chunk has been read, SHA-256 of what was read)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        passed = hashlib.sha256()
        for i in range(0, len(payload), step):
            source.feed(payload[i:i + step])
            passed.update(await read())
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, passed.digest()
    finally:
        tracemalloc.stop()

"""ReplayableBody (codec/message.py) against a client that chooses its chunks: what the
record costs, and every attempt sending exactly the client's bytes (review8)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from nodeproxy.codec.message import Body, BodyError, ReplayableBody
from tests.unit.tiny_chunks import feed_in_tiny_chunks

LIMIT = 64 * 1024  # retry_buffer_bytes' default


async def _drain(reader) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray()
    while data := await reader.read():
        out += data
    return bytes(out)


def test_a_body_in_tiny_chunks_costs_the_record_what_it_counts() -> None:
    """A client's body in 2-byte chunks (each HTTP/1.1 chunk, each HTTP/2 DATA frame, is
    fed alone) kept a bytes object and a list slot per chunk in the retry record: ~1.3 MB
    held for 60 KB counted under the 64 KiB limit, per request with retries (the default
    policy retries twice), up to 100 per HTTP/2 connection."""
    size = 60_000
    payload = random.Random(8).randbytes(size)

    async def main() -> tuple[int, bytes, bytes]:
        source = Body()
        body = ReplayableBody(source, LIMIT)
        first = body.reader()
        held, sent = await feed_in_tiny_chunks(source, first.read, payload)
        source.end()
        assert await first.read() == b"" and first.ended
        retry = await _drain(body.reader())  # a second attempt replays the record
        return held, sent, hashlib.sha256(retry).digest()

    held, first, retry = asyncio.run(main())
    assert first == retry == hashlib.sha256(payload).digest()
    assert held < 2 * size, held


@pytest.mark.parametrize("seed", range(20))
def test_every_attempt_sends_the_clients_bytes_whatever_the_chunks(seed: int) -> None:
    """Attempts that give up at random points, each followed by a new one, interleaved
    with the client's chunks of random sizes: every attempt that reads to the end sends
    the very body; past the limit no new attempt may start."""
    rng = random.Random(seed)
    limit = rng.choice([0, 10, 1000, LIMIT])
    chunks = [rng.randbytes(rng.choice([1, 2, 7, 300, 5000])) for _ in range(rng.randrange(1, 60))]
    whole = b"".join(chunks)

    async def main() -> None:
        source = Body()
        body = ReplayableBody(source, limit)
        reader, got = body.reader(), bytearray()
        for chunk in chunks:
            source.feed(chunk)
            got += await reader.read()
            if rng.random() < 0.2:  # this attempt fails; a retry starts over
                if not body.replayable:
                    with pytest.raises(BodyError):
                        body.reader()
                    return
                reader, got = body.reader(), bytearray()
                got += await reader.read() if rng.random() < 0.5 else b""
        source.end()
        got += await _drain(reader)
        assert bytes(got) == whole and reader.ended and reader.sent == len(whole)
        assert body.replayable == (len(whole) <= limit)

    asyncio.run(main())

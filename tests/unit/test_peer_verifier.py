"""The testbed peer's stream verifier: it says whether every byte arrived as sent, and
where the first wrong one is (the lead a data-integrity failure needs)."""

from __future__ import annotations

from nodeproxy_dev.testbed.peer import BLOCK, Stream, Verifier


def feed_all(data: bytes, length: int, piece: int = 1000) -> Verifier:
    verifier = Verifier(Stream(b"s" * 16, length))
    for start in range(0, len(data), piece):
        verifier.feed(data[start:start + piece])
    return verifier


def the_stream(length: int) -> bytes:
    return b"".join(Stream(b"s" * 16, length).chunks())


def test_the_stream_as_sent_is_complete() -> None:
    verifier = feed_all(the_stream(3 * BLOCK + 7), 3 * BLOCK + 7)
    assert verifier.complete and verifier.first_difference is None


def test_a_changed_byte_is_found_where_it_is() -> None:
    data = bytearray(the_stream(2 * BLOCK))
    data[BLOCK + 5] ^= 1
    verifier = feed_all(bytes(data), 2 * BLOCK)
    assert not verifier.complete and verifier.first_difference == BLOCK + 5


def test_a_repeated_range_is_found_where_it_starts() -> None:
    data = the_stream(2 * BLOCK)
    duplicated = data[:500] + data[447:500] + data[500:]  # 53 bytes delivered twice
    verifier = feed_all(duplicated, 2 * BLOCK)
    assert not verifier.complete and verifier.position == 2 * BLOCK + 53
    assert verifier.first_difference is not None and 447 <= verifier.first_difference <= 500


def test_bytes_past_the_end_are_a_difference() -> None:
    verifier = feed_all(the_stream(100) + b"x", 100)
    assert not verifier.complete and verifier.first_difference == 100

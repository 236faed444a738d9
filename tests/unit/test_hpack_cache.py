"""hpack_cache.py: a cached coder gives exactly what hpack's gives, over random histories.

Each test drives a CachingEncoder/CachingDecoder and a plain hpack Encoder/Decoder with the
same calls (header lists that repeat, change a value, add or drop a field, mark one never
indexed, change the table size; blocks that reference the table, add to it, update its
size, overflow the limits, are malformed) and requires the same bytes, the same headers
(types included), the same errors and the same dynamic tables after every call.
"""

from __future__ import annotations

import random

import h2.config
import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError

from nodeproxy.codec import hpack_cache
from nodeproxy.codec.h2_connection import ProxyH2Connection
from nodeproxy.codec.hpack_cache import CachingDecoder, CachingEncoder

NAMES = [b":status", b"server", b"date", b"content-type", b"etag", b"x-request-id",
         b"grpc-status", b"cookie", b"authorization", b"x-custom"]
VALUES = [b"200", b"404", b"nginx", b"a", b"b", b"application/grpc", b"0", b"",
          b"x" * 40, b"Mon, 07 Dec 2026 17:00:00 GMT"]


def _table(coder: Encoder | Decoder) -> tuple[object, ...]:
    t = coder.header_table
    return (list(t.dynamic_entries), t.maxsize, t.resized, t._current_size)


def _random_list(rng: random.Random, pool: list[list[tuple[bytes, bytes]]]) -> list:
    if pool and rng.random() < 0.6:
        fields = list(rng.choice(pool))
        roll = rng.random()
        if roll < 0.15 and fields:
            i = rng.randrange(len(fields))
            fields[i] = (fields[i][0], rng.choice(VALUES))
        elif roll < 0.25:
            fields.append((rng.choice(NAMES), rng.choice(VALUES)))
        elif roll < 0.3 and fields:
            fields.pop(rng.randrange(len(fields)))
        elif roll < 0.38 and fields:
            i = rng.randrange(len(fields))
            fields[i] = NeverIndexedHeaderTuple(*fields[i][:2])
        elif roll < 0.42 and fields:
            i = rng.randrange(len(fields))
            fields[i] = HeaderTuple(*fields[i][:2])
        elif roll < 0.46 and fields:
            i = rng.randrange(len(fields))
            name, value = fields[i][0], fields[i][1]
            fields[i] = (name.decode() if isinstance(name, bytes) else name,
                         value.decode() if isinstance(value, bytes) else value)
        elif roll < 0.48 and fields:
            i = rng.randrange(len(fields))
            fields[i] = (fields[i][0], fields[i][1], True)  # hpack's sensitive flag
        fields = [f if len(f) == 2 or rng.random() < 0.5 else f[:2] for f in fields]
    else:
        fields = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(0, 6))]
    pool.append(fields)
    return fields


@pytest.mark.parametrize("seed", range(40))
def test_a_cached_encoder_gives_hpacks_bytes_and_table(seed: int) -> None:
    rng = random.Random(seed)
    cached, plain = CachingEncoder(), Encoder()
    pool: list[list[tuple[bytes, bytes]]] = []
    hits = 0
    for _ in range(400):
        if rng.random() < 0.02:
            size = rng.choice([0, 64, 256, 4096, 8192])
            cached.header_table_size = plain.header_table_size = size
        fields = _random_list(rng, pool)
        huffman = rng.random() < 0.9
        as_generator = rng.random() < 0.2
        before = len(cached._kept)
        got = cached.encode(iter(fields) if as_generator else list(fields), huffman=huffman)
        want = plain.encode(list(fields), huffman=huffman)
        assert got == want
        assert _table(cached) == _table(plain)
        hits += len(cached._kept) == before and bool(cached._kept)
        # the peer's decoder reads the same fields from both
    assert len(cached._kept) <= hpack_cache.ENTRIES
    assert hits > 0


def test_the_encoder_keeps_nothing_for_lists_it_cannot_key() -> None:
    cached = CachingEncoder()
    for fields in ([(b"a", 1)], [(b"a", b"b", True)], {b"a": b"b"},
                   [(b"x", b"y")] * (hpack_cache.MAX_FIELDS + 1)):
        for _ in range(3):
            cached.encode(fields)
        assert not cached._kept


def test_a_repeated_head_is_served_from_what_was_kept_until_the_table_changes() -> None:
    cached, plain = CachingEncoder(), Encoder()
    head = [(b":status", b"200"), (b"server", b"nginx"), (b"date", b"d1")]
    for _ in range(3):
        assert cached.encode(head) == plain.encode(head)
    assert len(cached._kept) == 1
    # a new date: added to the table, all kept results dropped, the bytes still hpack's
    head2 = [(b":status", b"200"), (b"server", b"nginx"), (b"date", b"d2")]
    assert cached.encode(head2) == plain.encode(head2)
    assert not cached._kept
    assert cached.encode(head) == plain.encode(head)  # now a reference to the old entry
    # a never-indexed field equal as a tuple to an indexed one is not the same key
    secret = [(b":status", b"200"), NeverIndexedHeaderTuple(b"server", b"nginx")]
    assert cached.encode(secret) == plain.encode(secret)
    assert cached.encode([(b":status", b"200"), (b"server", b"nginx")]) == \
        plain.encode([(b":status", b"200"), (b"server", b"nginx")])


def _block(rng: random.Random, encoder: Encoder) -> bytes:
    """A block a peer might send: a real encoder's (which references its table), or
    bytes mutated from one, or raw representations (size updates, literals)."""
    fields = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(0, 5))]
    roll = rng.random()
    if roll < 0.1:
        encoder.header_table_size = rng.choice([0, 100, 4096])
    block = encoder.encode(fields, huffman=rng.random() < 0.5)
    if roll > 0.9 and block:
        data = bytearray(block)
        data[rng.randrange(len(data))] = rng.randrange(256)
        block = bytes(data)
    elif 0.85 < roll <= 0.9:
        block = bytes([0x20 | rng.randrange(32)]) + block  # a table size update
    elif 0.8 < roll <= 0.85:
        block = bytes([0x80 | rng.randrange(62, 80)])  # a reference past the table
    return block


@pytest.mark.parametrize("seed", range(40))
def test_a_cached_decoder_gives_hpacks_headers_errors_and_table(seed: int) -> None:
    rng = random.Random(1000 + seed)
    peer = Encoder()
    cached, plain = CachingDecoder(4096), Decoder(4096)
    blocks: list[bytes] = []
    hits = 0
    for _ in range(400):
        if rng.random() < 0.03:
            cached.max_header_list_size = plain.max_header_list_size = rng.choice([60, 4096])
        if rng.random() < 0.02:
            size = rng.choice([0, 100, 4096])
            cached.max_allowed_table_size = plain.max_allowed_table_size = size
        block = rng.choice(blocks) if blocks and rng.random() < 0.5 else _block(rng, peer)
        blocks.append(block)
        raw = rng.random() < 0.8
        before = len(cached._kept)
        try:
            want = plain.decode(block, raw=raw)
        except HPACKError as e:
            with pytest.raises(type(e)):
                cached.decode(block, raw=raw)
        else:
            got = cached.decode(memoryview(block) if rng.random() < 0.2 else block, raw=raw)
            assert got == want
            assert [type(h) for h in got] == [type(h) for h in want]
            hits += len(cached._kept) == before and bool(cached._kept)
        assert _table(cached) == _table(plain)
    assert hits > 0


def test_a_kept_decoding_is_a_new_list_each_time() -> None:
    peer, cached = Encoder(), CachingDecoder(4096)
    fields = [(b":method", b"GET"), (b":path", b"/x"), (b"accept", b"*/*")]
    cached.decode(peer.encode(fields), raw=True)  # adds them to both tables
    block = peer.encode(fields)  # references only
    first = cached.decode(block, raw=True)
    second = cached.decode(block, raw=True)
    assert first == second and first is not second
    second.append((b"evil", b"1"))
    assert cached.decode(block, raw=True) == first


def test_a_long_block_is_never_kept() -> None:
    cached = CachingDecoder(1 << 20)
    block = Encoder().encode([(b"x-long", b"v" * (hpack_cache.MAX_BLOCK + 10))])
    cached.decode(block, raw=True)
    assert not cached._kept


def test_the_l7_codecs_connection_uses_the_caching_coders_with_hpacks_settings() -> None:
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    conn = ProxyH2Connection(config, 32768, cache_hpack=True)
    plain = ProxyH2Connection(h2.config.H2Configuration(client_side=False,
                                                        header_encoding=None), 32768)
    assert type(conn.encoder) is CachingEncoder and type(conn.decoder) is CachingDecoder
    assert type(plain.encoder) is Encoder and type(plain.decoder) is Decoder
    assert conn.decoder.max_header_list_size == plain.decoder.max_header_list_size == 32768
    assert conn.decoder.max_allowed_table_size == plain.decoder.max_allowed_table_size
    assert _table(conn.decoder) == _table(plain.decoder)
    assert _table(conn.encoder) == _table(plain.encoder)


def _retained(make_calls) -> int:  # type: ignore[no-untyped-def]
    """Bytes still allocated once make_calls' own references are gone: what the coder it
    returns keeps."""
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        coder = make_calls()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del coder
    return kept


def _hostile_decodes() -> CachingDecoder:
    """A client's blocks within MAX_BLOCK that leave the table alone and decode to as many
    fields as one byte each can name: a valid GET with ~1,000 `accept-encoding` fields
    (static index 16; repeating a field is legal), each block distinct by one field."""
    decoder = CachingDecoder(2 * 60 * 1024)  # H2Server's header_limit
    for i in range(hpack_cache.ENTRIES):
        block = bytes([0x82, 0x87, 0x84]) + bytes([0x90]) * (hpack_cache.MAX_BLOCK - 8 + i)
        assert len(decoder.decode(block, raw=True)) > 1000
    return decoder


def _hostile_encodes() -> CachingEncoder:
    """An upstream's response heads with one field past the table's size: hpack empties
    the table to add it, and once empty it stays so, so each head is kept, value and all."""
    encoder = CachingEncoder()
    for i in range(hpack_cache.ENTRIES + 1):
        encoder.encode([(b":status", b"200"), (b"x-pad", b"a" * 50_000 + str(i).encode())])
    return encoder


@pytest.mark.parametrize("calls", [_hostile_decodes, _hostile_encodes])
def test_what_a_connection_keeps_stays_small_whatever_its_peer_sends(calls) -> None:  # type: ignore[no-untyped-def]
    """review8: the decoder kept any block up to MAX_BLOCK bytes, which expands to over a
    thousand fields (590 KB kept per connection, for its whole life); the encoder kept
    lists of up to MAX_FIELDS fields of any length (a 50 KB value and its encoding, 8
    times: 0.65 MB).  A pod or upstream with many connections multiplied that.  What is
    kept is now bounded by fields (decoding) and text (encoding): per connection well
    under what one flow may buffer."""
    assert _retained(calls) < 96 * 1024

"""codec/hpack_static.py: a header block decoded without a dynamic table is decoded as hpack
decodes it, on any decoder state, and leaves that state alone; every block that could
read or change the table (or that hpack would refuse) is refused, for hpack to judge.

The proof is by comparison: each block that static_fields accepts is also decoded by
hpack on a fresh decoder and on one whose dynamic table holds entries (and a smaller
maximum), and the fields and the table afterwards must be the same; each refusal is a
representation the module says it refuses.  Blocks come from the tunnel's own encoder,
from hand-built hostile variants, and from a seeded random generator of
representations."""

from __future__ import annotations

import ipaddress
import random

import hpack
import pytest

from nodeproxy.codec import hpack_static
from nodeproxy.tunnel.header_block import connect_block, literal, source_port_field


def _used_decoder() -> hpack.Decoder:
    """A decoder whose dynamic table holds entries (a peer indexed fields earlier)."""
    decoder = hpack.Decoder()
    encoder = hpack.Encoder()
    decoder.decode(encoder.encode([(":authority", "10.9.9.9:1"), ("forwarded", "for=1.1.1.1"),
                                   ("x-custom", "v")]))
    assert len(decoder.header_table.dynamic_entries) == 3
    return decoder


def _table(decoder: hpack.Decoder) -> tuple:
    return (list(decoder.header_table.dynamic_entries), decoder.header_table_size,
            decoder.header_table._current_size)


def _same_as_hpack(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """static_fields(block), checked against hpack on a fresh and on a used decoder."""
    fields = hpack_static.static_fields(block)
    if fields is None:
        return None
    for decoder in (hpack.Decoder(), _used_decoder()):
        before = _table(decoder)
        decoded = decoder.decode(block, raw=True)
        assert [tuple(f) for f in decoded] == fields, block
        assert _table(decoder) == before, block  # the table neither read nor changed
        assert all(type(f) is hpack.HeaderTuple for f in decoded)  # none never-indexed
    return fields


def test_the_tunnels_own_connect_blocks_decode_as_hpack_decodes_them() -> None:
    for ip, source, marker, port in (
            ("10.0.0.1", "10.0.1.1", False, 80),
            ("10.244.3.17", "10.244.1.200", True, 65535),
            ("fd00::1", "fd00::2:3", False, 8080),
            ("fd00:1234:5678:9abc:def0:1234:5678:9abc", "fd00::1", True, 1)):
        block, target = connect_block(ipaddress.ip_address(ip), port,
                                      ipaddress.ip_address(source), marker)
        for source_port in (0, 1, 40000, 65535):
            fields = _same_as_hpack(block + source_port_field(source_port))
            assert fields is not None
            assert fields[0] == (b":method", b"CONNECT")
            assert fields[1] == (b":authority", target)


def test_static_indexed_fields_and_long_literals_decode_as_hpack() -> None:
    blocks = [
        b"\x82\x84\x86\x81",  # :method GET, :path /, :scheme http, :authority ""
        b"\x88", b"\xbd",  # :status 200, index 61 (www-authenticate)
        b"\x0f\x2d\x03abc",  # name index 60 (via, 15 + 45) as a multi-byte integer
        literal("x-long", "v" * 300),  # a length needing a continuation byte
        literal("x-longer", "w" * 20000),  # two continuation bytes
        b"\x00\x00\x00",  # empty name and value (hpack decodes it; h2's checks refuse it)
        literal(1, ""),  # an empty value
        b"",  # no fields at all
    ]
    for block in blocks:
        assert _same_as_hpack(block) is not None, block


@pytest.mark.parametrize("block", [
    b"\xbe",  # index 62: the dynamic table
    b"\xff\x00",  # index 127: the dynamic table
    b"\x80",  # index 0 (hpack: invalid)
    b"\x0f\x30\x01v",  # literal, name index 63: the dynamic table
    b"\x40\x01a\x01b",  # incremental indexing, new name: changes the table
    b"\x41\x01b",  # incremental indexing, static name
    b"\x10\x01a\x01b",  # never indexed, new name
    b"\x11\x01b",  # never indexed, static name
    b"\x20",  # table size update to 0
    b"\x3f\xe1\x1f",  # table size update to 4096
    b"\x20\x82",  # a size update first, then a static field
    b"\x82\x20",  # a size update after a field (hpack refuses it)
    b"\x00\x81\x00\x01b",  # a Huffman-coded name
    b"\x01\x81\x00",  # a Huffman-coded value
    b"\x01\x05abc",  # a value cut short
    b"\x00\x05ab",  # a name cut short
    b"\x00\x01a",  # a name and no value
    b"\x01",  # a static name and no value
    b"\x7f",  # incremental indexing cut short
    b"\xff",  # an index integer cut short
    b"\x01\x7f\xff\xff\xff\x7f",  # a length integer longer than MAX_INTEGER_BYTES
    b"\x0f\xff\xff\xff\xff\x0f\x01v",  # a name index longer than MAX_INTEGER_BYTES
    b"\x01\x7f\x80\x80\x80\x80\x80\x80",  # an integer that never ends
])
def test_blocks_that_touch_the_table_or_that_hpack_refuses_are_refused(block: bytes) -> None:
    assert hpack_static.static_fields(block) is None


def test_a_block_is_refused_as_a_whole_when_any_representation_is() -> None:
    good, _ = connect_block(ipaddress.ip_address("10.0.0.1"), 80,
                            ipaddress.ip_address("10.0.1.1"), False)
    assert hpack_static.static_fields(good) is not None
    for bad in (b"\xbe", b"\x40\x01a\x01b", b"\x20", b"\x01\x81\x00", b"\x10\x01a\x01b"):
        assert hpack_static.static_fields(good + bad) is None
        assert hpack_static.static_fields(bad + good) is None


def _random_representation(rng: random.Random) -> bytes:
    """One representation, valid or not, of any kind (biased to the edges)."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytes([0x80 | rng.choice([0, 1, 2, 8, 61, 62, 63, 126, 127])]) + (
            b"\x01" if rng.random() < 0.2 else b"")
    if kind == 1:
        return literal(rng.randrange(1, 62), "".join(rng.choice("ab :\r") for _ in
                                                      range(rng.randrange(0, 5))))
    if kind == 2:
        return literal("x-" + "".join(rng.choice("abc") for _ in range(rng.randrange(0, 4))),
                       "v" * rng.choice([0, 1, 126, 127, 128, 16383, 16384]))
    if kind == 3:
        return bytes([rng.choice([0x40, 0x10, 0x20, 0x3f, 0x41, 0x1f, 0x0f, 0x00])]) + \
            bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4)))
    if kind == 4:  # Huffman flags set on a name or a value
        return bytes([0x00, 0x81, rng.randrange(256), 0x01, 0x61])
    if kind == 5:  # a representation cut at a random point
        whole = literal("x-cut", "value")
        return whole[:rng.randrange(len(whole))]
    if kind == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    return hpack.Encoder().encode([("x-h", "v" * rng.randrange(3))])


def test_random_blocks_accepted_are_always_hpacks_fields_and_leave_the_table_alone() -> None:
    """Seeded: 5,000 blocks of 1..6 representations of every kind; each accepted one must
    decode as hpack decodes it (fresh and used decoder, table unchanged), and each
    refused one must contain something static_fields refuses by its own rule."""
    rng = random.Random(20261207)
    accepted = 0
    for _ in range(5000):
        block = b"".join(_random_representation(rng) for _ in range(rng.randrange(1, 7)))
        if _same_as_hpack(block) is not None:
            accepted += 1
    assert 200 < accepted < 4800  # both outcomes were exercised


def test_list_size_counts_as_hpack_counts() -> None:
    fields = [(b":method", b"CONNECT"), (b"x", b"")]
    assert hpack_static.list_size(fields) == 7 + 7 + 32 + 1 + 0 + 32
    block = literal(2, "CONNECT") + literal("x", "")
    decoder = hpack.Decoder()
    decoder.max_header_list_size = hpack_static.list_size(fields)
    decoder.decode(block)  # at the limit: accepted
    decoder.max_header_list_size -= 1
    with pytest.raises(hpack.OversizedHeaderListError):
        hpack.Decoder.decode(decoder, block)

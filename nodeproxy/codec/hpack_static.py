"""HPACK header blocks whose decoding depends on nothing but their own bytes (RFC 7541).

A block made only of

- indexed fields from the static table (§6.1, index 1..61), and
- literal fields *without indexing* (§6.2.2, first byte ``0000xxxx``) whose name is a
  static-table index or a literal, with neither string Huffman-coded (§5.2, H bit 0),

neither reads nor changes a decoder's dynamic table (§2.3.2, §3.2): it decodes to the
same fields on every connection, at any point of it, whatever the table holds, and leaves
the table as it found it.  ``static_fields`` decodes exactly those blocks and refuses
(None) every other: an index into the dynamic table, a literal *with incremental
indexing* (§6.2.1) or *never indexed* (§6.2.3), a dynamic table size update (§6.3), a
Huffman-coded string, an index of 0, a truncated block, an integer longer than
``MAX_INTEGER_BYTES``.  A refused block is the caller's to hand to a full decoder
(hpack, through h2), which answers it as it always did.

The tunnel's own CONNECT requests (tunnel/header_block.py) are such blocks, so the
destination node can take them without h2's decoder (codec/h2_connection.py,
``receive_known_request``).  Nothing here judges the fields themselves: the caller
checks them as h2 would (codec/h2_header_checks.py).

Pure: bytes in, a list of (name, value) byte pairs or None out.
"""

from __future__ import annotations

from hpack.table import HeaderTable

# RFC 7541 Appendix A, as hpack has it (1-based: index i is STATIC[i - 1]).
STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_LENGTH = len(STATIC)
# An integer's continuation bytes allowed after its prefix: up to 2^21 + 127, more than
# any field of a block the proxy accepts (codec/h2.py MAX_HEADER_BYTES); hpack itself
# allows 5.  A longer one is refused here, not judged.
MAX_INTEGER_BYTES = 3


def _integer(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    """The integer (§5.1) whose prefix is in block[at]'s low `prefix_bits` bits, and the
    offset after it; (-1, 0) if truncated or longer than MAX_INTEGER_BYTES."""
    limit = (1 << prefix_bits) - 1
    value = block[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    end = len(block)
    for _ in range(MAX_INTEGER_BYTES):
        if at >= end:
            return -1, 0
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    return -1, 0


def _string(block: bytes, at: int, end: int) -> tuple[bytes | None, int]:
    """A string literal (§5.2) at `at`, not Huffman-coded, and the offset after it; None
    if Huffman-coded, truncated or its length is refused."""
    if at >= end:
        return None, 0
    length = block[at]
    if length & 0x80:  # Huffman-coded
        return None, 0
    if length < 0x7F:
        at += 1
    else:
        length, at = _integer(block, at, 7)
        if length < 0:
            return None, 0
    if at + length > end:
        return None, 0
    return block[at:at + length], at + length


def static_fields(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """The fields of `block` if it is made only of representations that neither read nor
    change the dynamic table (see the module docstring), in order; None otherwise."""
    fields: list[tuple[bytes, bytes]] = []
    end = len(block)
    at = 0
    while at < end:
        first = block[at]
        if first & 0x80:  # indexed field (§6.1); 127 and up is the dynamic table
            index = first & 0x7F
            if not 0 < index <= _STATIC_LENGTH:
                return None
            fields.append(STATIC[index - 1])
            at += 1
            continue
        if first & 0xF0:  # incremental indexing, a size update, or never indexed
            return None
        name: bytes | None
        if first:  # literal without indexing, name from the static table (§6.2.2)
            if first < 0x0F:
                index = first
                at += 1
            else:
                index, at = _integer(block, at, 4)
                if not 0 < index <= _STATIC_LENGTH:
                    return None
            name = STATIC[index - 1][0]
        else:  # literal without indexing, new name
            name, at = _string(block, at + 1, end)
            if name is None:
                return None
        value, at = _string(block, at, end)
        if value is None:
            return None
        fields.append((name, value))
    return fields


def list_size(fields: list[tuple[bytes, bytes]]) -> int:
    """The header list's size as a decoder's limit counts it (§4.1: name, value and 32 per
    field; SETTINGS_MAX_HEADER_LIST_SIZE, RFC 9113 §6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in fields)

"""HPACK encoding and decoding remembered per connection while the dynamic table stands still.

hpack's Encoder and Decoder are pure Python: a request's header block decoded, and a
response's encoded, were about 75 interpreted calls per HTTP/2 request (and 23 calls of
``logging.debug`` for a log that is off), the largest item of an HTTP/2 request's cost
(docs/benchmarks.md, "HTTP/2 and gRPC per-request cost, second round").  Most of those
blocks repeat: a client asks again with the same fields, which its encoder sends as
references to its table; a server answers again with the same head.

What a block decodes to is a function of the block's bytes, the decoder's dynamic table,
its size limits and ``raw``; what a header list encodes to is a function of the list (its
fields' names, values and types: a NeverIndexedHeaderTuple encodes otherwise), the
encoder's dynamic table, a pending table-size change and ``huffman``.  When a call leaves
the table as it found it (every field a reference to it or a literal without indexing,
no size update that changed anything), the same call on the same table gives the same
result and again leaves it as it was: such results are kept, keyed by the call's input,
for as long as the table is that same table.  Anything else (a field added, an entry
evicted, a size change, an error) goes to hpack, and any change of the table drops what
was kept.  The table's state is read as hpack keeps it (``header_table``: its
``dynamic_entries`` deque, whose newest entry is a new tuple for every addition, held here
so its identity cannot be reused; its ``maxsize`` and ``resized``).

At most ``ENTRIES`` results per connection, for blocks and lists of bounded size (a
hostile peer sending distinct blocks fills nothing): anything larger or past the bound is
hpack's every time.  tests/unit/test_hpack_cache.py plays random histories through a
cached and a plain coder and requires the same bytes, headers, errors and tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple

ENTRIES = 8  # results kept per coder
MAX_BLOCK = 1024  # bytes of a header block whose decoding may be kept
MAX_FIELDS = 64  # fields of a header list whose encoding may be kept
# What a cacheable header list holds: 2-tuples (plain or hpack's) of str or bytes, whose
# equality is their encoding's (a 3-tuple's flag, an int value, a subclass: hpack's).
_FIELD_TYPES = frozenset({tuple, HeaderTuple, NeverIndexedHeaderTuple})
_TEXT_TYPES = frozenset({bytes, str})
_PAIRS = frozenset({2})


def _table_state(table: Any) -> tuple[Any, int, int, bool]:
    """The dynamic table as far as a coder's result depends on it: its newest entry (the
    object), its entry count, its size limit and whether a size change is pending."""
    entries = table.dynamic_entries
    return (entries[0] if entries else None, len(entries), table.maxsize, table.resized)


class CachingEncoder(Encoder):
    """hpack's Encoder; a header list encoded while the table stood still is encoded again
    from what was kept, as long as the table is still that table."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: dict[Any, bytes] = {}
        self._kept_state: Any = None

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if isinstance(headers, dict):
            return super().encode(headers, huffman)
        fields = headers if type(headers) is list else list(headers)
        kinds = tuple(map(type, fields))
        if (len(fields) > MAX_FIELDS or not _FIELD_TYPES.issuperset(kinds)
                or not _PAIRS.issuperset(map(len, fields))
                or not _TEXT_TYPES.issuperset(map(type, chain.from_iterable(fields)))):
            return super().encode(fields, huffman)
        key = (tuple(fields), kinds, huffman)
        state = _table_state(self.header_table)
        if state == self._kept_state and state[0] is self._kept_state[0]:
            block = self._kept.get(key)
            if block is not None:
                return block
        block = super().encode(fields, huffman)
        after = _table_state(self.header_table)
        if after != state or after[0] is not state[0]:  # the table changed: nothing holds
            self._kept.clear()
            self._kept_state = None
            return block
        if self._kept_state is None or not (state == self._kept_state
                                            and state[0] is self._kept_state[0]):
            self._kept.clear()
            self._kept_state = state
        if len(self._kept) < ENTRIES:
            self._kept[key] = block
        return block


class CachingDecoder(Decoder):
    """hpack's Decoder; a block decoded while the table stood still is decoded again from
    what was kept (a new list of the same fields), as long as the table and the limits are
    the same."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self._kept: dict[tuple[bytes, bool], list[Any]] = {}
        self._kept_state: Any = None

    def _state(self) -> tuple[Any, ...]:
        return (*_table_state(self.header_table), self.max_header_list_size,
                self.max_allowed_table_size)

    def decode(self, data: bytes | memoryview, raw: bool = False) -> Iterable[HeaderTuple]:
        if len(data) > MAX_BLOCK:
            return super().decode(data, raw)
        block = data if type(data) is bytes else bytes(data)
        state = self._state()
        kept = self._kept_state
        if kept is not None and state == kept and state[0] is kept[0]:
            fields = self._kept.get((block, raw))
            if fields is not None:
                return list(fields)
        result = super().decode(block, raw)
        after = self._state()
        if after != state or after[0] is not state[0]:
            self._kept.clear()
            self._kept_state = None
            return result
        if kept is None or not (state == kept and state[0] is kept[0]):
            self._kept.clear()
            self._kept_state = state
        if len(self._kept) < ENTRIES:
            self._kept[(block, raw)] = list(result)
        return result

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
hpack's every time.  Bounded on both sides of each result: a block of MAX_BLOCK bytes
decodes to over a thousand fields (one byte names a table entry), so a decoding is kept
only up to MAX_FIELDS fields; a list's fields can be any length (a value past the
table's size leaves an empty table empty), so an encoding is kept only up to MAX_TEXT
bytes of names and values.  What one connection keeps stays tens of KB whatever its
peer sends (review8: 0.45 MB decoding, 0.65 MB encoding, before these bounds).

tests/unit/test_hpack_cache.py plays random histories through a cached and a plain coder
and requires the same bytes, headers, errors and tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple

ENTRIES = 8  # results kept per coder
MAX_BLOCK = 1024  # bytes of a header block whose decoding may be kept
MAX_FIELDS = 64  # fields of a list whose encoding, or of a decoding, that may be kept
MAX_TEXT = 4096  # characters of a list's names and values whose encoding may be kept
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


def _same(state: tuple[Any, ...], other: tuple[Any, ...] | None) -> bool:
    """The same table: equal figures and the very same newest entry (equal tuples can be
    two entries)."""
    return other is not None and state == other and state[0] is other[0]


class _Kept:
    """A coder's results kept while its table stands still: valid only for the table
    state they were made in, at most ENTRIES of them."""

    def __init__(self) -> None:
        self._results: dict[Any, Any] = {}
        self._state: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return len(self._results)

    def get(self, state: tuple[Any, ...], key: Any) -> Any:
        return self._results.get(key) if _same(state, self._state) else None

    def put(self, before: tuple[Any, ...], after: tuple[Any, ...], key: Any,
            result: Any) -> None:
        """A result made from the table in `before`, which the call left in `after`."""
        if not _same(after, before):  # the table changed: nothing kept holds
            self._results.clear()
            self._state = None
            return
        if not _same(before, self._state):
            self._results.clear()
            self._state = before
        if len(self._results) < ENTRIES:
            self._results[key] = result


class CachingEncoder(Encoder):
    """hpack's Encoder; a header list encoded while the table stood still is encoded again
    from what was kept, as long as the table is still that table."""

    def __init__(self) -> None:
        super().__init__()
        self._kept = _Kept()

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if isinstance(headers, dict):
            return super().encode(headers, huffman)
        fields = headers if type(headers) is list else list(headers)
        kinds = tuple(map(type, fields))
        if (len(fields) > MAX_FIELDS or not _FIELD_TYPES.issuperset(kinds)
                or not _PAIRS.issuperset(map(len, fields))
                or not _TEXT_TYPES.issuperset(map(type, chain.from_iterable(fields)))
                or sum(map(len, chain.from_iterable(fields))) > MAX_TEXT):
            return super().encode(fields, huffman)
        key = (tuple(fields), kinds, huffman)
        state = _table_state(self.header_table)
        block = self._kept.get(state, key)
        if block is not None:
            return block
        block = super().encode(fields, huffman)
        self._kept.put(state, _table_state(self.header_table), key, block)
        return block

class CachingDecoder(Decoder):
    """hpack's Decoder; a block decoded while the table stood still is decoded again from
    what was kept (a new list of the same fields), as long as the table and the limits are
    the same."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self._kept = _Kept()

    def _state(self) -> tuple[Any, ...]:
        return (*_table_state(self.header_table), self.max_header_list_size,
                self.max_allowed_table_size)

    def decode(self, data: bytes | memoryview, raw: bool = False) -> Iterable[HeaderTuple]:
        if len(data) > MAX_BLOCK:
            return super().decode(data, raw)
        block = data if type(data) is bytes else bytes(data)
        state = self._state()
        fields = self._kept.get(state, (block, raw))
        if fields is not None:
            return list(fields)
        result = super().decode(block, raw)
        fields = list(result)
        if len(fields) <= MAX_FIELDS:  # else, as for a long block: what is kept is
            # only ever taken on the very table it was made on (the state held keeps it so)
            self._kept.put(state, self._state(), (block, raw), fields)
        return result

"""The batched map writes of the splice set-up (capture/map_access.py put_many,
delete_many) on a real kernel hash map, where a batch goes part-way: a full map that
takes the first k elements of an update, deletes whose keys repeat or are missing
anywhere (first, last, several in a row), a release whose keys are already gone.

The bugs these would catch: delete_many counting a repeated key twice or stopping at
the first missing one (leaving the later keys of a released flow behind, which a
reused slot would then read), skipping one key too many after a miss, looping on a
batch the kernel ends with nothing done; put_many reporting a partial write as none
(or as all), so the caller's clean-up misses the elements the kernel did write.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Iterator

import pytest

from nodeproxy.capture import contract
from nodeproxy.capture.map_access import BpfMap

pytestmark = pytest.mark.privileged

CAPACITY = 4


@pytest.fixture
def table() -> Iterator[BpfMap]:
    import bcc

    bpf = bcc.BPF(text=f"BPF_HASH(np_rt_batch, u64, u64, {CAPACITY});".encode())
    try:
        fd = bcc.lib.bpf_table_fd(bpf.module, b"np_rt_batch")
        spec = contract.MapSpec(name="np_rt_batch", kind="hash", key=ctypes.c_uint64,
                                value=ctypes.c_uint64, pinned=False)
        yield BpfMap(spec, fd)
    finally:
        bpf.cleanup()


def _keys(*keys: int) -> bytes:
    return struct.pack(f"{len(keys)}Q", *keys)


def _values(*values: int) -> ctypes.Array:
    return (ctypes.c_uint64 * len(values))(*values)


def _present(table: BpfMap) -> dict[int, int]:
    return {int(k.value): int(table.get(k).value) for k in table.keys()}


@pytest.mark.parametrize(("present", "asked", "removed"), [
    ((1, 2, 3), (1, 2, 1, 3), 3),  # a repeat in the middle
    ((1, 2, 3), (1, 1, 1, 2, 3, 3), 3),  # repeats in a row, first and last
    ((2, 3), (9, 2, 3), 2),  # the first missing
    ((1, 2), (1, 2, 9), 2),  # the last missing
    ((1, 4), (1, 7, 8, 9, 4), 2),  # several missing in a row
    ((), (7, 8), 0),  # nothing there (a second release)
    ((1,), (1,), 1),
])
def test_delete_many_removes_every_key_there_once_whatever_is_missing_or_repeated(
        table: BpfMap, present: tuple[int, ...], asked: tuple[int, ...], removed: int):
    for key in present:
        table.put(key, key * 10)
    table.put(100, 1000)  # a flow that is not released
    assert table.delete_many(_keys(*asked)) == removed
    assert _present(table) == {100: 1000}


def test_delete_many_of_nothing_is_nothing(table: BpfMap):
    table.put(1, 10)
    assert table.delete_many(b"") == 0
    assert _present(table) == {1: 10}


def test_a_batch_update_into_a_full_map_says_how_far_it_got_and_wrote_just_those(
        table: BpfMap):
    for key in (1, 2, 3):
        table.put(key, key)
    with pytest.raises(OSError) as refused:
        table.put_many(_keys(2, 4, 5, 6), _values(20, 40, 50, 60))
    assert refused.value.errno == errno.E2BIG
    assert "the first 2 of 4 written" in str(refused.value)
    # the kernel's first two went in (2 replaced, 4 new); the rest did not
    assert _present(table) == {1: 1, 2: 20, 3: 3, 4: 40}
    # the clean-up a failed join makes removes exactly what was written, once
    assert table.delete_many(_keys(2, 4, 5, 6)) == 2
    assert _present(table) == {1: 1, 3: 3}

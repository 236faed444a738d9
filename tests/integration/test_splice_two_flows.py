"""Two spliced flows side by side in the real splice maps (capture/splice.py), one set up
and released around the other, a released flow's sockets offered again (the sockhash
keeps a live socket after its release: see bpf/splice.c), and a join whose batch the
kernel takes only in part (a map with room for one of its two entries).

Judged by what the pods notice: bytes a client sends reach its own server once, in order,
moved by the kernel (the proxy reads nothing), never the other flow's server.  The bugs
these would catch: a release whose batch removes another flow's entries (a key packing
or count off by one), a second release that fails, a refused or partly written join that
leaves entries behind (one direction redirected alone) or loses bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from nodeproxy.capture import contract
from nodeproxy.capture.constants import MAX_FLOWS
from nodeproxy.capture.map_access import MapSet
from nodeproxy.capture.splice import SpliceError, SpliceMaps, socket_cookie
from tests.integration.test_splice_setup import (
    CHUNK,
    CREDIT,
    entries,
    flow,
    loaded,
    pump,
    settle,
)

pytestmark = pytest.mark.privileged

__all__ = ["loaded"]  # the module's fixture: the programs loaded once


def _kernel_moves(a_peer: socket.socket, a: socket.socket, b_peer: socket.socket,
                  splice: SpliceMaps, cookie: int) -> None:
    """A's bytes reach B with nothing read from a (the verdict redirected them)."""
    data = os.urandom(3000)
    moved_before = splice.counters(cookie)[0]
    a_peer.sendall(data)
    settle()
    assert _receive(b_peer, len(data)) == data
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(1)  # nothing was left to the proxy
    assert splice.counters(cookie)[0] - moved_before == len(data)


def _receive(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from sock (2 s at most between reads), or fewer if it closes."""
    sock.settimeout(2)
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _nothing_for(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1)


def test_releasing_one_flow_leaves_the_other_spliced(loaded: MapSet):
    splice = SpliceMaps(loaded)
    with flow() as (p1, a1, b1, q1), flow() as (p2, a2, b2, q2):
        c1 = splice.join(a1, b1, CREDIT)
        c2 = splice.join(a2, b2, CREDIT)
        try:
            splice.release(*c1)
            assert entries(loaded, *c1) == []
            assert len(entries(loaded, *c2)) == 4
            _kernel_moves(p2, a2, q2, splice, c2[0])
            _nothing_for(q1)  # flow 2's bytes never reach flow 1's server
            splice.release(*c1)  # a second release: nothing, no error
            assert len(entries(loaded, *c2)) == 4
        finally:
            splice.release(*c2)
        assert entries(loaded, *c2) == []


def test_a_released_flows_sockets_cannot_be_joined_again_and_lose_no_byte(loaded: MapSet):
    """Released, a flow's sockets stay in the sockhash while they live, where the kernel
    refuses them a second time (EBUSY): the splicer never joins a relay twice.  Should
    it, the join fails whole (no entry left), the other flow stays spliced, and the
    refused flow's bytes go to the proxy (the verdict passes them), none lost."""
    splice = SpliceMaps(loaded)
    with flow() as (p1, a1, b1, q1), flow() as (p2, a2, b2, q2):
        c1 = splice.join(a1, b1, CREDIT)
        c2 = splice.join(a2, b2, CREDIT)
        try:
            splice.release(*c1)
            with pytest.raises(SpliceError) as refused:
                splice.join(a1, b1, CREDIT)
            assert refused.value.errno == errno.EBUSY
            assert entries(loaded, *c1) == []
            assert len(entries(loaded, *c2)) == 4
            data = os.urandom(3000)
            p1.sendall(data)
            settle()
            assert _receive(a1, len(data)) == data  # to the proxy, whole
            _nothing_for(q1)
            _kernel_moves(p2, a2, q2, splice, c2[0])
        finally:
            splice.release(*c1, *c2)
        assert entries(loaded, *c1, *c2) == []


def test_a_new_socket_never_gets_a_released_flows_cookie(loaded: MapSet):
    """The kernel's cookies are not reused: a socket opened after a flow's release and
    close has a cookie of its own, so no entry left behind could be read as its."""
    splice = SpliceMaps(loaded)
    with flow() as (_p1, a1, b1, _q1):
        c1 = splice.join(a1, b1, CREDIT)
        splice.release(*c1)
    with flow() as (_p2, a2, b2, _q2):
        assert {socket_cookie(a2), socket_cookie(b2)}.isdisjoint(c1)
        assert entries(loaded, socket_cookie(a2), socket_cookie(b2)) == []


@contextlib.contextmanager
def _nearly_full(maps: MapSet, spec: contract.MapSpec, room: int) -> Iterator[None]:
    """Fill a splice map with keys no socket has, leaving `room` entries; emptied after."""
    table = maps.open(spec)
    present = len(table.keys())
    fill = MAX_FLOWS - present - room
    base = 0xEEEE_0000_0000_0000
    batch = 4096
    try:
        for start in range(0, fill, batch):
            n = min(batch, fill - start)
            table.put_many(struct.pack(f"{n}Q", *range(base + start, base + start + n)),
                           (spec.value * n)())
        yield
    finally:
        table.delete_many(struct.pack(f"{fill}Q", *range(base, base + fill)))
        assert len(table.keys()) == present


@pytest.mark.parametrize("spec", [contract.SPLICE_FLOWS, contract.SPLICE_CONTROL],
                         ids=["peers-batch", "control-batch"])
def test_a_join_whose_batch_the_kernel_takes_in_part_fails_whole_and_loses_no_byte(
        loaded: MapSet, spec: contract.MapSpec):
    """The map has room for one of the flow's two entries: the kernel writes the first
    and refuses the second (E2BIG).  The join raises and leaves no entry (a control
    entry written alone would have let the verdict redirect one way); A's bytes from
    before and after reach B once, in order, through the proxy."""
    splice = SpliceMaps(loaded)
    with flow() as (a_peer, a, b, b_peer), _nearly_full(loaded, spec, 1):
        ca, cb = socket_cookie(a), socket_cookie(b)
        before, after = os.urandom(CHUNK), os.urandom(CHUNK)
        a_peer.sendall(before)
        with pytest.raises(OSError) as refused:
            splice.join(a, b, CREDIT)
        assert refused.value.errno == errno.E2BIG
        assert "the first 1 of 2 written" in str(refused.value)
        assert entries(loaded, ca, cb) == []
        a_peer.sendall(after)
        settle()
        got, from_python, _eof = pump(a, b, b_peer, 2 * CHUNK, None, ca)
        assert got == before + after
        assert from_python == 2 * CHUNK

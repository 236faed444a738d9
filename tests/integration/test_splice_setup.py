"""Joining a flow's two sockets to the kernel splice (capture/splice.py, SpliceMaps.join)
when a peer acts between its steps, and the map batches it is made of.

The real programs, loaded by the loading child into this test process (its own bpffs);
real loopback TCP connections: A -> a (the proxy's accepted socket), b -> B (its dial).
A pod is hostile and fast: between any two of join's steps (the peers batch, each
sockhash insert, the control batch) its client may send, half-close or reset, and its
server may reset.  Whatever happens, join either splices the flow or raises and leaves
no entry behind; every byte A sent reaches B once and in order (Python's share plus the
kernel's, as the relay would move them); the verdict's counters add up to that; a reset
reaches the proxy's socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeproxy.capture import contract, kernelfs, load_child
from nodeproxy.capture.map_access import BpfMap, MapSet
from nodeproxy.capture.splice import SpliceMaps
from nodeproxy.tcp.send_state import is_closed

pytestmark = pytest.mark.privileged

CREDIT = 1 << 20
CHUNK = 4000
LINGER_RESET = struct.pack("ii", 1, 0)
ENOTSUPP = 524  # the kernel's own, not in errno
STEPS = ("peers", "insert-a", "insert-b", "control")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MapSet]:
    """The programs of iptables mode (the splice verdict among them) loaded for this
    process, shared maps pinned on a bpffs of the test's own; all gone at the end."""
    root = tmp_path_factory.mktemp("bpffs")
    kernelfs.mount_bpffs(str(root))
    try:
        maps_dir = root / "maps"
        maps_dir.mkdir()
        objects = load_child.load_in_child(load_child.LoadRequest(
            maps_dir=str(maps_dir), mode="iptables", outbound_port=15001,
            inbound_port=15006, hbone_port=15008))
        maps = MapSet(objects.maps)
        try:
            yield maps
        finally:
            maps.close()
            for fd in objects.programs.values():
                os.close(fd)
    finally:
        detach_mount(root)


def detach_mount(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(str(path)), 2)  # MNT_DETACH


@contextlib.contextmanager
def flow() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(A, a, b, B): A's connection accepted as a; b's connection accepted as B."""
    made: list[socket.socket] = []
    try:
        pairs = []
        for _ in range(2):
            listener = socket.create_server(("127.0.0.1", 0))
            made.append(listener)
            out = socket.create_connection(listener.getsockname())
            made.append(out)
            accepted, _ = listener.accept()
            made.append(accepted)
            pairs.append((out, accepted))
        (a_peer, a), (b, b_peer) = pairs
        yield a_peer, a, b, b_peer
    finally:
        for sock in made:
            sock.close()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


class _Before:
    """A map whose batch update first lets the peer act."""

    def __init__(self, inner: BpfMap, act: Callable[[], None]):
        self._inner, self._act = inner, act

    def put_many(self, keys: bytes, values: Any) -> None:
        self._act()
        self._inner.put_many(keys, values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SteppedSplice(SpliceMaps):
    """SpliceMaps whose join lets `act` run just before `step` (fault injection on the
    real kernel: the maps, programs and sockets are all real)."""

    def __init__(self, maps: MapSet, step: str, act: Callable[[], None]):
        super().__init__(maps)
        self._step, self._act, self._inserts = step, act, 0
        if step == "peers":
            self._flows = _Before(self._flows, act)  # type: ignore[assignment]
        if step == "control":
            self._control = _Before(self._control, act)  # type: ignore[assignment]

    def _insert(self, cookie: int, sock: Any) -> None:
        self._inserts += 1
        if self._step == ("insert-a", "insert-b")[self._inserts - 1]:
            self._act()
        super()._insert(cookie, sock)


def settle() -> None:
    time.sleep(0.05)  # loopback delivers at once; the verdict runs in its softirq


def pump(a: socket.socket, b: socket.socket, b_peer: socket.socket, expected: int,
         splice: SpliceMaps | None, cookie: int) -> tuple[bytes, int, bool]:
    """Be the relay for A's direction: what a's reader gets goes to b (and, spliced, the
    verdict is told it is consumed); read B until `expected` bytes came.  Returns (what
    B got, what Python forwarded, whether a saw A's EOF)."""
    a.setblocking(False)
    b_peer.settimeout(0.05)
    got, from_python, eof = bytearray(), 0, False
    deadline = time.monotonic() + 5
    while len(got) < expected and time.monotonic() < deadline:
        if not eof:
            ready, _, _ = select.select([a], [], [], 0.01)
            if ready:
                try:
                    data = a.recv(65536)
                except BlockingIOError:
                    data = None
                if data == b"":
                    eof = True
                elif data:
                    b.sendall(data)
                    from_python += len(data)
                    if splice is not None:
                        splice.steer(cookie, "redirect", from_python, CREDIT)
        try:
            data = b_peer.recv(65536)
            if data:
                got += data
        except TimeoutError:
            pass
    if not eof:
        with contextlib.suppress(BlockingIOError):
            eof = a.recv(1) == b""
    return bytes(got), from_python, eof


def entries(maps: MapSet, *cookies: int) -> list[Any]:
    flows, control = maps.open(contract.SPLICE_FLOWS), maps.open(contract.SPLICE_CONTROL)
    return [m.get(c) for m in (flows, control) for c in cookies if m.get(c) is not None]


def cookie_of(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, 57, 8))[0]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("action", ("send", "half-close"))
def test_client_bytes_or_fin_at_each_step_reach_the_server_once_in_order(
        loaded: MapSet, step: str, action: str):
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)
    with flow() as (a_peer, a, b, b_peer):
        def act() -> None:
            a_peer.sendall(first)
            if action == "half-close":
                a_peer.shutdown(socket.SHUT_WR)
            settle()

        splice = SteppedSplice(loaded, step, act)
        ca, cb = cookie_of(a), cookie_of(b)
        try:
            splice.join(a, b, CREDIT)
            joined = True
        except OSError:
            joined = False
            assert entries(loaded, ca, cb) == [], "a refused join left entries"
        if action == "half-close" and step in ("peers", "insert-a"):
            # a is in CLOSE_WAIT by its insert: the sockhash refuses it.
            assert not joined
        sent = first
        if action == "send":
            a_peer.sendall(second)
            sent = first + second
        settle()
        got, from_python, eof = pump(a, b, b_peer, len(sent), splice if joined else None, ca)
        assert got == sent, f"B got {len(got)} of {len(sent)} bytes, or out of order"
        if joined:
            moved = splice.counters(ca)[0]
            assert moved + from_python == len(sent)
            assert splice.counters(ca)[1] == from_python  # passed: what Python forwarded
            splice.release(ca, cb)
            assert entries(loaded, ca, cb) == []
        else:
            assert from_python == len(sent)
        assert eof == (action == "half-close"), "A's FIN must reach a's reader after its bytes"


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("who", ("client", "server"))
def test_a_reset_at_each_step_reaches_the_proxys_socket_and_leaves_no_entry(
        loaded: MapSet, step: str, who: str):
    with flow() as (a_peer, a, b, b_peer):
        victim = a if who == "client" else b

        def act() -> None:
            reset(a_peer if who == "client" else b_peer)
            settle()

        splice = SteppedSplice(loaded, step, act)
        ca, cb = cookie_of(a), cookie_of(b)
        try:
            splice.join(a, b, CREDIT)
        except OSError:
            assert entries(loaded, ca, cb) == []
        else:
            splice.release(ca, cb)
            assert entries(loaded, ca, cb) == []
        assert is_closed(victim), "the reset socket must be over in the kernel"
        victim.setblocking(False)
        with pytest.raises(ConnectionResetError):
            victim.recv(1)


def test_batches_write_and_remove_every_key_and_say_how_far_they_got(loaded: MapSet):
    control = loaded.open(contract.SPLICE_CONTROL)
    keys = [0xFFFF_0000_0000_0001, 0xFFFF_0000_0000_0002, 0xFFFF_0000_0000_0003]
    packed = struct.pack("3Q", *keys)
    values = (contract.CSpliceControl * 3)(*(
        contract.CSpliceControl(consumed=i, credit=10 * i, mode=1) for i in range(3)))
    try:
        control.put_many(packed, values)
        assert [(v.consumed, v.credit) for v in map(control.get, keys)] == [
            (0, 0), (1, 10), (2, 20)]
        values[1].credit = 99  # written again: replaced
        control.put_many(packed, values)
        assert control.get(keys[1]).credit == 99
        # A missing key in the middle ends the kernel's batch; the rest still go.
        control.delete(keys[1])
        assert control.delete_many(packed) == 2
        assert [control.get(k) for k in keys] == [None, None, None]
        assert control.delete_many(packed) == 0
        with pytest.raises(ValueError, match="3 keys are 24 bytes, not 16"):
            control.put_many(packed[:16], values)
        with pytest.raises(ValueError, match="keys of 8 bytes, not 12"):
            control.delete_many(packed[:12])
    finally:
        for key in keys:
            control.delete(key)


def test_update_batch_on_a_map_without_it_fails_with_the_kernels_reason(loaded: MapSet):
    """A sockhash has no batch operations: the error names the map and the reason."""
    sockets = loaded.open(contract.SPLICE_SOCKETS)
    with pytest.raises(OSError, match="np_splice_sockets: batch update") as refused:
        sockets.put_many(struct.pack("Q", 1), (ctypes.c_int32 * 1)(0))
    assert refused.value.errno in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP)


def test_the_preflight_batch_check_passes_here_and_names_a_refusal():
    """`nodeproxy check` exercises the batches the splice set-up needs; on a map (or a
    kernel) without them it fails with the kernel's reason, not a skip."""
    import bcc

    from nodeproxy.capture import preflight

    good = bcc.BPF(text=b"BPF_HASH(npchk_batch, u64, u64, 4);")
    try:
        assert "batch update and delete" in preflight._try_map_batches(good, bcc)
    finally:
        good.cleanup()
    refusing = bcc.BPF(text=b"BPF_SOCKHASH(npchk_batch, u64, 4);")  # no batch operations
    try:
        with pytest.raises(OSError, match="hash map batch update: "):
            preflight._try_map_batches(refusing, bcc)
    finally:
        refusing.cleanup()

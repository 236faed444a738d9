"""capture/namespaces.Netns.dial_socket: dial sockets made a few at a time in one visit to
the netns.  On this process's own netns (root: setns into it is allowed): what a dial gets
is a new non-blocking TCP socket of the family, lowest descriptor first; the netns is
entered once per batch; a spare never keeps a descriptor at or above the ceiling; close()
closes the spares."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from nodeproxy.capture import namespaces
from nodeproxy.capture.namespaces import DIAL_BATCH, Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setns needs root")


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns.open("/proc/self/ns/net")
    try:
        yield ns
    finally:
        ns.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_one_visit_per_batch_and_plain_new_sockets(netns: Netns, monkeypatch):
    entered = []
    real = namespaces._setns
    monkeypatch.setattr(namespaces, "_setns", lambda fd: (entered.append(fd), real(fd)))
    got = [netns.dial_socket(socket.AF_INET, 1 << 30) for _ in range(DIAL_BATCH)]
    try:
        assert len(entered) == 2  # into the netns and back, once for the whole batch
        fds = [s.fileno() for s in got]
        assert fds == sorted(fds)  # the lowest descriptor first
        for sock in got:
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert not sock.getblocking()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
            with pytest.raises(OSError):
                sock.getpeername()  # never connected
        netns.dial_socket(socket.AF_INET, 1 << 30).close()
        assert len(entered) == 4  # the next batch
    finally:
        for sock in got:
            sock.close()


class _RecordingSocketModule:
    """The socket module as namespaces.py sees it, recording each socket made and the
    descriptor it got (a closed socket's fileno() is -1 afterwards)."""

    def __init__(self) -> None:
        self.made: list[tuple[socket.socket, int]] = []

    def __getattr__(self, name: str):
        return getattr(socket, name)

    def socket(self, *args, **kwargs) -> socket.socket:
        sock = socket.socket(*args, **kwargs)
        self.made.append((sock, sock.fileno()))
        return sock


def test_a_spare_never_holds_a_descriptor_at_or_above_the_ceiling(netns: Netns, monkeypatch):
    # What the batch made is recorded, not inferred from descriptor numbers: in the whole
    # suite other threads open and close descriptors at any time.
    recording = _RecordingSocketModule()
    monkeypatch.setattr(namespaces, "socket", recording)
    namespaces._own_netns()  # the thread's home netns descriptor, opened on first use
    probe = socket.socket()
    ceiling = probe.fileno() + 2  # room for two below the ceiling
    probe.close()
    first = netns.dial_socket(socket.AF_INET6, ceiling)
    try:
        assert len(recording.made) == DIAL_BATCH
        assert any(fd >= ceiling for _sock, fd in recording.made)  # the case under test
        spares = netns._spare[socket.AF_INET6]
        assert first.fileno() < ceiling
        assert all(spare.fileno() < ceiling for spare in spares)
        for sock, fd in recording.made:
            if fd >= ceiling:
                assert sock.fileno() == -1  # made over the ceiling: closed at once
            else:
                assert sock is first or sock in spares  # under it: kept
    finally:
        first.close()


def test_with_no_room_below_the_ceiling_a_dial_still_gets_a_socket_to_check(netns: Netns):
    sock = netns.dial_socket(socket.AF_INET, 0)
    try:
        assert sock.fileno() >= 0  # the dial's own check refuses it (check_socket)
        assert not netns._spare[socket.AF_INET]
    finally:
        sock.close()


def test_close_closes_the_spares(netns: Netns):
    sock = netns.dial_socket(socket.AF_INET, 1 << 30)
    sock.close()
    spares = list(netns._spare[socket.AF_INET])
    assert len(spares) == DIAL_BATCH - 1 and all(_is_open(s.fileno()) for s in spares)
    netns.close()
    assert all(s.fileno() == -1 for s in spares)  # closed by close(), not by anyone else

"""The daemon's side of the kernel splice maps (bpf/splice.c): joining two sockets of a
flow, steering the verdict per socket (redirect, pause, hand back to the proxy), and
reading what it moved and what it passed.

The maps and layouts (struct splice_peer, struct splice_control) are those of
nodeproxy/capture/contract.py (bpf/maps.h), reached through map_access (libbpf).
A socket is never removed from the sockhashes while it lives (see bpf/splice.c): the
kernel removes it when it closes; the daemon then forgets its entries (release()).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from nodeproxy.capture import contract
from nodeproxy.capture.constants import SPLICE_PROXY, SPLICE_REDIRECT
from nodeproxy.capture.map_access import BpfMap, MapSet

SO_COOKIE = 57  # not in Python's socket module

MODES = {"redirect": SPLICE_REDIRECT, "proxy": SPLICE_PROXY}


class SpliceError(OSError):
    """The kernel refused to take a socket into the splice maps."""


def socket_cookie(sock: Any) -> int:
    """The kernel's socket cookie (what the BPF programs key on)."""
    return int(struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def _kick(sock: Any) -> None:
    """Bytes that reached the receive queue before the verdict was attached would wait
    for the next data-ready event; setting SO_RCVLOWAT raises one now."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    except OSError:
        pass


class SpliceMaps:
    """np_splice_sockets (the verdict runs on these), np_splice_targets (a redirect may
    deliver to these), splice_flows (peer and counters) and splice_control (mode)."""

    def __init__(self, maps: MapSet):
        self._flows = maps.open(contract.SPLICE_FLOWS)
        self._control = maps.open(contract.SPLICE_CONTROL)
        self._sockets = maps.open(contract.SPLICE_SOCKETS)
        self._targets = maps.open(contract.SPLICE_TARGETS)

    @staticmethod
    def _update(sockhash: BpfMap, cookie: int, sock: Any) -> None:
        # np_splice_sockets and np_splice_targets: one layout (socket cookie -> fd).
        try:
            sockhash.put(cookie, sock.fileno())
        except OSError as e:
            raise SpliceError(e.errno, f"sockhash update: {e.strerror}") from e

    def join(self, a: Any, b: Any, credit: int) -> tuple[int, int]:
        """Splice sockets a and b: from now on the kernel moves each one's incoming data to
        the other's send queue, `credit` bytes each way to begin with.  Returns their
        cookies.  All or nothing."""
        ca, cb = socket_cookie(a), socket_cookie(b)
        try:
            # Entries and targets first: the verdict must find everything once it runs.
            for me, peer in ((ca, cb), (cb, ca)):
                self._flows.put(me, contract.CSplicePeer(peer_cookie=peer))
                self.steer(me, "redirect", 0, credit)
            self._update(self._targets, ca, a)
            self._update(self._targets, cb, b)
            self._update(self._sockets, ca, a)
            self._update(self._sockets, cb, b)
        except OSError:
            # Not established any more (a socket in CLOSE_WAIT is refused).  A socket the
            # verdict already runs on stays until it closes: without entries the verdict
            # passes all of its data to the proxy.
            self.release(ca, cb)
            raise
        for sock in (a, b):
            _kick(sock)
        return ca, cb

    def steer(self, cookie: int, mode: str, consumed: int, credit: int) -> None:
        """Tell the verdict what to do with this socket's data (see struct splice_control)."""
        self._control.put(cookie, contract.CSpliceControl(
            mode=MODES[mode], consumed=consumed, credit=credit))

    def release(self, *cookies: int) -> None:
        """Forget sockets' entries.  The sockhashes keep a live socket (the kernel removes
        it when it closes): detaching the verdict from a receiving socket can drop a
        segment in flight."""
        for cookie in cookies:
            self._flows.delete(cookie)
            self._control.delete(cookie)

    def counters(self, cookie: int) -> tuple[int, int]:
        """(moved, passed): bytes the verdict redirected from this socket to its peer, and
        bytes it left to the proxy, so far."""
        leaf = self._flows.get(cookie)
        if leaf is None:
            return 0, 0
        return int(leaf.moved), int(leaf.passed)

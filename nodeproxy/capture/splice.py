"""The daemon's side of the kernel splice maps (bpf/splice.c): joining two sockets of a
flow, steering the verdict per socket (redirect, pause, hand back to the proxy), and
reading what it moved and what it passed.

The maps and layouts (struct splice_peer, struct splice_control) are those of
nodeproxy/capture/contract.py (bpf/maps.h), reached through map_access (libbpf).
A socket is never removed from the sockhash while it lives (see bpf/splice.c): the
kernel removes it when it closes; the daemon then forgets its entries (release()).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from nodeproxy.capture import contract, sockopt
from nodeproxy.capture.constants import SPLICE_PROXY, SPLICE_REDIRECT
from nodeproxy.capture.map_access import MapSet

SO_COOKIE = 57  # not in Python's socket module

MODES = {"redirect": SPLICE_REDIRECT, "proxy": SPLICE_PROXY}
_KEYS = struct.Struct("QQ")  # a flow's two cookies, as a batch's keys (u64 each)


class SpliceError(OSError):
    """The kernel refused to take a socket into the splice maps."""


def socket_cookie(sock: Any) -> int:
    """The kernel's socket cookie (what the BPF programs key on)."""
    return int(struct.unpack("Q", sockopt.get(sock, socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def _kick(sock: Any) -> None:
    """Bytes that reached the receive queue before the verdict was attached would wait
    for the next data-ready event; setting SO_RCVLOWAT raises one now."""
    try:
        sockopt.set_int(sock, socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    except OSError:
        pass


class SpliceMaps:
    """np_splice_sockets (the verdict runs on these, and redirects to them), splice_flows
    (peer and counters) and splice_control (mode)."""

    def __init__(self, maps: MapSet):
        self._flows = maps.open(contract.SPLICE_FLOWS)
        self._control = maps.open(contract.SPLICE_CONTROL)
        self._sockets = maps.open(contract.SPLICE_SOCKETS)

    def _insert(self, cookie: int, sock: Any) -> None:
        try:
            self._sockets.put(cookie, sock.fileno())
        except OSError as e:
            raise SpliceError(e.errno, f"sockhash update: {e.strerror}") from e

    def join(self, a: Any, b: Any, credit: int) -> tuple[int, int]:
        """Splice sockets a and b: from now on the kernel moves each one's incoming data to
        the other's send queue, `credit` bytes each way to begin with.  Returns their
        cookies.  All or nothing.

        Per flow: two cookies, one batch into splice_flows, the two sockhash updates, one
        batch into splice_control, two kicks (the splice's set-up syscalls: see
        docs/benchmarks.md, "Same-node connection set-up, seventh round")."""
        ca, cb = socket_cookie(a), socket_cookie(b)
        keys = _KEYS.pack(ca, cb)
        try:
            # The peers first: the verdict must find its entry once it runs on a socket.
            # Without a control entry it passes the socket's data to the proxy (counted,
            # so the proxy forwards it in order before any redirect): a socket can be in
            # the sockhash before its peer is, which a redirect would fail on.
            self._flows.put_many(keys, (contract.CSplicePeer * 2)(
                contract.CSplicePeer(peer_cookie=cb), contract.CSplicePeer(peer_cookie=ca)))
            self._insert(ca, a)
            self._insert(cb, b)
            # Both are redirect targets now: the verdict may redirect.
            self._control.put_many(keys, (contract.CSpliceControl * 2)(
                contract.CSpliceControl(mode=SPLICE_REDIRECT, credit=credit),
                contract.CSpliceControl(mode=SPLICE_REDIRECT, credit=credit)))
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
        """Forget sockets' entries (a batch per map).  The sockhash keeps a live socket
        (the kernel removes it when it closes): detaching the verdict from a receiving
        socket can drop a segment in flight."""
        keys = struct.pack(f"{len(cookies)}Q", *cookies)
        self._flows.delete_many(keys)
        self._control.delete_many(keys)

    def counters(self, cookie: int) -> tuple[int, int]:
        """(moved, passed): bytes the verdict redirected from this socket to its peer, and
        bytes it left to the proxy, so far."""
        leaf = self._flows.get(cookie)
        if leaf is None:
            return 0, 0
        return int(leaf.moved), int(leaf.passed)

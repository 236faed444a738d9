"""The daemon's side of the kernel splice maps (bpf/splice.c): joining two sockets of a
flow, stopping the verdict on them, releasing them, and reading what was moved.

The map layout (struct splice_peer) comes from bpf/maps.h through bcc; sockhash maps
are written through libbcc because bcc's Table cannot open them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Any

SO_COOKIE = 57  # not in Python's socket module


class SpliceError(OSError):
    """The kernel refused to take a socket into the splice maps."""


def socket_cookie(sock: Any) -> int:
    """The kernel's socket cookie (what the BPF programs key on)."""
    return int(struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


class SpliceMaps:
    """np_splice_sockets (the verdict runs on these), np_splice_targets (a redirect may
    deliver to these) and splice_flows (each socket's peer and bytes moved)."""

    def __init__(self, bpf: Any, sockets_fd: int, targets_fd: int):
        import bcc  # Debian's python3-bpfcc, only where the programs are loaded

        self._lib = bcc.lib
        self._flows = bpf["splice_flows"]
        self._sockets_fd = sockets_fd
        self._targets_fd = targets_fd

    def _update(self, map_fd: int, cookie: int, sock: Any) -> None:
        key = ctypes.c_uint64(cookie)
        value = ctypes.c_uint32(sock.fileno())
        if self._lib.bpf_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0) < 0:
            code = ctypes.get_errno() or errno.EINVAL
            raise SpliceError(code, f"sockhash update: {os.strerror(code)}")

    def _delete(self, map_fd: int, cookie: int) -> None:
        key = ctypes.c_uint64(cookie)
        self._lib.bpf_delete_elem(map_fd, ctypes.byref(key))  # absent (closed) is fine

    def join(self, a: Any, b: Any) -> tuple[int, int]:
        """Splice sockets a and b: from now on the kernel moves each one's incoming data to
        the other's send queue.  Returns their cookies.  All or nothing."""
        ca, cb = socket_cookie(a), socket_cookie(b)
        try:
            # Targets and peers first: the verdict must find both once it runs.
            self._update(self._targets_fd, ca, a)
            self._update(self._targets_fd, cb, b)
            for me, peer in ((ca, cb), (cb, ca)):
                leaf = self._flows.Leaf()
                leaf.peer_cookie = peer
                leaf.bytes = 0
                self._flows[self._flows.Key(me)] = leaf
            self._update(self._sockets_fd, ca, a)
            self._update(self._sockets_fd, cb, b)
        except OSError:
            self.stop(ca, cb)
            self.release(ca, cb)
            raise
        return ca, cb

    def stop(self, *cookies: int) -> None:
        """The verdict stops handling these sockets' data; it stays in their receive
        queues.  What was already redirected is still being delivered."""
        for cookie in cookies:
            self._delete(self._sockets_fd, cookie)

    def release(self, *cookies: int) -> None:
        """Forget the sockets entirely (frees the kernel's per-socket state: only once
        everything redirected to them is in their send queue)."""
        for cookie in cookies:
            self._delete(self._targets_fd, cookie)
            try:
                del self._flows[self._flows.Key(cookie)]
            except KeyError:
                pass

    def moved(self, cookie: int) -> int:
        """Bytes the verdict has moved from this socket to its peer so far."""
        try:
            return int(self._flows[self._flows.Key(cookie)].bytes)
        except KeyError:
            return 0

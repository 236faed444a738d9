"""Network namespaces: open them, tell whether they vanished, make sockets inside them.

The daemon is one process; it never moves into a pod's netns for longer than
the one socket() call that must happen there (setns is per thread, and the
event loop's thread returns to its own netns immediately).  A socket keeps
the netns it was created in for its whole life.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from nodeproxy.capture.constants import SOCKET_MARK
from nodeproxy.capture.libc import check, libc

CLONE_NEWNET = 0x40000000
# Dial sockets made per visit to a pod's netns (Netns.dial_socket): the spares hold this
# many descriptors at most per pod and family, a few KiB of kernel memory each.
DIAL_BATCH = 4
SO_NETNS_COOKIE = 71  # Linux 5.14+: the cookie the eBPF helpers see for this netns



def _setns(fd: int) -> None:
    check(libc().setns(fd, CLONE_NEWNET), "setns")


class _Home:
    """The calling thread's own netns as a descriptor, closed when the thread ends."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        os.close(self.fd)


_home = threading.local()


def _own_netns() -> int:
    """A descriptor of the calling thread's own netns, opened on its first entered(): every
    transparent dial enters a pod's netns, and opening /proc/thread-self/ns/net each time
    cost an open() and a close() per connection.  A thread leaves its netns only inside
    entered(), so the one it was in at its first call is the one to return to."""
    home: _Home | None = getattr(_home, "home", None)
    if home is None:
        home = _home.home = _Home()
    return home.fd


@contextmanager
def entered(netns_fd: int):
    """Run the body with this thread in another network namespace."""
    own = _own_netns()
    _setns(netns_fd)
    try:
        yield
    finally:
        _setns(own)


def netns_cookie_of(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


@dataclass
class Netns:
    """An open handle on a pod's network namespace."""

    path: str
    fd: int
    inode: int
    device: int
    # net.ipv4.ip_local_port_range inside it, read on first use (transparent.local_ports)
    local_ports: range | None = field(default=None, compare=False)
    # Dial sockets made ahead, by family, lowest descriptor last (dial_socket).
    _spare: dict[int, list[socket.socket]] = field(default_factory=dict, compare=False,
                                                   repr=False)

    @classmethod
    def open(cls, path: str) -> Netns:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            # Fails with EINVAL unless fd really is a network namespace.
            with entered(fd):
                pass
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"{path} is not a network namespace: {e.strerror}") from e
        return cls(path=path, fd=fd, inode=st.st_ino, device=st.st_dev)

    def vanished(self) -> bool:
        """True once the path no longer names the namespace we opened (pod deleted)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_ino, st.st_dev) != (self.inode, self.device)

    def socket(self, family: int, type_: int = socket.SOCK_STREAM) -> socket.socket:
        # entered(), without a generator: every transparent dial comes here.
        own = _own_netns()
        _setns(self.fd)
        try:
            return socket.socket(family, type_)
        finally:
            _setns(own)

    def dial_socket(self, family: int, below: int) -> socket.socket:
        """A new non-blocking TCP socket inside this netns for a dial, with a descriptor
        number below `below` if one was free when it was made (the caller checks it, as it
        checks any socket).  Made DIAL_BATCH at a time in one visit to the netns (two setns
        system calls and their ctypes calls per batch, not per dial); the spares are plain
        new sockets, no option set, so a dial gets exactly what socket() would have made
        then.  A spare whose descriptor came at or above `below` is closed at once, so
        spares never sit on the descriptors the budget keeps for other work
        (tcp/descriptors.py).  close() closes the spares."""
        spare = self._spare.get(family)
        if not spare:
            spare = self._spare[family] = self._make_spares(family, below)
            if not spare:
                return self.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        return spare.pop()

    def _make_spares(self, family: int, below: int) -> list[socket.socket]:
        made: list[socket.socket] = []
        with entered(self.fd):  # once per batch: the generator's cost is shared
            try:
                for _ in range(DIAL_BATCH):
                    made.append(socket.socket(family,
                                              socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
            except OSError:
                if not made:
                    raise
        kept = [sock for sock in made if sock.fileno() < below]
        for sock in made:
            if sock.fileno() >= below:
                sock.close()
        kept.reverse()  # pop() hands out the lowest descriptor first
        return kept

    def listener(self, family: int, host: str, port: int, backlog: int = 4096
                 ) -> socket.socket:
        """A non-blocking listening TCP socket inside this netns.  SO_REUSEPORT: during an
        upgrade the new daemon instance listens beside the old one until it hands over."""
        sock = self.socket(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Accepted sockets inherit the mark: the capture programs leave them alone.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def cookie(self) -> int:
        with self.socket(socket.AF_INET) as probe:
            return netns_cookie_of(probe)

    def pod_key(self, kernel_keeps_pods: bool) -> int:
        """The key a pod in this netns is known by: its netns cookie (SO_NETNS_COOKIE,
        Linux 5.14+), which the eBPF programs see.  On an older kernel (Debian 11's 5.10)
        where no eBPF program keeps pods (iptables mode, which then runs without kernel
        counters: kernel_keeps_pods False), the namespace's inode number instead: unique
        among live namespaces, and this handle keeps the namespace alive while the pod is
        enrolled."""
        try:
            return self.cookie()
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT or kernel_keeps_pods:
                raise
            return self.inode

    def close(self) -> None:
        for spare in self._spare.values():
            for sock in spare:
                sock.close()
        self._spare.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""The few rtnetlink requests the daemon makes: add or delete one policy-routing rule
(fwmark -> table) and one route in a table, and wait for the kernel's answer.

What the transparent dial needs in a pod's netns (nodeproxy.capture.transparent) is two
rules and two routes per pod.  They used to be made with pyroute2, whose package imports
all of its families (ndb with sqlite3, ipdb, nftables, nl80211, unittest.mock, ...) on
any import: about 9 MiB of the daemon's 82 MiB resident set and 185 modules, for four
messages per enrolled pod.  These are the same messages (linux/rtnetlink.h,
linux/fib_rules.h), built with ``struct``.

A socket is made in the calling thread's network namespace: enter the pod's first
(nodeproxy.capture.namespaces.entered).  Errors are ``OSError`` with the kernel's errno
(EEXIST: the rule or route is already there; ENOENT/ESRCH: nothing to delete).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_NEWRULE = 32
RTM_DELRULE = 33

RTN_LOCAL = 2            # route type: deliver locally
RT_SCOPE_HOST = 254
FR_ACT_TO_TBL = 1        # rule action: look up a table

RTA_OIF = 4
RTA_TABLE = 15
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15

_HEADER = struct.Struct("=IHHII")     # struct nlmsghdr
_BODY = struct.Struct("=BBBBBBBBI")   # struct rtmsg and struct fib_rule_hdr: same layout
_ATTR = struct.Struct("=HH")          # struct nlattr
_ERROR = struct.Struct("=i")          # struct nlmsgerr's error (then the request's header)
_U32 = struct.Struct("=I")

ANSWER_TIMEOUT = 5.0  # seconds; past it the request fails with TimeoutError (an OSError)


def _attrs(pairs: Iterable[tuple[int, int]]) -> bytes:
    """u32 attributes (every one these requests carry is 4 bytes: no padding)."""
    return b"".join(_ATTR.pack(_ATTR.size + 4, kind) + _U32.pack(value) for kind, value in pairs)


def _table_byte(table: int) -> int:
    # The header's 8-bit table field; a table above 255 goes in the attribute alone.
    return table if table < 256 else 0


def rule_message(add: bool, family: int, fwmark: int, table: int, priority: int,
                 seq: int = 1) -> bytes:
    """RTM_NEWRULE (create, exclusive: EEXIST if an equal rule exists) or RTM_DELRULE for
    `fwmark <mark> lookup <table> priority <priority>` (no mask: all 32 bits)."""
    body = _BODY.pack(family, 0, 0, 0, _table_byte(table), 0, 0, FR_ACT_TO_TBL, 0)
    body += _attrs(((FRA_PRIORITY, priority), (FRA_FWMARK, fwmark), (FRA_TABLE, table)))
    kind, flags = ((RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL) if add else (RTM_DELRULE, 0))
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                        seq, 0) + body


def local_default_route_message(add: bool, family: int, table: int, oif: int,
                                seq: int = 1) -> bytes:
    """RTM_NEWROUTE (create, exclusive) or RTM_DELROUTE for `local default dev <oif>
    table <table>`, as ``ip route add local default dev lo table T`` makes it (protocol
    boot on add; any protocol matches on delete)."""
    protocol = 3 if add else 0  # RTPROT_BOOT; 0: the delete matches whoever added it
    body = _BODY.pack(family, 0, 0, 0, _table_byte(table), protocol, RT_SCOPE_HOST,
                      RTN_LOCAL, 0)
    body += _attrs(((RTA_TABLE, table), (RTA_OIF, oif)))
    kind, flags = ((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL) if add else (RTM_DELROUTE, 0))
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                        seq, 0) + body


def acknowledgement(reply: bytes, seq: int) -> int:
    """The errno of the kernel's answer to request `seq` (0: done), or ValueError."""
    offset = 0
    while offset + _HEADER.size <= len(reply):
        length, kind, _flags, reply_seq, _pid = _HEADER.unpack_from(reply, offset)
        if length < _HEADER.size:
            break
        if kind == NLMSG_ERROR and reply_seq == seq:
            return -_ERROR.unpack_from(reply, offset + _HEADER.size)[0]
        offset += (length + 3) & ~3
    raise ValueError(f"no rtnetlink acknowledgement for request {seq}")


class RouteSocket:
    """One NETLINK_ROUTE socket in the current thread's network namespace; requests one at
    a time, each answered before the next.  A context manager that closes it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        # The kernel answers at once; a bound keeps a worker thread from waiting forever.
        self._sock.settimeout(ANSWER_TIMEOUT)
        self._seq = 0

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, build: Callable[..., bytes], *args: int,
                ignore: tuple[int, ...] = ()) -> None:
        """Send ``build(*args, seq=...)`` and wait for its acknowledgement; OSError with
        the kernel's errno unless that errno is in `ignore`."""
        self._seq += 1
        self._sock.send(build(*args, seq=self._seq))
        while True:
            try:
                code = acknowledgement(self._sock.recv(65536), self._seq)
            except ValueError:
                continue  # not ours (an answer to an earlier request): read on
            break
        if code and code not in ignore:
            raise OSError(code, f"rtnetlink: {os.strerror(code)}")

    def rule(self, add: bool, family: int, fwmark: int, table: int, priority: int,
             ignore: tuple[int, ...] = ()) -> None:
        self.request(rule_message, add, family, fwmark, table, priority, ignore=ignore)

    def local_default_route(self, add: bool, family: int, table: int, oif: int,
                            ignore: tuple[int, ...] = ()) -> None:
        self.request(local_default_route_message, add, family, table, oif, ignore=ignore)


GONE = (errno.ENOENT, errno.ESRCH)
"""What a delete of a rule or route that is not there answers."""

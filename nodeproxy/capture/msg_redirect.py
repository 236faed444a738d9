"""The daemon's half of the sk_msg fast path (bpf/redirect.c).

A captured application socket joins the fast path in the kernel when it is established
(sockops).  The proxy's accepted socket of that connection joins here, from user space,
once the proxy has decided the connection and relays it itself (`enable`): the kernel
never sees that socket established (it belongs to the daemon's cgroup, and attaching
sockops there could mean every socket of the machine), and joining only after the
decision means a flow the proxy hands to the splice never receives anything by redirect.

While a connection is on the fast path the proxy tells the kernel how much it has read
from its socket (`ProxyReads`): the application's messages may only be redirected while
little enough of what the application sent is unread, and a direction that had to take
TCP (the application wrote before the proxy's socket joined) may be redirected again once
the proxy has read every byte of it (see bpf/redirect.c, Order).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from nodeproxy.capture import contract
from nodeproxy.capture.constants import MSG_TO_PROXY_PENDING
from nodeproxy.capture.map_access import BpfMap, MapSet

_COOKIE = struct.Struct("=Q")  # np_msg_proxy_read's key: the application socket's cookie

# Once the application's direction is back on the fast path, the proxy posts its read
# count every quarter of the pending bound (so a busy connection never hits the bound just
# because the kernel's count is stale).
POST_EVERY = MSG_TO_PROXY_PENDING // 4
# While a direction takes TCP, at most one post per this many seconds (ProxyReads).
WATCH_INTERVAL = 0.001


class ProxyReads:
    """Bytes the proxy has read from its socket of one fast-path connection, posted to the
    kernel (np_msg_proxy_read).

    While the application's direction takes TCP (it wrote before the proxy's socket
    joined, or the proxy fell behind), the exact count must reach the kernel once the
    proxy has read everything: the direction goes back on the fast path at the
    application's first send after that.  A read then posts at once (and looks at the
    flow, to notice that it is back), but at most one post per WATCH_INTERVAL: reads
    within it only add up, and a timer posts their count at its end.  A late count only
    keeps the direction on TCP that much longer (the kernel never redirects on a count
    lower than what was sent), so a bulk flow on TCP costs two system calls per interval,
    not per read.  Otherwise the count is posted every POST_EVERY bytes (and the flow
    looked at again); none per read while the direction is redirected.

    One per relayed connection, idle ones included: slots, and the value and flow buffers
    each post and look fill and use at once are shared (one event-loop thread).  It is
    also the relay's byte callback (`counting_reads`): one object per connection, not two.
    """

    __slots__ = ("_app_key", "_cookie", "_flows", "_on_bytes", "_posted", "_reads", "_timer",
                 "_watching", "total")

    _value = contract.MSG_PROXY_READ.value(0)  # scratch: filled, then written
    _flow = contract.CMsgFlow()  # scratch: each look reads into it, then tests it

    def __init__(self, reads: BpfMap, app_cookie: int, flows: BpfMap,
                 app_key: bytes):
        self._reads = reads
        self._cookie = _COOKIE.pack(app_cookie)  # the key, packed
        self._flows = flows
        self._app_key = app_key
        self._watching = True  # believed on TCP: post what is read (within WATCH_INTERVAL)
        self._timer: asyncio.TimerHandle | None = None  # the interval's end, while watching
        self._posted = 0
        self.total = 0
        self._on_bytes: Callable[[bool, int], None] | None = None  # counting_reads

    def __call__(self, from_downstream: bool, n: int) -> None:
        """The relay's byte callback (counting_reads): count, and report what the proxy
        read from the downstream side."""
        assert self._on_bytes is not None
        self._on_bytes(from_downstream, n)
        if from_downstream:
            # consumed(n), written out.
            self.total += n
            if self._watching:
                if self._timer is None:
                    self._post()
                    self._hold()
            elif self.total - self._posted >= POST_EVERY:
                self._post()

    def consumed(self, n: int) -> None:
        """n bytes read from the application (what __call__ does for a downstream read,
        written out there: one call per relayed read, not two)."""
        self.total += n
        if self._watching:
            if self._timer is None:
                self._post()
                self._hold()
        elif self.total - self._posted >= POST_EVERY:
            self._post()

    def _hold(self) -> None:
        """Posts wait for the interval's end while the direction is still on TCP."""
        if self._watching:
            self._timer = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._settle)

    def _settle(self) -> None:
        self._timer = None
        if self._watching and self.total != self._posted:
            self._post()
            self._hold()

    def _post(self) -> None:
        on_tcp = self._send_on_tcp()
        if on_tcp is None:
            self._watching = False
            self._posted = self.total  # the flow is gone: nothing more to post
            return
        self._watching = on_tcp
        self._value.value = self.total
        try:
            self._reads.put(self._cookie, self._value)
        except OSError:
            pass  # the kernel's LRU is full of others: this flow's count is posted next read
        self._posted = self.total

    def _send_on_tcp(self) -> bool | None:
        """Whether the application's messages take TCP now (None: the flow is gone)."""
        try:
            if not self._flows.read_into(self._app_key, self._flow):
                return None
        except OSError:
            return None
        return bool(self._flow.send_on_tcp)


def counting_reads(on_bytes: Callable[[bool, int], None], reads: ProxyReads | None
                   ) -> Callable[[bool, int], None]:
    """A relay's byte callback that also reports what it read from the downstream side
    (the ProxyReads itself, bound to on_bytes: one object per connection)."""
    if reads is None:
        return on_bytes
    reads._on_bytes = on_bytes
    return reads


class MsgRedirect:
    """np_msg_sockets and its companion maps (np_msg_flows, np_msg_proxy_read,
    np_msg_settings) of one loaded program set."""

    def __init__(self, maps: MapSet):
        self._flows = maps.open(contract.MSG_FLOWS)
        self._reads = maps.open(contract.MSG_PROXY_READ)
        self._settings = maps.open(contract.MSG_SETTINGS)
        self._sockets = maps.open(contract.MSG_SOCKETS)
        self.enabled = False

    def set_enabled(self, on: bool) -> None:
        """fastPath.skMsg: whether connections established from now on use the fast path
        (connections already on it keep it until they close)."""
        self._settings.put(0, 1 if on else 0)
        self.enabled = on

    def enable(self, sock: Any, netns_cookie: int, local: tuple, remote: tuple
               ) -> ProxyReads | None:
        """Put the proxy's accepted socket of a captured connection on the fast path.
        `local` and `remote` are its addresses (what its transport already knows: asking
        uvloop's socket object makes a system call and keeps a copy per connection).

        Call it before the proxy writes to the socket, and only for a connection the
        proxy relays itself: never for one it splices.  Returns where to report what the
        proxy reads from the socket, or None when the connection is not on the fast path
        (switched off, the application socket did not join, or the connection ended).
        """
        if not self.enabled:
            return None
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        # Each address packed once, for both keys (the application's socket sees them
        # the other way round).
        local_ip = contract.packed_address(family, local[0])
        remote_ip = contract.packed_address(family, remote[0])
        app_key = contract.msg_key(netns_cookie, family, remote_ip, remote[1], local_ip,
                                   local[1])
        try:
            flow = self._flows.get(app_key)
        except OSError:
            return None
        if flow is None:
            return None
        proxy_key = contract.msg_key(netns_cookie, family, local_ip, local[1], remote_ip,
                                     remote[1])
        try:
            self._sockets.put(proxy_key, sock.fileno())
        except OSError:
            return None  # e.g. the application already closed: nothing left to speed up
        return ProxyReads(self._reads, int(flow.app_cookie), self._flows, app_key)


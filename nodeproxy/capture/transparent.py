"""Transparent connections into a pod: the application sees the real client's address.

The proxy connects to the application from inside the pod's netns with a
socket bound (IP_TRANSPARENT) to the client's IP and marked TRANSPARENT_MARK.
Two settings of the pod's netns make the replies come back to the proxy
without iptables:
- net.ipv4.tcp_fwmark_accept=1: the application's accepted socket inherits
  the mark of the proxy's SYN;
- `ip rule fwmark TRANSPARENT_MARK lookup TABLE` with `local default dev lo`
  in TABLE (v4 and v6): packets carrying the mark are delivered locally, to
  the proxy's transparent socket, instead of being routed out of the pod;
- net.ipv4.fwmark_reflect=1 and net.ipv6.fwmark_reflect=1: a reply the kernel
  sends for no socket (the reset to a SYN for a port nothing listens on)
  carries the mark of the packet it answers, so it too comes back: the dial is
  refused at once instead of hanging until its connect timeout.  The pod's own
  packets carry no mark, so their resets and ICMP replies are as before.
Only sockets of connections the proxy made carry the mark, so the pod's own
traffic is routed as before.

The source port: the proxy keeps the client's own port where it can
(nodeproxy.tcp.dial), binding exactly that port, which costs one bind-hash
lookup.  Binding port 0 instead makes the kernel search the pod's ephemeral
range for a port no socket on that address holds, TIME_WAIT ones included, at
bind time (before the destination is known, so it cannot share a port between
destinations as connect() does): a search that grows with every bound and
TIME_WAIT socket the pod's netns holds, and the connection rate with it.  The
bound port is always one of the pod's own ephemeral ports (local_ports; a client
port outside them is folded into them), so a client choosing its source port
cannot occupy a port the pod's application listens on.
"""

from __future__ import annotations

import errno
import socket

from nodeproxy.capture import sysctl
from nodeproxy.capture.constants import TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE
from nodeproxy.capture.namespaces import Netns, entered
from nodeproxy.capture.rtnetlink import GONE, RouteSocket

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
RULE_PRIORITY = 15051
LOOPBACK_IFINDEX = 1  # lo is always interface 1 of a network namespace


def prepare(netns: Netns) -> None:
    """Make the pod's netns route marked replies back to the proxy (idempotent).

    Blocking (netlink requests, each waiting for the kernel's answer): call it from a
    worker thread."""
    with entered(netns.fd):
        # sysctl.write: also where /proc/sys is read-only (the DaemonSet's container).
        sysctl.write("net/ipv4/tcp_fwmark_accept", "1")
        sysctl.write("net/ipv4/fwmark_reflect", "1")
        sysctl.write("net/ipv6/fwmark_reflect", "1")
        # When one of two SO_REUSEPORT listeners closes (upgrade handover), its queued
        # connections move to the other instead of being reset.
        sysctl.write("net/ipv4/tcp_migrate_req", "1")
        with RouteSocket() as rtnl:
            for family in (socket.AF_INET, socket.AF_INET6):
                rtnl.rule(True, family, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE,
                          RULE_PRIORITY, ignore=(errno.EEXIST,))
                rtnl.local_default_route(True, family, TRANSPARENT_ROUTE_TABLE,
                                         LOOPBACK_IFINDEX, ignore=(errno.EEXIST,))


def undo(netns: Netns) -> None:
    """Remove what prepare() added (the pod leaves the mesh)."""
    with entered(netns.fd):
        with RouteSocket() as rtnl:
            for family in (socket.AF_INET, socket.AF_INET6):
                rtnl.rule(False, family, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE,
                          RULE_PRIORITY, ignore=GONE)
                rtnl.local_default_route(False, family, TRANSPARENT_ROUTE_TABLE,
                                         LOOPBACK_IFINDEX, ignore=GONE)


def local_ports(netns: Netns) -> range:
    """The pod's ephemeral ports (net.ipv4.ip_local_port_range), read on first use."""
    if netns.local_ports is None:
        with entered(netns.fd):
            low, high = (int(n) for n in sysctl.read("net/ipv4/ip_local_port_range").split())
        netns.local_ports = range(low, high + 1)
    return netns.local_ports


def transparent_socket(netns: Netns, source_ip: str, family: int,
                       port: int = 0, below: int = 1 << 30) -> socket.socket:
    """A non-blocking socket inside the pod's netns, bound to the client's address and
    `port` (0: a port the kernel searches).  OSError EADDRINUSE if `port` is taken.
    `below`: the descriptor ceiling of proxied sockets (Netns.dial_socket)."""
    # Made non-blocking by socket() itself: one system call less than setblocking().
    sock = netns.dial_socket(family, below)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TRANSPARENT_MARK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((source_ip, port))
    except OSError:
        sock.close()
        raise
    return sock

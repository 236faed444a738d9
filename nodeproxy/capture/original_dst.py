"""Where a captured connection was really going: getsockopt(SO_ORIGINAL_DST).

One question for both capture modes, asked on the socket the proxy accepted:

- iptables: netfilter's connection tracking answers with the destination the
  REDIRECT rule rewrote (``SO_ORIGINAL_DST``, ``IP6T_SO_ORIGINAL_DST`` for IPv6);
- ebpf: the ``np_original_dst`` cgroup/getsockopt program (bpf/capture.c), attached to
  the daemon's own cgroup, answers from the map the connect and sockops programs filled,
  and passes every other getsockopt through untouched.

``None`` means nobody knows: the connection was not captured (someone dialled the
listener directly).  Addresses come back as the kernel stores them, an IPv4-mapped
IPv6 address as the IPv4 address it stands for.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.capture import sockopt

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, at SOL_IPV6
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28
# What the kernel says when it does not know: no conntrack entry, or no conntrack at all.
UNKNOWN_ERRNOS = (errno.ENOENT, errno.ENOPROTOOPT, errno.ENOTCONN)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SocketLike(Protocol):
    """A socket, or what an asyncio transport gives for one (uvloop's PseudoSocket): asked
    on its descriptor (capture/sockopt.py: one system call, not two, per connection)."""

    @property
    def family(self) -> int: ...
    def fileno(self) -> int: ...


@dataclass(frozen=True)
class Destination:
    ip: IPAddress
    port: int


def parse_sockaddr(raw: bytes) -> Destination:
    """A struct sockaddr_in or sockaddr_in6 as the kernel writes it."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET and len(raw) >= SOCKADDR_IN_SIZE:
        return Destination(ipaddress.IPv4Address(raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= SOCKADDR_IN6_SIZE:
        address = ipaddress.IPv6Address(raw[8:24])
        return Destination(address.ipv4_mapped or address, port)
    raise ValueError(f"not a sockaddr_in or sockaddr_in6 (family {family}, {len(raw)} bytes)")


def original_destination(sock: SocketLike) -> Destination | None:
    """The destination the accepted connection's client dialled, or None if not captured."""
    if sock.family == socket.AF_INET:
        level, option, size = socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE
    else:
        level, option, size = socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE
    try:
        raw = sockopt.get(sock, level, option, size)
    except OSError as e:
        if e.errno in UNKNOWN_ERRNOS:
            return None
        raise
    return parse_sockaddr(raw)

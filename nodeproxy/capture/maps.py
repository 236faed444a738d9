"""Typed access to the capture maps.

Key and value layouts come from bpf/maps.h through the ctypes classes bcc
generates for each table (Table.Key / Table.Leaf), so the C and Python sides
share one definition.  Addresses are kept as the kernel stores them: network
byte order in u32 words.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _words(ip: IPAddress) -> list[int]:
    """An address as the kernel's u32 words (network order in memory)."""
    raw = ip.packed
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def _address(family: int, words) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(int(words[0]).to_bytes(4, "little"))
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    address = ipaddress.IPv6Address(raw)
    return address.ipv4_mapped or address


@dataclass(frozen=True)
class OriginalDestination:
    ip: IPAddress
    port: int
    pod_id: int


@dataclass(frozen=True)
class PodCounters:
    """One pod's kernel-kept TCP counters (see struct pod_counters)."""

    captured: int
    out_opened: int
    in_opened: int
    out_closed: int
    in_closed: int
    out_bytes_sent: int
    out_bytes_received: int
    in_bytes_sent: int
    in_bytes_received: int
    rtt_sum_us: int
    rtt_samples: int


class CaptureMaps:
    """The daemon's view of the capture maps of one loaded bcc.BPF object."""

    def __init__(self, bpf):
        self._pods = bpf["pods"]
        self._by_tuple = bpf["origdst_by_tuple"]
        self._stats = bpf["pod_stats"]

    def enroll(self, netns_cookie: int, pod_id: int) -> None:
        leaf = self._pods.Leaf()
        leaf.pod_id = pod_id
        leaf.flags = 0
        self._pods[self._pods.Key(netns_cookie)] = leaf

    def unenroll(self, netns_cookie: int, pod_id: int) -> None:
        for table, key in ((self._pods, netns_cookie), (self._stats, pod_id)):
            try:
                del table[table.Key(key)]
            except KeyError:
                pass

    def enrolled(self) -> dict[int, int]:
        """netns cookie -> pod id, as the kernel has it."""
        return {k.value: v.pod_id for k, v in self._pods.items()}

    def take_original_destination(
        self, netns_cookie: int, peer_ip: IPAddress, peer_port: int
    ) -> OriginalDestination | None:
        """The original destination of the captured socket whose local address is the peer
        of an accepted proxy connection; the entry is removed once read."""
        key = self._by_tuple.Key()
        key.netns_cookie = netns_cookie
        key.family = socket.AF_INET if peer_ip.version == 4 else socket.AF_INET6
        for i, word in enumerate(_words(peer_ip)):
            key.ip[i] = word
        key.port = peer_port
        try:
            leaf = self._by_tuple[key]
        except KeyError:
            return None
        try:
            del self._by_tuple[key]
        except KeyError:
            pass
        return OriginalDestination(
            ip=_address(leaf.family, leaf.ip),
            port=socket.ntohs(leaf.port),
            pod_id=leaf.pod_id,
        )

    def pod_counters(self) -> dict[int, PodCounters]:
        fields = [name for name, _ in self._stats.Leaf._fields_]
        return {
            k.value: PodCounters(**{name: int(getattr(v, name)) for name in fields})
            for k, v in self._stats.items()
        }



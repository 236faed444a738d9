"""Typed access to the capture maps.

Maps and their key and value layouts are those of nodeproxy/capture/contract.py, the
Python view of bpf/maps.h (a unit test holds the two equal).  Addresses are kept as the
kernel stores them: network byte order in u32 words.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.capture import contract
from nodeproxy.capture.map_access import MapSet

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _words(ip: IPAddress) -> list[int]:
    """An address as the kernel's u32 words (network order in memory)."""
    raw = ip.packed
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def probe_key(network: IPNetwork) -> contract.CProbeKey:
    """struct probe_key of a probe source prefix: the trie matches the family's 32 bits,
    then the prefix's (host bits are zeroed, as the kernel compares only the prefix)."""
    key = contract.CProbeKey()
    key.prefixlen = 32 + network.prefixlen
    key.family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    for i, word in enumerate(_words(network.network_address)):
        key.ip[i] = word
    return key


@dataclass(frozen=True)
class PodCounters:
    """One pod's kernel-kept TCP counters: a snapshot of struct pod_counters (its fields,
    in its order: tests/unit/test_kernel_contract.py)."""

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
    denied: int
    inbound_captured: int


@dataclass(frozen=True)
class FastPathCounters:
    """The node's kernel fast-path counters: a snapshot of struct fastpath_counters (its
    fields, in its order)."""

    splice_bytes: int = 0
    splice_fallback_bytes: int = 0
    splice_drops: int = 0
    msg_redirects: int = 0
    msg_redirect_bytes: int = 0
    msg_misses: int = 0


class CaptureMaps:
    """The daemon's view of the capture maps of one loaded program set."""

    def __init__(self, maps: MapSet):
        self._pods = maps.open(contract.PODS)
        self._stats = maps.open(contract.POD_STATS)
        self._denies = maps.open(contract.CONNECT_DENIES)
        self._policy_denials = maps.open(contract.POLICY_DENIALS)
        self._fastpath = maps.open(contract.FASTPATH_STATS)
        self._inbound_ips = maps.open(contract.INBOUND_IPS)
        self._dials = maps.open(contract.PROXY_DIALS)
        self._dial_keys: dict[tuple[tuple[str, int], tuple[str, int]], bytes] = {}  # in flight
        self._listeners = maps.open(contract.INBOUND_LISTENERS)
        self._probe_sources = maps.open(contract.PROBE_SOURCES)

    def enroll(self, netns_cookie: int, pod_id: int, flags: int = 0) -> None:
        self._pods.put(netns_cookie, contract.CPodInfo(pod_id=pod_id, flags=flags))

    def unenroll(self, netns_cookie: int, pod_id: int) -> None:
        self._pods.delete(netns_cookie)
        self._stats.delete(pod_id)

    def enrolled(self) -> dict[int, int]:
        """netns cookie -> pod id, as the kernel has it."""
        return {k.value: v.pod_id for k, v in self._pods.items()}

    def set_inbound(self, pod_id: int, ips: list[IPAddress],
                    listeners: dict[int, socket.socket]) -> None:
        """Steer new connections to these pod IPs to the pod's inbound listeners
        (one per address family)."""
        for family, sock in listeners.items():
            index = pod_id * 2 + (1 if family == socket.AF_INET6 else 0)
            try:
                self._listeners.put(index, sock.fileno())
            except OSError as e:
                raise OSError(e.errno, f"pod {pod_id}: cannot put its inbound listener in "
                              f"the sockmap: {e.strerror}") from e
        for ip in ips:
            self._inbound_ips.put(self._ip_key(ip), pod_id)

    def clear_inbound(self, pod_id: int, ips: list[IPAddress]) -> None:
        for ip in ips:
            self._inbound_ips.delete(self._ip_key(ip))
        for offset in (0, 1):
            self._listeners.delete(pod_id * 2 + offset)

    def _ip_key(self, ip: IPAddress) -> contract.CIpKey:
        key = contract.CIpKey()
        key.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        for i, word in enumerate(_words(ip)):
            key.ip[i] = word
        return key

    @staticmethod
    def _dial_key(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        return contract.dial_key(family, contract.packed_address(family, source[0]), source[1],
                                 contract.packed_address(family, dest[0]), dest[1])

    def expect_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        """The proxy is about to connect from `source` (a client's address) into a pod at
        `dest`: inbound capture must not steer it back to the proxy."""
        key = self._dial_key(source, dest)
        self._dials.put(key, 1)
        # forget_dial follows within the dial: the packed key is kept for it, not built again.
        self._dial_keys[(source, dest)] = key

    def forget_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        key = self._dial_keys.pop((source, dest), None)
        self._dials.delete(key if key is not None else self._dial_key(source, dest))

    def replace_denies(self, denies: list[tuple[int, IPAddress, int, int]]) -> None:
        """Make the kernel's connect-time DENY set exactly these (pod id, ip, port, policy
        index) entries: new ones are added before stale ones are removed."""
        wanted = {}
        for pod_id, ip, port, policy in denies:
            key = contract.CDenyKey()
            key.pod_id = pod_id
            key.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            for i, word in enumerate(_words(ip)):
                key.ip[i] = word
            key.port = socket.htons(port)
            wanted[bytes(key)] = (key, policy)
        for key, policy in wanted.values():
            self._denies.put(key, policy)
        for key in self._denies.keys():
            if bytes(key) not in wanted:
                self._denies.delete(key)

    def replace_probe_sources(self, networks: Iterable[IPNetwork]) -> None:
        """Make the kernel's probe sources (connections inbound capture leaves to the pod)
        exactly these prefixes: new ones are added before stale ones are removed, so a
        source in both the old and the new set is never captured in between."""
        wanted = {bytes(key): key for key in map(probe_key, networks)}
        for key in wanted.values():
            self._probe_sources.put(key, 1)
        for key in self._probe_sources.keys():
            if bytes(key) not in wanted:
                self._probe_sources.delete(key)

    def probe_sources(self) -> list[IPNetwork]:
        """The probe source prefixes as the kernel has them."""
        out: list[IPNetwork] = []
        for key in self._probe_sources.keys():
            network: type[IPNetwork] = (ipaddress.IPv4Network if key.family == socket.AF_INET
                                        else ipaddress.IPv6Network)
            packed = bytes(key.ip)[:network._max_prefixlen // 8]
            out.append(network((packed, key.prefixlen - 32)))
        return out

    def policy_denials(self) -> dict[int, int]:
        """Policy index -> connects the kernel refused for it."""
        return {k.value: v.value for k, v in self._policy_denials.items() if v.value}

    def pod_counters(self) -> dict[int, PodCounters]:
        fields = [name for name, _ in contract.CPodCounters._fields_]
        return {
            k.value: PodCounters(**{name: int(getattr(v, name)) for name in fields})
            for k, v in self._stats.items()
        }

    def fastpath_counters(self) -> FastPathCounters:
        leaf = self._fastpath.get(0) or contract.CFastpathCounters()
        return FastPathCounters(**{name: int(getattr(leaf, name))
                                   for name, _ in contract.CFastpathCounters._fields_})


class PodMaps(Protocol):
    """What enrollment and telemetry need of the kernel maps in either capture mode."""

    def enroll(self, netns_cookie: int, pod_id: int, flags: int = 0) -> None: ...
    def unenroll(self, netns_cookie: int, pod_id: int) -> None: ...
    def enrolled(self) -> dict[int, int]: ...
    def pod_counters(self) -> dict[int, PodCounters]: ...


class NoKernelMaps:
    """Stands in for CaptureMaps where no eBPF program could be set up (iptables mode on a
    kernel or machine without sockops or bcc): nothing is kept, so the kernel counters of
    pods (connections, bytes, RTT) are not available."""

    def enroll(self, netns_cookie: int, pod_id: int, flags: int = 0) -> None:
        pass

    def unenroll(self, netns_cookie: int, pod_id: int) -> None:
        pass

    def enrolled(self) -> dict[int, int]:
        return {}

    def pod_counters(self) -> dict[int, PodCounters]:
        return {}

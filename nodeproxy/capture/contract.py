"""The Python view of bpf/maps.h: every struct the eBPF programs and the daemon share, as
a ctypes layout (C<Name> is struct <name>), and every map, by name, kind, key and value.

This module is the one place in nodeproxy/ that names a map or restates a layout:
CaptureMaps, SpliceMaps and MsgRedirect reach maps through map_access.BpfMap, which
reads and writes these layouts (never ones bcc derives at run time); the loading child
finds each map's descriptor by the names here (`map_fd`).  Two checks keep it equal to
the C side:
- tests/unit/test_kernel_contract.py parses bpf/maps.h (no root, no bcc) and compares
  every struct's fields, types, offsets and size and every map with what is here;
- `check_compiled` compares it with what bcc compiled, each time the programs load.

Addresses are kept as the kernel stores them: network byte order in u32 words.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
IP_WORDS = u32 * 4  # IPv4 in word 0, IPv6 in all four


class CPodInfo(ctypes.Structure):
    """struct pod_info: an enrolled pod, keyed by its netns cookie."""

    _fields_ = [("pod_id", u32), ("flags", u32)]


class COrigDst(ctypes.Structure):
    """struct orig_dst: the original destination of a captured connect()."""

    _fields_ = [("ip", IP_WORDS), ("port", u16), ("family", u16), ("pod_id", u32)]


class CTupleKey(ctypes.Structure):
    """struct tuple_key: the application socket's local address as the proxy sees it."""

    _fields_ = [("netns_cookie", u64), ("ip", IP_WORDS), ("port", u32), ("family", u32)]


class CPodCounters(ctypes.Structure):
    """struct pod_counters: one pod's kernel-kept TCP counters."""

    _fields_ = [(name, u64) for name in (
        "captured", "out_opened", "in_opened", "out_closed", "in_closed",
        "out_bytes_sent", "out_bytes_received", "in_bytes_sent", "in_bytes_received",
        "rtt_sum_us", "rtt_samples", "denied", "inbound_captured")]


class CDenyKey(ctypes.Structure):
    """struct deny_key: an identity-free DENY compiled for the kernel."""

    _fields_ = [("pod_id", u32), ("ip", IP_WORDS), ("port", u16), ("family", u16)]


class CDialKey(ctypes.Structure):
    """struct dial_key: a transparent dial of the proxy into a pod, as sk_lookup sees it."""

    _fields_ = [("remote_ip", IP_WORDS), ("local_ip", IP_WORDS), ("remote_port", u16),
                ("family", u16), ("local_port", u32)]


# struct dial_key and struct msg_key packed in one call from packed addresses (what
# socket.inet_pton and ipaddress's .packed give; 4 or 16 bytes, zero-padded to the four
# words): a proxied connection builds them without parsing address strings.
_DIAL_KEY = struct.Struct("=16s16sHHI")
_MSG_KEY = struct.Struct("=Q16s16sIIII")


def packed_address(family: int, text: str) -> bytes:
    """An address string as the kernel keeps it (inet_pton; a scope suffix is dropped)."""
    return socket.inet_pton(family, text.partition("%")[0])


def dial_key(family: int, remote_ip: bytes, remote_port: int, local_ip: bytes,
             local_port: int) -> bytes:
    """struct dial_key, packed, of a dial from remote_ip:remote_port (the client's address,
    bound by the proxy) to local_ip:local_port (in the pod); the remote port in network
    order, as sk_lookup has it."""
    return _DIAL_KEY.pack(remote_ip, local_ip, socket.htons(remote_port), family, local_port)


def msg_key(netns_cookie: int, family: int, local_ip: bytes, local_port: int,
            remote_ip: bytes, remote_port: int) -> bytes:
    """struct msg_key, packed, of one socket of a connection, seen from that socket."""
    return _MSG_KEY.pack(netns_cookie, local_ip, remote_ip, local_port, remote_port,
                         family, 0)


class CIpKey(ctypes.Structure):
    """struct ip_key: a pod IP that inbound capture steers."""

    _fields_ = [("ip", IP_WORDS), ("family", u32)]


class CProbeKey(ctypes.Structure):
    """struct probe_key: a probe source prefix in the LPM trie (prefixlen counts the
    family's 32 bits too)."""

    _fields_ = [("prefixlen", u32), ("family", u32), ("ip", IP_WORDS)]


class CSockState(ctypes.Structure):
    """struct sock_state: per-socket state in socket-local storage (kernel only)."""

    _fields_ = [("pod_id", u32), ("direction", u32), ("flags", u32), ("pad", u32),
                ("acked_base", u64), ("received_base", u64)]


class CSplicePeer(ctypes.Structure):
    """struct splice_peer: a spliced flow as one of its sockets sees it."""

    _fields_ = [("peer_cookie", u64), ("moved", u64), ("passed", u64)]


class CSpliceControl(ctypes.Structure):
    """struct splice_control: the daemon's instructions for one spliced socket."""

    _fields_ = [("consumed", u64), ("credit", u64), ("mode", u32), ("pad", u32)]


class CMsgKey(ctypes.Structure):
    """struct msg_key: one socket of an sk_msg fast-path connection."""

    _fields_ = [("netns_cookie", u64), ("local_ip", IP_WORDS), ("remote_ip", IP_WORDS),
                ("local_port", u32), ("remote_port", u32), ("family", u32), ("pad", u32)]


class CMsgFlow(ctypes.Structure):
    """struct msg_flow: one connection on the sk_msg fast path."""

    _fields_ = [("app_cookie", u64), ("sent_redirected", u64), ("sent_tcp", u64),
                ("received_redirected", u64), ("send_on_tcp", u32), ("receive_on_tcp", u32)]


class CFastpathCounters(ctypes.Structure):
    """struct fastpath_counters: the node's kernel fast-path counters (one slot)."""

    _fields_ = [(name, u64) for name in (
        "splice_bytes", "splice_fallback_bytes", "splice_drops", "msg_redirects",
        "msg_redirect_bytes", "msg_misses")]


# C struct name -> its layout here.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "pod_info": CPodInfo,
    "orig_dst": COrigDst,
    "tuple_key": CTupleKey,
    "pod_counters": CPodCounters,
    "deny_key": CDenyKey,
    "dial_key": CDialKey,
    "ip_key": CIpKey,
    "probe_key": CProbeKey,
    "sock_state": CSockState,
    "splice_peer": CSplicePeer,
    "splice_control": CSpliceControl,
    "msg_key": CMsgKey,
    "msg_flow": CMsgFlow,
    "fastpath_counters": CFastpathCounters,
}


@dataclass(frozen=True)
class MapSpec:
    """One map of bpf/maps.h.

    kind: bcc's map type name ("hash", "lru_hash", "array", "sockmap", "sockhash",
    "sk_storage", "lpm_trie"); pinned: under the node's maps/ pin directory, by this name,
    and shared by the instances of one node (otherwise the instance's own)."""

    name: str
    kind: str
    key: type[ctypes._SimpleCData] | type[ctypes.Structure]
    value: type[ctypes._SimpleCData] | type[ctypes.Structure]
    pinned: bool


# Outbound capture and per-pod counters (bpf/capture.c).
PODS = MapSpec("pods", "hash", u64, CPodInfo, pinned=True)
ORIGDST_BY_COOKIE = MapSpec("origdst_by_cookie", "lru_hash", u64, COrigDst, pinned=True)
ORIGDST_BY_TUPLE = MapSpec("origdst_by_tuple", "lru_hash", CTupleKey, COrigDst, pinned=True)
POD_STATS = MapSpec("pod_stats", "hash", u32, CPodCounters, pinned=True)
CONNECT_DENIES = MapSpec("connect_denies", "hash", CDenyKey, u32, pinned=True)
POLICY_DENIALS = MapSpec("policy_denials", "array", u32, u64, pinned=True)
COUNTED_SOCKETS = MapSpec("counted_sockets", "lru_hash", u64, u32, pinned=True)
SOCK_STATES = MapSpec("sock_states", "sk_storage", ctypes.c_int32, CSockState, pinned=False)
FASTPATH_STATS = MapSpec("fastpath_stats", "array", u32, CFastpathCounters, pinned=True)
# Inbound capture (bpf/inbound.c).  The sockmap's values are listener socket fds.
INBOUND_LISTENERS = MapSpec("inbound_listeners", "sockmap", u32, u32, pinned=True)
INBOUND_IPS = MapSpec("inbound_ips", "hash", CIpKey, u32, pinned=True)
PROXY_DIALS = MapSpec("proxy_dials", "lru_hash", CDialKey, u32, pinned=True)
PROBE_SOURCES = MapSpec("probe_sources", "lpm_trie", CProbeKey, u32, pinned=True)
# Kernel splice (bpf/splice.c).  Sockhash values are socket fds.
SPLICE_SOCKETS = MapSpec("np_splice_sockets", "sockhash", u64, ctypes.c_int32, pinned=False)
SPLICE_FLOWS = MapSpec("splice_flows", "hash", u64, CSplicePeer, pinned=False)
SPLICE_CONTROL = MapSpec("splice_control", "hash", u64, CSpliceControl, pinned=False)
# The sk_msg fast path (bpf/redirect.c).
MSG_SOCKETS = MapSpec("np_msg_sockets", "sockhash", CMsgKey, ctypes.c_int32, pinned=False)
MSG_FLOWS = MapSpec("np_msg_flows", "lru_hash", CMsgKey, CMsgFlow, pinned=False)
MSG_PROXY_READ = MapSpec("np_msg_proxy_read", "lru_hash", u64, u64, pinned=False)
MSG_SETTINGS = MapSpec("np_msg_settings", "array", ctypes.c_int32, u32, pinned=False)

MAPS: tuple[MapSpec, ...] = (
    PODS, ORIGDST_BY_COOKIE, ORIGDST_BY_TUPLE, POD_STATS, CONNECT_DENIES, POLICY_DENIALS,
    COUNTED_SOCKETS, SOCK_STATES, FASTPATH_STATS,
    INBOUND_LISTENERS, INBOUND_IPS, PROXY_DIALS, PROBE_SOURCES,
    SPLICE_SOCKETS, SPLICE_FLOWS, SPLICE_CONTROL,
    MSG_SOCKETS, MSG_FLOWS, MSG_PROXY_READ, MSG_SETTINGS,
)


def map_fd(bpf: Any, spec: MapSpec) -> int:
    """A map's fd in a compiled bcc.BPF (where bcc runs: the loading child, preflight)."""
    import bcc  # Debian's python3-bpfcc; imported late so unit tests need no bcc

    fd = int(bcc.lib.bpf_table_fd(bpf.module, spec.name.encode()))
    if fd < 0:
        raise KeyError(f"the compiled programs have no map {spec.name!r}")
    return fd


class ContractMismatch(RuntimeError):
    """The compiled programs' maps differ from this module's view of bpf/maps.h."""


def describe(ctype: Any) -> Any:
    """A layout as comparable data: a scalar's size and signedness, or a struct's
    fields in order with their offsets, types and the struct's size."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return ["array", describe(ctype._type_), ctype._length_]
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        return ["struct", ctypes.sizeof(ctype),
                [[name, getattr(ctype, name).offset, describe(t)] for name, t in ctype._fields_]]
    signed = ctype(-1).value < 0
    return ["s" if signed else "u", ctypes.sizeof(ctype)]


def check_compiled(bpf: Any) -> None:
    """Raise ContractMismatch unless the compiled programs have exactly the maps of MAPS,
    with keys and values laid out as here (bcc's own description of each map's types,
    compiled from bpf/maps.h)."""
    import bcc

    lib, module = bcc.lib, bpf.module
    # bcc's Python binding declares neither (libbcc's bcc_common.h does).
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    compiled = {lib.bpf_table_name(module, i).decode() for i in range(lib.bpf_num_tables(module))}
    problems = []
    if compiled != {spec.name for spec in MAPS}:
        problems.append(f"maps compiled {sorted(compiled)}, "
                        f"contract {sorted(spec.name for spec in MAPS)}")
    for spec in MAPS:
        if spec.name not in compiled:
            continue
        name = spec.name.encode()
        for what, ours, desc in (("key", spec.key, lib.bpf_table_key_desc(module, name)),
                                 ("value", spec.value, lib.bpf_table_leaf_desc(module, name))):
            theirs = bcc.BPF._decode_table_type(json.loads(desc.decode()))
            if describe(theirs) != describe(ours):
                problems.append(f"{spec.name} {what}: compiled {describe(theirs)}, "
                                f"contract {describe(ours)}")
    if problems:
        raise ContractMismatch("bpf/maps.h and nodeproxy/capture/contract.py disagree: "
                               + "; ".join(problems))


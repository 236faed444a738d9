"""Peer authentication: which inbound connections must arrive over mTLS (Istio's rules).

For a workload and port the effective mode is, first that is set (not UNSET):

1. the port's entry in ``portLevelMtls`` of the workload-selector policy,
2. that policy's ``mode``,
3. the namespace-wide policy's mode (namespace set, no selector),
4. the mesh-wide policy's mode (no namespace, no selector),
5. PERMISSIVE.

The workload-selector policy is the first one in the file that selects the workload among
those of its namespace, else the first mesh-wide one with a selector that does (Istio picks
the oldest; a file has an order instead).  STRICT refuses plaintext, except from the
configured probe sources (kubelet probes come from the node, never over mTLS).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from nodeproxy.config.model import NodeConfig, PeerAuthentication, Workload
from nodeproxy.policy.authorization import (
    CACHE_LIMIT,
    DestinationWorkload,
    IPAddress,
    IPNetwork,
    ScopeKey,
    plain_ip,
    selects,
)

Mode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
DEFAULT_MODE: Mode = "PERMISSIVE"


@dataclass(frozen=True)
class _Resolved:
    """The effective modes of one (namespace, labels): a default and per-port overrides."""

    mode: Mode
    ports: Mapping[int, Mode]


def _first_set(*modes: str | None) -> Mode:
    for mode in modes:
        if mode is not None and mode != "UNSET":
            return mode  # type: ignore[return-value]
    return DEFAULT_MODE


class PeerAuthenticator:
    """Effective mTLS mode per workload and port for one configuration.  Pure; cheap per call."""

    def __init__(self, config: NodeConfig | Sequence[PeerAuthentication],
                 workloads: Iterable[Workload] | None = None) -> None:
        """Index the policies; precompute modes for workloads (default: the config's)."""
        if isinstance(config, NodeConfig):
            policies: Sequence[PeerAuthentication] = config.peer_authentications
            workloads = config.workloads if workloads is None else workloads
        else:
            policies = config
        self._namespaced_selectors = [p for p in policies if p.namespace and p.selector]
        self._mesh_selectors = [p for p in policies if not p.namespace and p.selector]
        self._namespace_wide: dict[str, PeerAuthentication] = {}
        self._mesh_wide: PeerAuthentication | None = None
        for p in policies:
            if p.selector is None and p.namespace:
                self._namespace_wide.setdefault(p.namespace, p)
            elif p.selector is None and self._mesh_wide is None:
                self._mesh_wide = p
        self._cache: dict[ScopeKey, _Resolved] = {}
        for w in workloads or ():
            self._resolved(DestinationWorkload.of(w))

    def mode_for(self, dest: DestinationWorkload, port: int) -> Mode:
        resolved = self._resolved(dest)
        return resolved.ports.get(port, resolved.mode)

    def accepts_plaintext(self, dest: DestinationWorkload, port: int, source_ip: IPAddress,
                          probe_sources: Sequence[IPNetwork | IPAddress]) -> bool:
        """False only under STRICT for a source that is not a probe source."""
        if self.mode_for(dest, port) != "STRICT":
            return True
        ip = plain_ip(source_ip)
        return any(ip in _as_network(p) for p in probe_sources)

    def workload_policy(self, dest: DestinationWorkload) -> PeerAuthentication | None:
        """The selector policy that governs dest, if any (namespaced ones first)."""
        for candidates in (self._namespaced_selectors, self._mesh_selectors):
            for p in candidates:
                if selects(p.namespace, p.selector, dest.namespace, dest.labels):
                    return p
        return None

    def _resolved(self, dest: DestinationWorkload) -> _Resolved:
        key = dest.scope_key
        resolved = self._cache.get(key)
        if resolved is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            resolved = self._resolve(dest)
            self._cache[key] = resolved
        return resolved

    def _resolve(self, dest: DestinationWorkload) -> _Resolved:
        namespace_wide = self._namespace_wide.get(dest.namespace)
        inherited = _first_set(namespace_wide.mode if namespace_wide else None,
                               self._mesh_wide.mode if self._mesh_wide else None)
        workload = self.workload_policy(dest)
        if workload is None:
            return _Resolved(inherited, {})
        mode = _first_set(workload.mode, inherited)
        ports = {port: _first_set(m, mode) for port, m in workload.port_level_mtls.items()}
        return _Resolved(mode, ports)


def _as_network(value: IPNetwork | IPAddress) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return ipaddress.ip_network(value)

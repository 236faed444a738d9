"""What a new node policy changes, compared with the one in force.

Pure functions: the daemon applies the result.  Sections that configure the process
itself (node, admin, capture, proxy, tunnel, identity, discovery, mesh.trustDomain,
limits.openFiles, limits.reservedFiles) take
effect only on restart, so a reload that changes them is refused whole with a message
naming them; everything else (workloads, services, the outbound policy, peer
authentication, authorization, probe sources) is applied live.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeproxy.config.model import NodeConfig, Workload

RESTART_ONLY = ("node", "admin", "capture", "proxy", "tunnel", "identity", "discovery")


@dataclass(frozen=True)
class WorkloadChanges:
    added: tuple[Workload, ...]
    removed: tuple[Workload, ...]
    changed: tuple[Workload, ...]  # the new version of a pod whose settings changed


def restart_only_changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """YAML names of the sections that differ but cannot change while running."""
    changed = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if old.mesh.trust_domain != new.mesh.trust_domain:
        changed.append("mesh.trustDomain")
    # The open-file limit and its reserve are set once, at start; the caps are live.
    if old.limits.open_files != new.limits.open_files:
        changed.append("limits.openFiles")
    if old.limits.reserved_files != new.limits.reserved_files:
        changed.append("limits.reservedFiles")
    return changed


def local_workload_changes(old: NodeConfig, new: NodeConfig) -> WorkloadChanges:
    before = {w.key: w for w in old.local_workloads()}
    after = {w.key: w for w in new.local_workloads()}
    return WorkloadChanges(
        added=tuple(w for key, w in after.items() if key not in before),
        removed=tuple(w for key, w in before.items() if key not in after),
        changed=tuple(w for key, w in after.items() if key in before and before[key] != w),
    )

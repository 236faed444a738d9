"""What discovery knows, as one immutable snapshot, and how it combines with the node YAML.

Precedence: the node YAML is the source of policy and wins on conflicts.

- A workload or service in the YAML with the same ``namespace/name`` as a discovered one
  replaces it; so does a YAML workload that holds a discovered pod's IP, and a YAML
  service that holds a discovered service's VIP (the discovered object is dropped whole).
- Everything else discovered adds to the YAML (``DiscoveredState.extras``).

Opt-in and opt-out (Istio ambient's labels, and nodeproxy's own):

- a pod labelled ``istio.io/dataplane-mode=none`` or ``nodeproxy.io/dataplane-mode=none``
  is not meshed, whatever its namespace says;
- otherwise a pod is meshed when it, or its namespace, is labelled
  ``istio.io/dataplane-mode=ambient`` or ``nodeproxy.io/dataplane-mode=ambient``;
- anything else is not meshed.

Only meshed pods become mesh workloads (``DiscoveredState.workloads``): a destination that
is a known workload on another node is reached over HBONE, so a pod outside the mesh must
stay unknown (the proxy then dials it directly, as it does any endpoint that is not a
workload).  ``DiscoveredState.pods`` keeps every pod, meshed or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nodeproxy.config.model import NodeConfig, Service, Workload

DATAPLANE_MODE_LABELS = ("istio.io/dataplane-mode", "nodeproxy.io/dataplane-mode")
MODE_AMBIENT = "ambient"
MODE_NONE = "none"


def is_meshed(namespace_labels: Mapping[str, str] | None, pod_labels: Mapping[str, str]) -> bool:
    """The opt-in/opt-out rule of the module docstring."""
    pod_modes = {pod_labels.get(k) for k in DATAPLANE_MODE_LABELS}
    if MODE_NONE in pod_modes:
        return False
    if MODE_AMBIENT in pod_modes:
        return True
    ns = namespace_labels or {}
    return any(ns.get(k) == MODE_AMBIENT for k in DATAPLANE_MODE_LABELS)


def _frozen(mapping: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(sorted(mapping.items())))


@dataclass(frozen=True)
class DiscoveredState:
    """One snapshot of the API caches; ``version`` counts snapshots (1 is the first sync)."""

    version: int
    pods: Mapping[str, Workload]  # every pod with an IP, meshed or not, by namespace/name
    services: Mapping[str, Service]  # by namespace/name
    namespace_labels: Mapping[str, Mapping[str, str]]  # namespace -> labels
    workloads: Mapping[str, Workload] = field(init=False)  # the meshed pods

    def __post_init__(self) -> None:
        object.__setattr__(self, "pods", _frozen(self.pods))
        object.__setattr__(self, "services", _frozen(self.services))
        object.__setattr__(self, "namespace_labels", MappingProxyType(
            {ns: MappingProxyType(dict(labels))
             for ns, labels in sorted(self.namespace_labels.items())}))
        object.__setattr__(self, "workloads", MappingProxyType(
            {k: w for k, w in self.pods.items() if self.is_meshed(w.namespace, w.labels)}))

    @classmethod
    def build(cls, version: int, pods: Iterable[Workload], services: Iterable[Service],
              namespace_labels: Mapping[str, Mapping[str, str]]) -> DiscoveredState:
        return cls(version=version, pods={w.key: w for w in pods},
                   services={s.key: s for s in services}, namespace_labels=namespace_labels)

    def is_meshed(self, pod_namespace: str, pod_labels: Mapping[str, str]) -> bool:
        """Whether a pod of this namespace with these labels belongs in the mesh."""
        return is_meshed(self.namespace_labels.get(pod_namespace), pod_labels)

    def local_workloads(self, node: str) -> tuple[Workload, ...]:
        """The meshed pods the API places on this node."""
        return tuple(w for w in self.workloads.values() if w.node == node)

    def extras(self, config: NodeConfig) -> tuple[tuple[Workload, ...], tuple[Service, ...]]:
        """What discovery adds to the YAML: (meshed workloads, services), YAML winning.

        See the module docstring for the precedence.  Both tuples are sorted by key.
        """
        yaml_workloads = {w.key for w in config.workloads}
        yaml_ips = {ip for w in config.workloads for ip in w.ips}
        workloads = tuple(
            w for key, w in self.workloads.items()
            if key not in yaml_workloads and not yaml_ips.intersection(w.ips))
        yaml_services = {s.key for s in config.services}
        yaml_vips = {vip for s in config.services for vip in s.vips}
        services = tuple(
            s for key, s in self.services.items()
            if key not in yaml_services and not yaml_vips.intersection(s.vips))
        return workloads, services

"""The mesh state as one immutable snapshot: a pure function of what this node knows.

Inputs (MeshInputs): the node config in force, what discovery last saw, the pods enrolled
on this node (from the config and at run time, with their kernel pod ids) and the pods on
other nodes registered at run time.  Output (MeshSnapshot): everything the data path
decides from — where a connection goes (DestinationTable), who may reach a local pod
(Admitter), and which connects the kernel refuses (CompiledDenies) — built together, so
they always describe the same state.

Precedence, as nodeproxy.discovery.state says: the node YAML wins over discovery; a pod
enrolled here replaces a discovered copy of itself; pods enrolled at run time come before
pods registered on other nodes under the same name (the later one wins).

No I/O and no clock: the same inputs give an equal snapshot.  Two arguments carry
node-lifetime state through rebuilds: the admission counters and the round-robin
positions (a new table keeps balancing where the last one stopped).
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeproxy.config.model import NodeConfig, Workload
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.mesh.destinations import DestinationTable
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.policy.admission import AdmissionMetrics, Admitter
from nodeproxy.policy.kernel_rules import CompiledDenies, compile_connect_denies

CONFIG = "config"  # LocalPod.source of a pod the node YAML lists
RUNTIME = "runtime"  # ... of a pod enrolled through the control socket


@dataclass(frozen=True)
class LocalPod:
    """A pod enrolled on this node, as the mesh state needs it (not its sockets)."""

    pod_id: int  # its id in the kernel maps (the deny map's source key)
    workload: Workload
    source: str  # CONFIG or RUNTIME


@dataclass(frozen=True)
class MeshInputs:
    """Everything the mesh state is a function of."""

    config: NodeConfig
    discovered: DiscoveredState | None = None  # None: discovery off or not synced yet
    local_pods: tuple[LocalPod, ...] = ()
    remote_workloads: tuple[Workload, ...] = ()  # registered at run time, other nodes


@dataclass(frozen=True)
class MeshSnapshot:
    """One consistent view of the mesh; replaced whole, never changed."""

    inputs: MeshInputs
    # The node YAML plus the discovered services it does not override: what routes,
    # clusters and traffic policies are built from.
    config: NodeConfig
    table: DestinationTable
    admitter: Admitter  # built from the YAML's policies (discovery brings none)
    denies: CompiledDenies  # connect()-time denies for the enrolled pods, by kernel pod id
    local_pods: frozenset[str]  # namespace/name of every pod enrolled here

    @property
    def deny_policy_names(self) -> list[str]:
        """The policy of each kernel deny index (for the per-policy denial counter)."""
        return self.denies.policy_names


def build_snapshot(inputs: MeshInputs, *, admission_metrics: AdmissionMetrics,
                   balancer: PortRoundRobin) -> MeshSnapshot:
    """The mesh state for these inputs (see the module docstring)."""
    config = inputs.config
    discovered_workloads, discovered_services = (
        inputs.discovered.extras(config) if inputs.discovered is not None else ((), ()))
    # Discovered pods first: a pod enrolled here (with its netns) replaces its copy.
    runtime = discovered_workloads + tuple(
        p.workload for p in inputs.local_pods if p.source == RUNTIME
    ) + inputs.remote_workloads
    effective = config
    if discovered_services:
        effective = config.model_copy(
            update={"services": [*config.services, *discovered_services]})
    table = DestinationTable(effective, runtime, balancer)
    workloads = {w.key: w for w in config.workloads}
    workloads.update({w.key: w for w in runtime})
    admitter = Admitter(config, admission_metrics)
    denies = compile_connect_denies(
        config, admitter.authorizer, [(p.pod_id, p.workload) for p in inputs.local_pods],
        list(workloads.values()), effective.services)
    return MeshSnapshot(inputs=inputs, config=effective, table=table, admitter=admitter,
                        denies=denies,
                        local_pods=frozenset(p.workload.key for p in inputs.local_pods))

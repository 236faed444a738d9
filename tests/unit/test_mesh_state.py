"""The mesh state as a pure function: what a config change, a discovery update and a
runtime enrollment each produce (nodeproxy/mesh/snapshot.py), and the holder that swaps it."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import NodeConfig, Service, Workload
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.mesh.destinations import ResolutionKind
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.mesh.snapshot import (
    CONFIG,
    RUNTIME,
    LocalPod,
    MeshInputs,
    MeshSnapshot,
    build_snapshot,
)
from nodeproxy.policy.admission import AdmissionMetrics

NODE = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
workloads:
  - {name: client, node: n1, netns: /run/netns/c, cgroup: /sys/fs/cgroup/c,
     ips: [10.244.1.2], labels: {app: client}}
  - {name: db-1, node: n2, ips: [10.244.2.9], labels: {app: db}, serviceAccount: db}
services:
  - name: db
    vips: [10.96.0.9]
    ports: [{port: 5432}]
    selector: {app: db}
"""

DENY_DB = """
authorizationPolicies:
  - name: no-db-from-pods
    action: DENY
    selector: {app: db}
    rules:
      - from: [{source: {ipBlocks: ["10.244.0.0/16"]}}]
        to: [{operation: {ports: ["5432"]}}]
"""
POLICY = "*/no-db-from-pods"  # a policy without a namespace is mesh-wide


def config(extra: str = "") -> NodeConfig:
    return parse_config(NODE + extra).config


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def workload(**fields: object) -> Workload:
    return Workload.model_validate(fields)


def build(inputs: MeshInputs, balancer: PortRoundRobin | None = None) -> MeshSnapshot:
    return build_snapshot(inputs, admission_metrics=AdmissionMetrics(CollectorRegistry()),
                          balancer=balancer or PortRoundRobin())


def client(cfg: NodeConfig) -> LocalPod:
    return LocalPod(1, next(w for w in cfg.workloads if w.name == "client"), CONFIG)


def denies(snapshot: MeshSnapshot) -> set[tuple[int, str, int, str]]:
    names = snapshot.deny_policy_names
    return {(d.source_pod_id, str(d.ip), d.port, names[d.policy])
            for d in snapshot.denies.denies}


def backends(snapshot: MeshSnapshot, vip: str, port: int) -> set[str]:
    entry = snapshot.table.services[(ip(vip), port)]
    return {str(b.address) for b in entry.backends(4)}


# -- the node config alone -----------------------------------------------------------------


def test_config_alone_gives_its_destinations_and_no_kernel_denies() -> None:
    snapshot = build(MeshInputs(config(DENY_DB)))
    assert backends(snapshot, "10.96.0.9", 5432) == {"10.244.2.9"}
    assert snapshot.table.resolve(ip("10.244.2.9"), 5432).verdict is ResolutionKind.POD
    # The policy is in force for the proxy, but no pod is enrolled to compile it for.
    assert snapshot.admitter.authorizer.policies
    assert denies(snapshot) == set() and snapshot.local_pods == frozenset()


def test_an_enrolled_pod_gets_the_identity_free_denies_of_its_destinations() -> None:
    cfg = config(DENY_DB)
    snapshot = build(MeshInputs(cfg, local_pods=(client(cfg),)))
    # The pod's connects to db-1 and to the VIP whose every endpoint is db-1 fail in the
    # kernel; nothing else does.
    assert denies(snapshot) == {(1, "10.244.2.9", 5432, POLICY),
                                (1, "10.96.0.9", 5432, POLICY)}
    assert snapshot.local_pods == {"default/client"}


# -- a config change (reload) ---------------------------------------------------------------


def test_a_config_change_rebuilds_destinations_admission_and_denies_together() -> None:
    before_cfg = config(DENY_DB)
    pods = (client(before_cfg),)
    before = build(MeshInputs(before_cfg, local_pods=pods))
    # The new file drops the policy and moves db to port 6432.
    after_cfg = parse_config(NODE.replace("{port: 5432}", "{port: 6432}")).config
    after = build(MeshInputs(after_cfg, local_pods=pods))
    assert denies(after) == set() and after.deny_policy_names == []
    assert not after.admitter.authorizer.policies
    assert (ip("10.96.0.9"), 5432) not in after.table.services
    assert backends(after, "10.96.0.9", 6432) == {"10.244.2.9"}
    # The snapshot in force before is untouched by the new one.
    assert denies(before) and (ip("10.96.0.9"), 5432) in before.table.services
    assert before.admitter is not after.admitter


# -- a runtime enrollment ---------------------------------------------------------------------


def test_a_runtime_enrollment_adds_a_destination_a_backend_and_a_deny_source() -> None:
    cfg = config(DENY_DB)
    db2 = workload(name="db-2", node="n1", netns="/run/netns/d", cgroup="/sys/fs/cgroup/d",
                   ips=["10.244.1.3"], labels={"app": "db"})
    before = build(MeshInputs(cfg, local_pods=(client(cfg),)))
    after = build(MeshInputs(cfg, local_pods=(client(cfg), LocalPod(2, db2, RUNTIME))))
    assert before.table.resolve(ip("10.244.1.3"), 5432).verdict is ResolutionKind.PASSTHROUGH
    assert after.table.resolve(ip("10.244.1.3"), 5432).verdict is ResolutionKind.POD
    assert backends(after, "10.96.0.9", 5432) == {"10.244.2.9", "10.244.1.3"}
    # The new pod is a destination the client may not reach, and a source too (its own
    # address is in the policy's ipBlocks).
    assert {(1, "10.244.1.3", 5432, POLICY),
            (2, "10.244.2.9", 5432, POLICY),
            (2, "10.96.0.9", 5432, POLICY)} <= denies(after)
    assert after.local_pods == {"default/client", "default/db-2"}


def test_a_pod_registered_for_another_node_is_a_destination_only() -> None:
    cfg = config(DENY_DB)
    db3 = workload(name="db-3", node="n2", ips=["10.244.2.10"], labels={"app": "db"})
    snapshot = build(MeshInputs(cfg, local_pods=(client(cfg),), remote_workloads=(db3,)))
    ref = snapshot.table.resolve(ip("10.244.2.10"), 5432).backend.workload  # type: ignore[union-attr]
    assert ref is not None and ref.node == "n2"
    assert backends(snapshot, "10.96.0.9", 5432) == {"10.244.2.9", "10.244.2.10"}
    assert {d[0] for d in denies(snapshot)} == {1}  # never a deny source
    assert snapshot.local_pods == {"default/client"}


# -- a discovery update ------------------------------------------------------------------------

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def discovered(version: int, *pods: Workload, services: tuple[Service, ...] = ()
               ) -> DiscoveredState:
    return DiscoveredState.build(version, pods, services, {"shop": AMBIENT})


def service(**fields: object) -> Service:
    return Service.model_validate(fields)


def test_a_discovery_update_adds_meshed_pods_and_services_the_yaml_lacks() -> None:
    cfg = config()
    api = workload(name="api-1", namespace="shop", node="n2", ips=["10.244.2.20"],
                   labels={"app": "api"}, serviceAccount="api")
    plain = workload(name="plain", namespace="other", node="n2", ips=["10.244.2.21"])
    state = discovered(
        3, api, plain,
        services=(service(name="api", namespace="shop", vips=["10.96.0.20"],
                          ports=[{"port": 80, "targetPort": 8080}], selector={"app": "api"}),
                  # Same name as the YAML's service: the YAML's stays.
                  service(name="db", vips=["10.96.0.99"], ports=[{"port": 1}],
                          selector={"app": "api"})))
    before = build(MeshInputs(cfg))
    after = build(MeshInputs(cfg, discovered=state))
    assert (ip("10.96.0.20"), 80) not in before.table.services
    decision = after.table.resolve(ip("10.96.0.20"), 80)
    assert decision.verdict is ResolutionKind.SERVICE and decision.backend is not None
    assert (str(decision.backend.address), decision.backend.port) == ("10.244.2.20", 8080)
    assert after.table.resolve(ip("10.244.2.21"), 80).verdict is ResolutionKind.PASSTHROUGH
    assert (ip("10.96.0.99"), 1) not in after.table.services
    # What routes and clusters are built from carries the discovered service; the node
    # file in the inputs does not change.
    assert [s.key for s in after.config.services] == ["default/db", "shop/api"]
    assert [s.key for s in after.inputs.config.services] == ["default/db"]


def test_a_pod_added_to_the_yaml_replaces_its_discovered_copy_at_once() -> None:
    """Precedence is applied when the snapshot is built, so a reload that adds a pod to
    the YAML wins over the discovered copy without waiting for the next API event."""
    api = workload(name="api-1", namespace="shop", node="n2", ips=["10.244.2.20"],
                   labels={"app": "api"}, serviceAccount="from-api")
    state = discovered(1, api)
    before = build(MeshInputs(config(), discovered=state))
    assert before.table.pods[ip("10.244.2.20")].service_account == "from-api"
    reloaded = parse_config(NODE.replace(
        "services:", "  - {name: api-yaml, namespace: shop, node: n2, ips: [10.244.2.20],\n"
        "     serviceAccount: from-yaml}\nservices:")).config
    after = build(MeshInputs(reloaded, discovered=state))
    assert after.table.pods[ip("10.244.2.20")].service_account == "from-yaml"
    assert "shop/api-1" not in after.table.workloads


# -- purity -------------------------------------------------------------------------------------


def test_the_same_inputs_give_the_same_snapshot_and_it_cannot_be_changed() -> None:
    cfg = config(DENY_DB)
    inputs = MeshInputs(cfg, local_pods=(client(cfg),))
    one, two = build(inputs), build(inputs)
    assert one.denies == two.denies and one.local_pods == two.local_pods
    assert one.table.services == two.table.services and one.table.pods == two.table.pods
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.table = two.table  # type: ignore[misc]


def test_round_robin_continues_across_snapshots() -> None:
    """A rebuild (any pod enrolling anywhere on the node) must not send every client back
    to the first endpoint."""
    cfg = parse_config(NODE.replace(
        "services:", "  - {name: db-2, node: n2, ips: [10.244.2.8], labels: {app: db}}\n"
        "services:")).config
    balancer = PortRoundRobin()
    picks = []
    for _ in range(4):
        snapshot = build(MeshInputs(cfg), balancer)
        picks.append(str(snapshot.table.resolve(ip("10.96.0.9"), 5432).backend.address))  # type: ignore[union-attr]
    assert sorted(picks) == ["10.244.2.8", "10.244.2.8", "10.244.2.9", "10.244.2.9"]
    assert picks[0] != picks[1]


# -- the holder ---------------------------------------------------------------------------------


def test_the_holder_swaps_in_one_step_then_tells_its_watchers_in_order() -> None:
    cfg = config(DENY_DB)
    first = build(MeshInputs(cfg))
    second = build(MeshInputs(cfg, local_pods=(client(cfg),)))
    holder = MeshState(first)
    seen: list[tuple[str, MeshSnapshot, MeshSnapshot]] = []
    holder.watch(lambda s: seen.append(("http", s, holder.current)))
    holder.watch(lambda s: seen.append(("kernel", s, holder.current)))
    assert holder.current is first and seen == []  # watching calls nothing yet
    holder.replace(second)
    assert holder.current is second
    # Each watcher is handed the new snapshot, and reading the holder already gives it.
    assert seen == [("http", second, second), ("kernel", second, second)]


def test_after_a_handover_only_the_watchers_that_leave_the_kernel_alone_are_told() -> None:
    """The old instance of an upgrade still follows new snapshots (its draining
    connections are judged again) but writes nothing of the node's kernel state."""
    cfg = config(DENY_DB)
    first, second, third = (build(MeshInputs(cfg)) for _ in range(3))
    holder = MeshState(first)
    seen: list[tuple[str, MeshSnapshot]] = []
    holder.watch(lambda s: seen.append(("pools", s)))
    holder.watch(lambda s: seen.append(("denies", s)), writes_kernel=True)
    holder.watch(lambda s: seen.append(("revocation", s)))
    holder.watch(lambda s: seen.append(("probe rules", s)), writes_kernel=True)
    holder.replace(second)
    assert seen == [("pools", second), ("denies", second), ("revocation", second),
                    ("probe rules", second)]
    seen.clear()
    holder.hand_kernel_over()
    holder.replace(third)
    assert holder.current is third
    assert seen == [("pools", third), ("revocation", third)]

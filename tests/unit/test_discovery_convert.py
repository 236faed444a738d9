"""Kubernetes objects -> node model, the opt-in/opt-out rule, and the YAML's precedence."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import pytest

from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import ServiceEndpoint
from nodeproxy.discovery.convert import (
    ConversionError,
    app_protocol,
    endpoints_by_port,
    namespace_labels,
    object_key,
    pod_to_workload,
    service_to_service,
    target_port,
    trim,
)
from nodeproxy.discovery.state import DiscoveredState, is_meshed
from nodeproxy.mesh.destinations import DestinationTable, ResolutionKind
from tests.integration.fake_kube_api import (
    endpoint_slice,
    namespace,
    pod,
    service,
    slice_endpoint,
)


def ip(s: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(s)


# --- pods ---------------------------------------------------------------------------------

def test_pod_becomes_a_workload():
    w = pod_to_workload(pod("web-1", "shop", ips=["10.244.1.5", "fd00::1:5"], node="node-b",
                            sa="web", labels={"app": "web", "app.kubernetes.io/name": "web"}))
    assert w is not None
    assert (w.name, w.namespace, w.service_account, w.node) == ("web-1", "shop", "web",
                                                                  "node-b")
    assert w.labels == {"app": "web", "app.kubernetes.io/name": "web"}
    assert w.ips == [ip("10.244.1.5"), ip("fd00::1:5")]
    assert w.netns is None and w.cgroup is None


def test_pod_ip_falls_back_to_pod_ip_and_service_account_to_default():
    obj = pod("web-1")
    del obj["status"]["podIPs"]
    del obj["spec"]["serviceAccountName"]
    w = pod_to_workload(obj)
    assert w is not None and w.ips == [ip("10.244.1.5")] and w.service_account == "default"


@pytest.mark.parametrize("obj", [
    pod("no-ip-yet", ip=None, phase="Pending"),
    pod("done", phase="Succeeded"),
    pod("crashed", phase="Failed"),
    pod("host", host_network=True),
    pod("unscheduled", node=""),
], ids=["no-ip", "succeeded", "failed", "host-network", "no-node"])
def test_pods_the_mesh_does_not_track_are_skipped(obj):
    assert pod_to_workload(obj) is None


def test_pending_pod_with_an_ip_is_kept():
    assert pod_to_workload(pod("starting", phase="Pending")) is not None


def test_pod_the_model_cannot_hold_raises_conversion_error():
    with pytest.raises(ConversionError, match="pod default/web.1"):
        pod_to_workload(pod("web.1"))  # a DNS subdomain: valid in Kubernetes, not a label
    with pytest.raises(ConversionError, match="metadata.name"):
        pod_to_workload({"metadata": {}})


def test_namespace_labels_keys_and_trim():
    assert namespace_labels(namespace("shop", {"istio.io/dataplane-mode": "ambient"})) == {
        "kubernetes.io/metadata.name": "shop", "istio.io/dataplane-mode": "ambient"}
    assert object_key(pod("a", "b")) == "b/a"
    assert object_key(namespace("b")) == "b"
    assert object_key({"metadata": {}}) is None
    obj = pod("a")
    obj["metadata"]["managedFields"] = [{"manager": "kubelet"}]
    obj["metadata"]["annotations"] = {"big": "x" * 1000}
    assert "managedFields" not in trim(obj)["metadata"]
    assert "annotations" not in trim(obj)["metadata"]
    assert "managedFields" in obj["metadata"]  # the input is not changed


# --- services and endpointslices ----------------------------------------------------------

def test_service_with_numeric_target_port_and_ready_endpoints():
    svc = service("web", "shop", vips=["10.96.0.10", "fd00:96::10"], selector={"app": "web"})
    slices = [
        endpoint_slice("web-v4", "web", "shop", endpoints=[
            slice_endpoint("10.244.1.5", "node-a"),
            slice_endpoint("10.244.2.5", "node-b", ready=None),  # nil means ready
            slice_endpoint("10.244.2.6", "node-b", ready=False),  # not ready: left out
        ]),
        endpoint_slice("web-v6", "web", "shop", address_type="IPv6",
                       endpoints=[slice_endpoint("fd00::1:5", "node-a")]),
        endpoint_slice("other", "db", "shop", endpoints=[slice_endpoint("10.244.9.9")]),
        endpoint_slice("web-elsewhere", "web", "prod", endpoints=[slice_endpoint("10.1.1.1")]),
    ]
    s = service_to_service(svc, slices)
    assert s is not None
    assert (s.key, s.vips) == ("shop/web", [ip("10.96.0.10"), ip("fd00:96::10")])
    assert [(p.port, p.target_port, p.name) for p in s.ports] == [(80, 8080, "http")]
    assert s.selector == {}  # the slices already applied the selector, with readiness
    assert s.endpoints == [
        ServiceEndpoint(address="10.244.1.5", port=8080, node="node-a", service_port=80),
        ServiceEndpoint(address="10.244.2.5", port=8080, node="node-b", service_port=80),
        ServiceEndpoint(address="fd00::1:5", port=8080, node="node-a", service_port=80),
    ]


def test_named_target_port_resolves_through_the_slices():
    ports = [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
             {"name": "admin", "port": 9000, "targetPort": "admin"}]
    one = [endpoint_slice("a", "web", ports=[{"name": "http", "port": 8080},
                                             {"name": "admin", "port": 9090}])]
    assert target_port(ports[0], one) == 8080
    assert target_port(ports[1], one) == 9090
    # Two slices disagree (pods name the port differently): no single target port ...
    two = one + [endpoint_slice("b", "web", ports=[{"name": "http", "port": 8081}])]
    assert target_port(ports[0], two) is None
    # ... but each slice's endpoints carry their own number.
    two[0]["endpoints"] = [slice_endpoint("10.244.1.5")]
    two[1]["endpoints"] = [slice_endpoint("10.244.1.6")]
    by_port = endpoints_by_port(ports, two)
    assert [(str(e.address), e.port) for e in by_port[80]] == [("10.244.1.5", 8080),
                                                                ("10.244.1.6", 8081)]
    assert [(str(e.address), e.port) for e in by_port[9000]] == [("10.244.1.5", 9090)]
    assert target_port({"port": 443}, []) == 443  # absent targetPort means the port


def test_no_slices_yet_and_unresolvable_named_port():
    svc = service("web", ports=[{"name": "http", "port": 80, "targetPort": "web"}])
    s = service_to_service(svc, [])
    assert s is not None
    assert s.endpoints == [] and s.ports[0].target_port is None and s.ports[0].backend_port == 80


def test_endpoints_dedup_fqdn_and_udp():
    ports = [{"name": "http", "port": 80, "targetPort": 8080},
             {"name": "dns", "port": 53, "protocol": "UDP"}]
    ep = [slice_endpoint("10.244.1.5")]
    slices = [endpoint_slice("a", "web", endpoints=ep),
              endpoint_slice("b", "web", endpoints=ep),  # the same endpoint while rebalancing
              endpoint_slice("c", "web", address_type="FQDN",
                             endpoints=[{"addresses": ["db.example.com"]}])]
    s = service_to_service(service("web", ports=ports), slices)
    assert s is not None
    assert [p.port for p in s.ports] == [80]  # UDP is not proxied
    assert s.endpoints == [ServiceEndpoint(address="10.244.1.5", port=8080, node="node-a",
                                    service_port=80)]


@pytest.mark.parametrize("obj", [
    service("headless", vips=[]),
    service("ext", type_="ExternalName"),
    service("udp-only", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
], ids=["headless", "external-name", "udp-only"])
def test_services_not_proxied_are_skipped(obj):
    assert service_to_service(obj, []) is None


def test_multi_port_service_endpoints_per_port():
    ports = [{"name": "http", "port": 80, "targetPort": 8080},
             {"name": "grpc", "port": 90, "targetPort": 9090}]
    slices = [endpoint_slice("a", "web", ports=[{"name": "http", "port": 8080},
                                                {"name": "grpc", "port": 9090}],
                             endpoints=[slice_endpoint("10.244.1.5")])]
    by_port = endpoints_by_port(ports, slices)
    assert [e.port for e in by_port[80]] == [8080]
    assert [e.port for e in by_port[90]] == [9090]


# --- opt-in / opt-out ---------------------------------------------------------------------

AMBIENT_NS = {"istio.io/dataplane-mode": "ambient"}


@pytest.mark.parametrize(("ns_labels", "pod_labels", "meshed"), [
    (AMBIENT_NS, {}, True),
    ({"nodeproxy.io/dataplane-mode": "ambient"}, {}, True),
    ({}, {"istio.io/dataplane-mode": "ambient"}, True),
    (None, {"nodeproxy.io/dataplane-mode": "ambient"}, True),
    (AMBIENT_NS, {"istio.io/dataplane-mode": "none"}, False),
    (AMBIENT_NS, {"nodeproxy.io/dataplane-mode": "none"}, False),
    ({}, {"istio.io/dataplane-mode": "ambient", "nodeproxy.io/dataplane-mode": "none"}, False),
    ({}, {}, False),
    (None, {"app": "web"}, False),
    ({"istio.io/dataplane-mode": "sidecar"}, {}, False),
    ({"istio-injection": "enabled"}, {}, False),
], ids=["ns-istio", "ns-nodeproxy", "pod-istio", "pod-nodeproxy-unknown-ns",
        "pod-istio-none-wins", "pod-nodeproxy-none-wins", "none-beats-ambient-on-pod",
        "nothing", "no-namespace", "other-mode", "sidecar-injection-is-not-ambient"])
def test_is_meshed(ns_labels, pod_labels, meshed):
    assert is_meshed(ns_labels, pod_labels) is meshed
    state = DiscoveredState.build(1, [], [], {"ns": ns_labels} if ns_labels is not None else {})
    assert state.is_meshed("ns", pod_labels) is meshed


def test_state_keeps_every_pod_but_only_meshed_ones_are_workloads():
    pods = [pod_to_workload(pod("a", "mesh", ip="10.244.1.1")),
            pod_to_workload(pod("b", "mesh", ip="10.244.1.2",
                                labels={"istio.io/dataplane-mode": "none"})),
            pod_to_workload(pod("c", "plain", ip="10.244.1.3")),
            pod_to_workload(pod("d", "plain", ip="10.244.2.4", node="node-b",
                                labels={"nodeproxy.io/dataplane-mode": "ambient"}))]
    state = DiscoveredState.build(3, [p for p in pods if p], [],
                                  {"mesh": AMBIENT_NS, "plain": {}})
    assert state.version == 3
    assert sorted(state.pods) == ["mesh/a", "mesh/b", "plain/c", "plain/d"]
    assert sorted(state.workloads) == ["mesh/a", "plain/d"]
    assert [w.key for w in state.local_workloads("node-a")] == ["mesh/a"]
    assert isinstance(state.workloads, MappingProxyType)
    with pytest.raises(TypeError):
        state.pods["x"] = pods[0]  # type: ignore[index]
    with pytest.raises(AttributeError):
        state.version = 4  # type: ignore[misc]


# --- precedence: the YAML wins ------------------------------------------------------------

YAML = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: node-a}
workloads:
  - {name: web-1, namespace: shop, node: node-b, ips: [10.244.2.1], labels: {app: web},
     serviceAccount: from-yaml}
  - {name: pinned, namespace: shop, node: node-b, ips: [10.244.2.99]}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
  - name: legacy
    namespace: shop
    vips: [10.96.0.50]
    ports: [{port: 80}]
    endpoints: [{address: 192.0.2.7, port: 80}]
"""


def discovered() -> DiscoveredState:
    pods = [
        pod("web-1", "shop", ip="10.244.9.1", sa="from-api", node="node-b"),  # YAML has it
        pod("web-2", "shop", ip="10.244.2.2", node="node-b", sa="web",
            labels={"app": "web"}),  # new: added
        pod("thief", "shop", ip="10.244.2.99", node="node-b"),  # holds a YAML pod's IP
        pod("outsider", "plain", ip="10.244.2.3", node="node-b"),  # not meshed
    ]
    services = [
        service_to_service(service("web", "shop", vips=["10.96.0.10"]), []),  # YAML has it
        service_to_service(service("squatter", "shop", vips=["10.96.0.50"]), []),  # YAML VIP
        service_to_service(service("api", "shop", vips=["10.96.0.20"]), [
            endpoint_slice("api-1", "api", "shop", endpoints=[
                slice_endpoint("10.244.2.2", "node-b"),
                slice_endpoint("10.244.2.3", "node-b")])]),
    ]
    return DiscoveredState.build(
        7, [w for w in map(pod_to_workload, pods) if w],
        [s for s in services if s], {"shop": AMBIENT_NS, "plain": {}})


def test_yaml_wins_and_discovered_objects_add_to_it():
    config = parse_config(YAML).config
    workloads, services = discovered().extras(config)
    assert [w.key for w in workloads] == ["shop/web-2"]
    assert [s.key for s in services] == ["shop/api"]


def test_extras_feed_the_destination_table():
    """How the daemon uses a snapshot: extra workloads as runtime ones, services appended."""
    config = parse_config(YAML).config
    workloads, services = discovered().extras(config)
    merged = config.model_copy(update={"services": [*config.services, *services]})
    table = DestinationTable(merged, workloads)
    d = table.resolve(ip("10.96.0.20"), 80)
    assert d.verdict is ResolutionKind.SERVICE and d.service == "api.shop.svc.cluster.local"
    backends = [table.resolve(ip("10.96.0.20"), 80).backend for _ in range(4)]
    picks = {(str(b.address), b.port, b.workload is not None) for b in backends if b}
    # The meshed pod is a workload (reached over HBONE); the unmeshed one a plain endpoint.
    assert picks == {("10.244.2.2", 8080, True), ("10.244.2.3", 8080, False)}
    ref = table.resolve(ip("10.244.2.2"), 8080).backend.workload  # type: ignore[union-attr]
    assert ref is not None and (ref.node, ref.service_account) == ("node-b", "web")
    assert table.resolve(ip("10.244.2.3"), 8080).verdict is ResolutionKind.PASSTHROUGH
    # The YAML's web service and pod are untouched by what the API said.
    assert table.resolve(ip("10.244.2.1"), 80).backend.workload.service_account == "from-yaml"  # type: ignore[union-attr]


def test_service_without_ready_endpoints_refuses_instead_of_passing_through():
    config = parse_config(YAML).config
    state = DiscoveredState.build(1, [], [service_to_service(
        service("down", "shop", vips=["10.96.0.30"]), [])], {})  # type: ignore[list-item]
    _, services = state.extras(config)
    table = DestinationTable(config.model_copy(update={"services": [*config.services,
                                                                    *services]}))
    assert table.resolve(ip("10.96.0.30"), 80).verdict is ResolutionKind.REFUSE


@pytest.mark.parametrize("port,expected", [
    ({"name": "http", "port": 80}, "http"),
    ({"name": "http-web", "port": 80}, "http"),
    ({"name": "grpc-api", "port": 9090}, "grpc"),
    ({"name": "http2", "port": 80}, "http2"),
    ({"name": "tcp-db", "port": 5432}, "tcp"),
    ({"name": "web", "port": 80}, None),              # no convention: sniffed
    ({"port": 80}, None),
    ({"name": "web", "port": 80, "appProtocol": "grpc"}, "grpc"),
    ({"name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c"}, "http2"),
    ({"name": "http", "port": 80, "appProtocol": "TCP"}, "tcp"),  # appProtocol wins
    ({"name": "mysql", "port": 3306, "appProtocol": "mysql"}, None),
])
def test_app_protocol_from_app_protocol_or_port_name(port, expected):
    assert app_protocol(port) == expected
    svc = service("web", "shop", vips=["10.96.0.10"], ports=[{**port, "protocol": "TCP"}])
    converted = service_to_service(svc, [])
    assert converted is not None and converted.ports[0].app_protocol == expected

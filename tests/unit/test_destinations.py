"""Endpoint selection: VIPs to endpoints, pod passthrough, outbound policy."""

from __future__ import annotations

import ipaddress
from collections import Counter

from nodeproxy.config.loader import parse_config
from nodeproxy.mesh.destinations import DestinationTable, ResolutionKind

DOC = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
mesh: {outboundPolicy: %s}
workloads:
  - {name: web-1, node: n1, netns: /run/netns/a, cgroup: /sys/fs/cgroup/a,
     ips: [10.244.1.2, "fd00::1:2"], labels: {app: web}}
  - {name: web-2, node: n2, ips: [10.244.2.2, "fd00::2:2"], labels: {app: web},
     serviceAccount: web}
  - {name: web-3, node: n2, ips: [10.244.2.3], labels: {app: web}}
  - {name: db-1, node: n2, ips: [10.244.2.9], labels: {app: db}}
  - {name: other-ns, namespace: prod, node: n2, ips: [10.244.2.10], labels: {app: web}}
services:
  - name: web
    vips: [10.96.0.10, "fd00:96::10"]
    ports: [{port: 80, targetPort: 8080}, {port: 443}]
    selector: {app: web}
  - name: empty
    vips: [10.96.0.11]
    ports: [{port: 80}]
    selector: {app: nothing}
  - name: external
    vips: [10.96.0.12]
    ports: [{port: 5432}]
    endpoints: [{address: 192.0.2.7, port: 5432}]
"""


def table(policy: str = "ALLOW_ANY") -> DestinationTable:
    return DestinationTable(parse_config(DOC % policy).config)


def ip(s: str):
    return ipaddress.ip_address(s)


def test_vip_round_robins_over_selected_endpoints_in_namespace():
    t = table()
    picks = [t.resolve(ip("10.96.0.10"), 80) for _ in range(9)]
    assert {p.verdict for p in picks} == {ResolutionKind.SERVICE}
    assert {p.service for p in picks} == {"web.default.svc.cluster.local"}
    counts = Counter(str(p.backend.address) for p in picks)
    # Three web pods in namespace default, each picked equally; prod's is not an endpoint.
    assert counts == {"10.244.1.2": 3, "10.244.2.2": 3, "10.244.2.3": 3}
    assert {p.backend.port for p in picks} == {8080}


def test_target_port_defaults_to_port():
    assert table().resolve(ip("10.96.0.10"), 443).backend.port == 443


def test_ipv6_vip_prefers_ipv6_endpoints():
    t = table()
    picks = {str(t.resolve(ip("fd00:96::10"), 80).backend.address) for _ in range(4)}
    assert picks == {"fd00::1:2", "fd00::2:2"}


def test_unknown_port_on_vip_is_not_a_service():
    d = table("REGISTRY_ONLY").resolve(ip("10.96.0.10"), 81)
    assert d.verdict is ResolutionKind.REFUSE


def test_service_without_endpoints_is_refused():
    d = table().resolve(ip("10.96.0.11"), 80)
    assert d.verdict is ResolutionKind.REFUSE and d.reason == "service has no endpoints"


def test_explicit_endpoints():
    d = table().resolve(ip("10.96.0.12"), 5432)
    assert (str(d.backend.address), d.backend.port, d.backend.workload) == ("192.0.2.7", 5432, None)


def test_pod_ip_passes_through_with_identity():
    d = table().resolve(ip("10.244.2.2"), 9000)
    assert d.verdict is ResolutionKind.POD
    assert (d.backend.workload.workload, d.backend.workload.service_account) == ("web", "web")
    assert d.backend.port == 9000


def test_unknown_destination_follows_outbound_policy():
    assert table("ALLOW_ANY").resolve(ip("203.0.113.5"), 443).verdict is ResolutionKind.PASSTHROUGH
    refused = table("REGISTRY_ONLY").resolve(ip("203.0.113.5"), 443)
    assert refused.verdict is ResolutionKind.REFUSE
    assert "REGISTRY_ONLY" in refused.reason


def test_canonical_workload_name_from_labels():
    t = table()
    assert t.pods[ip("10.244.2.9")].workload == "db"
    assert t.pods[ip("10.244.2.9")].name == "db-1"


def test_explicit_endpoints_serve_only_their_service_port():
    doc = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
services:
  - name: two
    vips: [10.96.0.20]
    ports: [{port: 80, targetPort: 8080}, {port: 90, targetPort: 9090}]
    endpoints:
      - {address: 192.0.2.1, port: 8080, servicePort: 80}
      - {address: 192.0.2.1, port: 9090, servicePort: 90}
"""
    t = DestinationTable(parse_config(doc).config)
    assert {t.resolve(ip("10.96.0.20"), 80).backend.port for _ in range(4)} == {8080}
    assert {t.resolve(ip("10.96.0.20"), 90).backend.port for _ in range(4)} == {9090}

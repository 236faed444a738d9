"""Unit tests for peer authentication, L4 authorization and their kernel compilation."""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from nodeproxy.config import ConfigError, parse_config
from nodeproxy.config.model import NodeConfig
from nodeproxy.policy import (
    Authorizer,
    ConnectionAttributes,
    DestinationWorkload,
    KernelDeny,
    PeerAuthenticator,
    compile_connect_denies,
)

HEAD = """\
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
identity: {caCert: /etc/nodeproxy/ca/root-cert.pem, caKey: /etc/nodeproxy/ca/root-key.pem}
node: {name: node-a}
"""

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
WEB = DestinationWorkload("shop", {"app": "web", "tier": "front"})


def config_with(**sections: Any) -> NodeConfig:
    """A validated config with the given top-level sections (snake_case -> camelCase keys)."""
    camel = {
        "".join(w.capitalize() if i else w for i, w in enumerate(key.split("_"))): value
        for key, value in sections.items()
    }
    body = yaml.safe_dump(camel, sort_keys=False) if camel else ""
    return parse_config(HEAD + body).config


def authorizer(*policies: dict[str, Any]) -> Authorizer:
    return Authorizer(config_with(authorization_policies=list(policies)))


def attrs(principal: str | None = FRONTEND, namespace: str | None = "shop",
          ip: str = "10.244.1.10", port: int = 8080) -> ConnectionAttributes:
    return ConnectionAttributes(principal, namespace, ipaddress.ip_address(ip), port)


def allow(*rules: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "p", "namespace": "shop", "action": "ALLOW", "rules": list(rules), **fields}


def deny(*rules: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "d", "namespace": "shop", "action": "DENY", "rules": list(rules), **fields}


def src(**source: Any) -> dict[str, Any]:
    return {"from": [{"source": source}]}


def ports(*values: str, negate: bool = False) -> dict[str, Any]:
    return {"to": [{"operation": {"notPorts" if negate else "ports": list(values)}}]}


# --- the authorization table ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    policies: tuple[dict[str, Any], ...]
    conn: ConnectionAttributes
    allowed: bool
    policy: str | None
    dest: DestinationWorkload = WEB


PLAIN = attrs(principal=None, namespace=None)
PRINCIPAL = "cluster.local/ns/shop/sa/frontend"

CASES = [
    # principals: exact (with and without spiffe://), prefix, suffix, presence
    Case("principal-exact", (allow(src(principals=[PRINCIPAL])),), attrs(), True, "shop/p"),
    Case("principal-exact-spiffe-form", (allow(src(principals=[FRONTEND])),), attrs(), True,
         "shop/p"),
    Case("principal-exact-miss", (allow(src(principals=["cluster.local/ns/shop/sa/cart"])),),
         attrs(), False, None),
    Case("principal-prefix", (allow(src(principals=["cluster.local/ns/shop/*"])),), attrs(),
         True, "shop/p"),
    Case("principal-prefix-miss", (allow(src(principals=["cluster.local/ns/other/*"])),),
         attrs(), False, None),
    Case("principal-suffix", (allow(src(principals=["*/sa/frontend"])),), attrs(), True,
         "shop/p"),
    Case("principal-suffix-miss", (allow(src(principals=["*/sa/cart"])),), attrs(), False, None),
    Case("principal-presence", (allow(src(principals=["*"])),), attrs(), True, "shop/p"),
    Case("principal-presence-plaintext", (allow(src(principals=["*"])),), PLAIN, False, None),
    Case("principal-any-of-list", (allow(src(principals=["x/ns/a/sa/b", PRINCIPAL])),),
         attrs(), True, "shop/p"),
    Case("plaintext-never-matches-principals", (allow(src(principals=[PRINCIPAL])),), PLAIN,
         False, None),
    Case("not-principals-matches-plaintext", (deny(src(notPrincipals=["*"])),), PLAIN, False,
         "shop/d"),
    Case("not-principals-spares-mtls", (deny(src(notPrincipals=["*"])),), attrs(), True, None),
    Case("not-principals-exact", (deny(src(notPrincipals=[PRINCIPAL])),),
         attrs(principal="spiffe://cluster.local/ns/shop/sa/cart"), False, "shop/d"),
    Case("not-principals-exact-listed", (deny(src(notPrincipals=[PRINCIPAL])),), attrs(),
         True, None),
    # namespaces: exact, prefix, suffix, presence, not
    Case("namespace-exact", (allow(src(namespaces=["shop"])),), attrs(), True, "shop/p"),
    Case("namespace-exact-miss", (allow(src(namespaces=["shop"])),), attrs(namespace="other"),
         False, None),
    Case("namespace-prefix", (allow(src(namespaces=["prod-*"])),),
         attrs(namespace="prod-eu"), True, "shop/p"),
    Case("namespace-suffix", (allow(src(namespaces=["*-test"])),),
         attrs(namespace="cart-test"), True, "shop/p"),
    Case("namespace-suffix-miss", (allow(src(namespaces=["*-test"])),), attrs(), False, None),
    Case("namespace-presence-plaintext", (allow(src(namespaces=["*"])),), PLAIN, False, None),
    Case("not-namespaces", (deny(src(notNamespaces=["shop"])),), attrs(namespace="other"),
         False, "shop/d"),
    Case("not-namespaces-listed", (deny(src(notNamespaces=["shop"])),), attrs(), True, None),
    Case("not-namespaces-plaintext", (deny(src(notNamespaces=["shop"])),), PLAIN, False,
         "shop/d"),
    # ipBlocks (v4, v6, bare address, IPv4-mapped source) and notIpBlocks
    Case("ipblock-v4", (allow(src(ipBlocks=["10.244.1.0/24"])),), attrs(), True, "shop/p"),
    Case("ipblock-v4-miss", (allow(src(ipBlocks=["10.244.2.0/24"])),), attrs(), False, None),
    Case("ipblock-v4-bare-address", (allow(src(ipBlocks=["10.244.1.10"])),), attrs(), True,
         "shop/p"),
    Case("ipblock-v6", (allow(src(ipBlocks=["fd00:10:244:1::/64"])),),
         attrs(ip="fd00:10:244:1::10"), True, "shop/p"),
    Case("ipblock-v6-miss", (allow(src(ipBlocks=["fd00:10:244:1::/64"])),),
         attrs(ip="fd00:10:244:2::10"), False, None),
    Case("ipblock-v4-against-v6-source", (allow(src(ipBlocks=["10.244.1.0/24"])),),
         attrs(ip="fd00::1"), False, None),
    Case("ipblock-v4-mapped-source", (allow(src(ipBlocks=["10.244.1.0/24"])),),
         attrs(ip="::ffff:10.244.1.10"), True, "shop/p"),
    Case("not-ipblocks", (deny(src(notIpBlocks=["10.244.0.0/16"])),), attrs(ip="192.0.2.1"),
         False, "shop/d"),
    Case("not-ipblocks-inside", (deny(src(notIpBlocks=["10.244.0.0/16"])),), attrs(), True,
         None),
    Case("ipblocks-and-not-ipblocks", (deny(src(ipBlocks=["10.244.0.0/16"],
                                               notIpBlocks=["10.244.1.0/24"])),),
         attrs(), True, None),
    # ports and notPorts
    Case("ports", (allow(ports("8080")),), attrs(), True, "shop/p"),
    Case("ports-miss", (allow(ports("9090")),), attrs(), False, None),
    Case("ports-any-of-list", (allow(ports("80", "8080")),), attrs(), True, "shop/p"),
    Case("not-ports", (deny(ports("8080", negate=True)),), attrs(port=9090), False, "shop/d"),
    Case("not-ports-listed", (deny(ports("8080", negate=True)),), attrs(), True, None),
    # AND within a source, OR across sources, from AND to
    Case("source-fields-and", (allow(src(principals=[PRINCIPAL], ipBlocks=["10.9.0.0/16"])),),
         attrs(), False, None),
    Case("sources-or", (allow({"from": [{"source": {"principals": ["x/ns/a/sa/b"]}},
                                        {"source": {"ipBlocks": ["10.244.1.0/24"]}}]}),),
         attrs(), True, "shop/p"),
    Case("from-and-to", (allow({**src(principals=[PRINCIPAL]), **ports("9090")}),), attrs(),
         False, None),
    Case("rules-or", (allow(src(principals=["x/ns/a/sa/b"]), ports("8080")),), attrs(), True,
         "shop/p"),
    # actions and their order
    Case("deny-wins-over-allow", (allow(ports("8080")), deny(src(namespaces=["shop"]))),
         attrs(), False, "shop/d"),
    Case("deny-not-matching-then-allow", (allow(ports("8080")), deny(ports("22"))), attrs(),
         True, "shop/p"),
    Case("allow-selected-denies-unmatched", (allow(ports("22")),), attrs(), False, None),
    Case("no-policy-allows", (), attrs(), True, None),
    Case("deny-only-not-matching-allows", (deny(ports("22")),), attrs(), True, None),
    Case("first-matching-deny-named", (deny(ports("8080")), deny(ports("8080"), name="e")),
         attrs(), False, "shop/d"),
    # scoping: mesh-wide, namespace, selector
    Case("mesh-wide-deny", (deny(ports("8080"), namespace=None),),
         attrs(), False, "*/d", DestinationWorkload("elsewhere", {})),
    Case("namespace-deny-other-namespace", (deny(ports("8080")),), attrs(), True, None,
         DestinationWorkload("elsewhere", {"app": "web"})),
    Case("selector-applies", (deny(ports("8080"), selector={"app": "web"}),), attrs(), False,
         "shop/d"),
    Case("selector-not-contained", (deny(ports("8080"), selector={"app": "web", "v": "2"}),),
         attrs(), True, None),
    Case("mesh-wide-selector-any-namespace",
         (deny(ports("8080"), namespace=None, selector={"app": "web"}),), attrs(), False,
         "*/d", DestinationWorkload("elsewhere", {"app": "web"})),
    Case("allow-elsewhere-does-not-select", (allow(ports("22"), namespace="other"),), attrs(),
         True, None),
    Case("allow-other-selector-does-not-select", (allow(ports("22"), selector={"app": "db"}),),
         attrs(), True, None),
    # empty rules
    Case("allow-no-rules-denies-all", (allow(),), attrs(), False, None),
    Case("deny-no-rules-matches-nothing", (deny(),), attrs(), True, None),
    Case("allow-empty-rule-allows-all", (allow({}),), PLAIN, True, "shop/p"),
    Case("deny-empty-rule-denies-all", (deny({}),), attrs(), False, "shop/d"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_authorization_table(case: Case) -> None:
    decision = authorizer(*case.policies).decide(case.dest, case.conn)
    assert (decision.allowed, decision.policy) == (case.allowed, case.policy), decision.reason


def test_decision_action_and_reason() -> None:
    az = authorizer(allow(ports("8080")), deny(ports("22")))
    denied = az.decide(WEB, attrs(port=22))
    assert (denied.action, denied.reason) == ("DENY", "denied by DENY policy shop/d")
    allowed = az.decide(WEB, attrs())
    assert (allowed.action, allowed.reason) == ("ALLOW", "allowed by ALLOW policy shop/p")
    unmatched = az.decide(WEB, attrs(port=9090))
    assert (unmatched.allowed, unmatched.action, unmatched.reason) == (
        False, "ALLOW", "no ALLOW policy matched")
    free = az.decide(DestinationWorkload("other", {}), attrs(port=9090))
    assert (free.allowed, free.policy, free.reason) == (
        True, None, "no ALLOW policy selects this workload")


def test_authorizer_precomputes_and_caches_per_labels() -> None:
    config = config_with(
        workloads=[{"name": "web", "namespace": "shop", "node": "node-b",
                    "labels": {"app": "web"}, "ips": ["10.244.2.1"]}],
        authorization_policies=[deny(ports("22"), selector={"app": "web"})],
    )
    az = Authorizer(config)
    assert len(az._cache) == 1  # the config's workload, precomputed
    same = DestinationWorkload("shop", {"app": "web"})
    assert [p.name for p in az.applicable(same)] == ["shop/d"]
    assert len(az._cache) == 1
    az.decide(DestinationWorkload("shop", {"app": "db"}), attrs())
    assert len(az._cache) == 2
    assert hash(same) == hash(DestinationWorkload("shop", {"app": "web"}))


# --- peer authentication ----------------------------------------------------------------------


def peer(*policies: dict[str, Any]) -> PeerAuthenticator:
    return PeerAuthenticator(config_with(peer_authentications=list(policies)))


def test_peer_authentication_default_is_permissive() -> None:
    assert peer().mode_for(WEB, 8080) == "PERMISSIVE"


def test_peer_authentication_precedence() -> None:
    mesh = {"name": "mesh", "mode": "STRICT"}
    namespace = {"name": "ns", "namespace": "shop", "mode": "PERMISSIVE"}
    workload = {"name": "wl", "namespace": "shop", "selector": {"app": "web"}, "mode": "DISABLE"}
    assert peer(mesh).mode_for(WEB, 80) == "STRICT"
    assert peer(mesh, namespace).mode_for(WEB, 80) == "PERMISSIVE"
    assert peer(mesh, namespace).mode_for(DestinationWorkload("other", {}), 80) == "STRICT"
    assert peer(mesh, namespace, workload).mode_for(WEB, 80) == "DISABLE"
    assert peer(workload, mesh).mode_for(DestinationWorkload("shop", {"app": "db"}), 80) == (
        "STRICT")


def test_peer_authentication_workload_policy_choice() -> None:
    mesh_selector = {"name": "m", "selector": {"app": "web"}, "mode": "DISABLE"}
    ns_selector = {"name": "n", "namespace": "shop", "selector": {"tier": "front"},
                   "mode": "STRICT"}
    first = {"name": "a", "namespace": "shop", "selector": {"app": "web"}, "mode": "PERMISSIVE"}
    # A namespaced selector policy beats a mesh-wide one with a selector.
    assert peer(mesh_selector, ns_selector).mode_for(WEB, 80) == "STRICT"
    assert peer(mesh_selector).mode_for(DestinationWorkload("x", {"app": "web"}), 80) == (
        "DISABLE")
    # Among policies of one level, the first in the file wins.
    assert peer(first, ns_selector).mode_for(WEB, 80) == "PERMISSIVE"
    assert peer(ns_selector, first).mode_for(WEB, 80) == "STRICT"


def test_peer_authentication_unset_inherits() -> None:
    mesh = {"name": "mesh", "mode": "STRICT"}
    ns_unset = {"name": "ns", "namespace": "shop", "mode": "UNSET"}
    wl_unset = {"name": "wl", "namespace": "shop", "selector": {"app": "web"}}
    assert peer(mesh, ns_unset, wl_unset).mode_for(WEB, 80) == "STRICT"
    assert peer({"name": "ns", "namespace": "shop", "mode": "DISABLE"}, wl_unset).mode_for(
        WEB, 80) == "DISABLE"
    assert peer({"name": "mesh", "mode": "UNSET"}, ns_unset, wl_unset).mode_for(WEB, 80) == (
        "PERMISSIVE")


def test_peer_authentication_port_level() -> None:
    ns = {"name": "ns", "namespace": "shop", "mode": "STRICT"}
    wl = {"name": "wl", "namespace": "shop", "selector": {"app": "web"}, "mode": "UNSET",
          "portLevelMtls": {9090: "DISABLE", 8443: "UNSET", "8080": "PERMISSIVE"}}
    pa = peer(ns, wl)
    assert pa.mode_for(WEB, 9090) == "DISABLE"
    assert pa.mode_for(WEB, 8080) == "PERMISSIVE"  # a quoted YAML key works too
    assert pa.mode_for(WEB, 8443) == "STRICT"  # port UNSET -> policy UNSET -> namespace
    assert pa.mode_for(WEB, 80) == "STRICT"
    other = DestinationWorkload("shop", {"app": "db"})
    assert pa.mode_for(other, 9090) == "STRICT"  # port-level applies to the selected only


def test_accepts_plaintext_and_probe_exemption() -> None:
    config = config_with(
        inbound={"probeSources": ["10.244.0.1", "fd00:10:244::/64"]},
        peer_authentications=[
            {"name": "ns", "namespace": "shop", "mode": "STRICT"},
            {"name": "wl", "namespace": "shop", "selector": {"app": "web"},
             "portLevelMtls": {9090: "DISABLE"}},
        ],
    )
    pa = PeerAuthenticator(config)
    probes = config.inbound.probe_sources
    ip = ipaddress.ip_address
    assert not pa.accepts_plaintext(WEB, 8080, ip("10.244.1.10"), probes)
    assert pa.accepts_plaintext(WEB, 8080, ip("10.244.0.1"), probes)
    assert pa.accepts_plaintext(WEB, 8080, ip("::ffff:10.244.0.1"), probes)
    assert pa.accepts_plaintext(WEB, 8080, ip("fd00:10:244::9"), probes)
    assert not pa.accepts_plaintext(WEB, 8080, ip("fd00:10:245::9"), probes)
    assert pa.accepts_plaintext(WEB, 9090, ip("10.244.1.10"), probes)  # DISABLE
    elsewhere = DestinationWorkload("other", {})
    assert pa.accepts_plaintext(elsewhere, 8080, ip("10.244.1.10"), [])  # PERMISSIVE
    assert pa.accepts_plaintext(WEB, 8080, ip("10.244.0.1"), [ip("10.244.0.1")])


# --- kernel compilation -----------------------------------------------------------------------


KERNEL = HEAD + """\
workloads:
  - {name: client, namespace: shop, netns: /n/c, cgroup: /c/c, ips: [10.244.1.10]}
  - {name: stranger, namespace: shop, netns: /n/s, cgroup: /c/s, ips: [10.244.3.10]}
  - {name: straddler, namespace: shop, netns: /n/x, cgroup: /c/x,
     ips: [10.244.1.11, 10.244.3.11]}
  - {name: web-1, namespace: shop, node: node-b, labels: {app: web},
     ips: [10.244.2.20, "fd00::20"]}
  - {name: web-2, namespace: shop, node: node-b, labels: {app: web}, ips: [10.244.2.21]}
  - {name: mixed-1, namespace: shop, node: node-b, labels: {app: mixed, locked: "yes"},
     ips: [10.244.2.30]}
  - {name: mixed-2, namespace: shop, node: node-b, labels: {app: mixed}, ips: [10.244.2.31]}
services:
  - {name: web, namespace: shop, vips: [10.96.0.10, "fd00:96::10"],
     ports: [{port: 80, targetPort: 8080}, {port: 9000}], selector: {app: web}}
  - {name: mixed, namespace: shop, vips: [10.96.0.11],
     ports: [{port: 80, targetPort: 8080}], selector: {app: mixed}}
  - {name: outside, namespace: shop, vips: [10.96.0.12], ports: [{port: 8080}],
     endpoints: [{address: 10.244.2.20, port: 8080}, {address: 192.0.2.1, port: 8080}]}
"""


def kernel_denies(*policies: dict[str, Any]) -> tuple[set[tuple[int, str, int, str]], Any]:
    """(pod id, ip, port, policy name) for the local pods client=1, stranger=2, straddler=3."""
    text = KERNEL + yaml.safe_dump({"authorizationPolicies": list(policies)}, sort_keys=False)
    config = parse_config(text).config
    local = [(i + 1, w) for i, w in enumerate(config.local_workloads())]
    compiled = compile_connect_denies(config, Authorizer(config), local, config.workloads,
                                      config.services)
    named = {(d.source_pod_id, str(d.ip), d.port, compiled.policy_names[d.policy])
             for d in compiled.denies}
    return named, compiled


def test_kernel_deny_by_port_from_ip_block() -> None:
    named, compiled = kernel_denies(
        deny({**src(ipBlocks=["10.244.1.0/24"]), **ports("8080")}, selector={"app": "web"}))
    assert named == {
        (1, "10.244.2.20", 8080, "shop/d"),
        (1, "10.244.2.21", 8080, "shop/d"),
        (1, "10.96.0.10", 80, "shop/d"),  # every endpoint of web:80 is denied
    }
    # The IPv6 VIP's only candidate, fd00::20, is not denied: the client has no IPv6 address.
    # The stranger (10.244.3.10) is outside the block; the straddler's IPs disagree.
    assert compiled.policy_names == ["shop/d"]
    assert all(isinstance(d, KernelDeny) for d in compiled.denies)
    order = [(d.source_pod_id, d.ip.version, d.ip, d.port) for d in compiled.denies]
    assert order == sorted(order)


def test_kernel_vip_with_an_allowed_endpoint_is_left_to_the_proxy() -> None:
    named, _ = kernel_denies(
        deny({**src(ipBlocks=["10.244.1.0/24"]), **ports("8080")}, selector={"locked": "yes"}))
    assert named == {(1, "10.244.2.30", 8080, "shop/d")}  # not 10.96.0.11:80


def test_kernel_explicit_endpoint_keeps_vip_open() -> None:
    named, _ = kernel_denies(deny(ports("8080"), selector={"app": "web"}))
    assert (1, "10.96.0.10", 80, "shop/d") in named
    assert not any(ip == "10.96.0.12" for _, ip, _, _ in named)  # 192.0.2.1 is no workload
    assert {pod for pod, _, _, _ in named} == {1, 2, 3}  # no source condition: every pod


def test_kernel_rule_with_identity_is_not_compiled() -> None:
    named, compiled = kernel_denies(
        deny({**src(ipBlocks=["10.244.1.0/24"], principals=["*"]), **ports("8080")}),
        deny({**src(namespaces=["shop"])}, name="e"),
        deny(ports("8080"), {**src(notPrincipals=["*"]), **ports("9000")}, name="f"),
    )
    assert named == set() and compiled.policy_names == []


def test_kernel_unenumerable_ports_are_not_compiled() -> None:
    named, _ = kernel_denies(
        deny(src(ipBlocks=["10.244.1.0/24"])),
        deny(ports("8080", negate=True), name="e"),
        deny({"to": [{"operation": {"ports": ["8080", "9000"], "notPorts": ["8080"]}}]},
             name="f", selector={"app": "web"}),
    )
    targets = ("10.244.2.20", "10.244.2.21", "10.96.0.10")  # fd00::20: no pod has IPv6
    assert named == {(pod, ip, 9000, "shop/f") for pod in (1, 2, 3) for ip in targets}


def test_kernel_not_ip_blocks_and_first_policy_wins() -> None:
    named, compiled = kernel_denies(
        deny({**src(notIpBlocks=["10.244.1.0/24"]), **ports("8080")}, selector={"app": "web"}),
        deny(ports("8080"), name="e", selector={"app": "web"}),
        allow({}, name="allow-all"),  # ALLOW never compiles and never undoes a DENY
    )
    by_pod = {(pod, policy) for pod, _, _, policy in named}
    assert by_pod == {(1, "shop/e"), (2, "shop/d"), (3, "shop/e")}
    assert compiled.policy_names == ["shop/d", "shop/e"]
    again = kernel_denies(
        deny({**src(notIpBlocks=["10.244.1.0/24"]), **ports("8080")}, selector={"app": "web"}),
        deny(ports("8080"), name="e", selector={"app": "web"}),
    )[1]
    assert again == compiled  # deterministic


def test_kernel_dual_stack_source_uses_its_family() -> None:
    text = HEAD + """\
workloads:
  - {name: client, netns: /n/c, cgroup: /c/c, ips: [10.244.1.10, "fd00:1::10"]}
  - {name: web, node: node-b, labels: {app: web}, ips: [10.244.2.20, "fd00:2::20"]}
authorizationPolicies:
  - name: d
    action: DENY
    selector: {app: web}
    rules:
      - from: [{source: {ipBlocks: ["fd00:1::/64"]}}]
        to: [{operation: {ports: ["8080"]}}]
"""
    config = parse_config(text).config
    compiled = compile_connect_denies(config, None, [(7, config.workloads[0])])
    assert [(d.source_pod_id, str(d.ip), d.port) for d in compiled.denies] == [
        (7, "fd00:2::20", 8080)]
    assert compiled.policy_names == ["*/d"]


# --- validation --------------------------------------------------------------------------------


# HEAD without the CA (same number of lines), for tests of the identity section itself.
HEAD_NO_CA = HEAD.replace(HEAD.splitlines()[2], "# identity: set by the test")


def problems(text: str, head: str = HEAD) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(head + textwrap.dedent(text), "node.yaml")
    return info.value.problems


def test_unknown_mode_and_action() -> None:
    assert problems("""\
        peerAuthentications:
          - name: a
            mode: STRICTLY
            portLevelMtls:
              8080: NOPE
        authorizationPolicies:
          - name: a
            action: AUDIT
        """) == [
        "node.yaml:7: peerAuthentications[0].mode: must be one of UNSET, STRICT, PERMISSIVE, "
        "DISABLE (got 'STRICTLY')",
        "node.yaml:9: peerAuthentications[0].portLevelMtls[8080]: must be one of UNSET, "
        "STRICT, PERMISSIVE, DISABLE (got 'NOPE')",
        "node.yaml:12: authorizationPolicies[0].action: must be one of ALLOW, DENY "
        "(got 'AUDIT')",
    ]


def test_more_probe_sources_than_the_kernel_map_holds_are_refused() -> None:
    sources = ", ".join(f"10.0.{i // 256}.{i % 256}" for i in range(257))
    found = problems(f"""\
        inbound:
          probeSources: [{sources}]
        """)
    assert [line.split(": ", 1)[1] for line in found] == [
        "inbound.probeSources: must have at most 256 items"]


def test_bad_cidrs() -> None:
    assert problems("""\
        inbound:
          probeSources: [10.0.0.1, bad]
        authorizationPolicies:
          - name: a
            rules:
              - from:
                  - source:
                      ipBlocks:
                        - 10.0.0.0/33
                        - 10.0.0.1/24
                      notIpBlocks:
                        - 3
        """) == [
        "node.yaml:6: inbound.probeSources[1]: 'bad' is not a valid IP address or CIDR",
        "node.yaml:13: authorizationPolicies[0].rules[0].from[0].source.ipBlocks[0]: "
        "'10.0.0.0/33' is not a valid IP address or CIDR",
        "node.yaml:14: authorizationPolicies[0].rules[0].from[0].source.ipBlocks[1]: "
        "'10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)",
        "node.yaml:16: authorizationPolicies[0].rules[0].from[0].source.notIpBlocks[0]: "
        "3 is not a valid IP address or CIDR",
    ]


def test_bad_ports() -> None:
    assert problems("""\
        peerAuthentications:
          - name: a
            selector: {app: a}
            portLevelMtls:
              0: STRICT
        authorizationPolicies:
          - name: a
            rules:
              - to:
                  - operation:
                      ports: ["70000", "http"]
                      notPorts:
                        - 0
        """) == [
        "node.yaml:9: peerAuthentications[0].portLevelMtls[0]: key must be at least 1 (got 0)",
        "node.yaml:15: authorizationPolicies[0].rules[0].to[0].operation.ports[0]: "
        "must be a port number from 1 to 65535 (got '70000')",
        "node.yaml:15: authorizationPolicies[0].rules[0].to[0].operation.ports[1]: "
        "must be a port number from 1 to 65535 (got 'http')",
        "node.yaml:17: authorizationPolicies[0].rules[0].to[0].operation.notPorts[0]: "
        "must be a port number from 1 to 65535 (got '0')",
    ]


def test_null_namespace_means_mesh_wide() -> None:
    config = config_with(authorization_policies=[deny({}, namespace=None)],
                         peer_authentications=[{"name": "a", "namespace": None}])
    assert config.authorization_policies[0].key == "*/d"
    assert config.peer_authentications[0].namespace is None
    assert problems("authorizationPolicies:\n  - {name: a, namespace: Shop}\n") == [
        "node.yaml:6: authorizationPolicies[0].namespace: 'Shop' is not a valid name "
        "(lowercase letters, digits and '-', at most 63)"
    ]


def test_ports_as_yaml_numbers_are_accepted() -> None:
    config = config_with(authorization_policies=[allow(ports(8080))])  # type: ignore[arg-type]
    to = config.authorization_policies[0].rules[0].to
    assert to is not None and to[0].operation.ports == ["8080"]


def test_wildcard_in_the_middle_and_empty_values() -> None:
    assert problems("""\
        authorizationPolicies:
          - name: a
            rules:
              - from:
                  - source:
                      principals:
                        - "cluster.local/*/sa/x"
                        - "*a*"
                        - "spiffe://"
                      notNamespaces: [""]
        """) == [
        "node.yaml:11: authorizationPolicies[0].rules[0].from[0].source.principals[0]: "
        "'*' is allowed only alone, at the start or at the end (got 'cluster.local/*/sa/x')",
        "node.yaml:12: authorizationPolicies[0].rules[0].from[0].source.principals[1]: "
        "'*' is allowed only alone, at the start or at the end (got '*a*')",
        "node.yaml:13: authorizationPolicies[0].rules[0].from[0].source.principals[2]: "
        "must not be empty",
        "node.yaml:14: authorizationPolicies[0].rules[0].from[0].source.notNamespaces[0]: "
        "must not be empty",
    ]


def test_empty_selector_source_operation_and_lists() -> None:
    assert problems("""\
        peerAuthentications:
          - name: a
            selector: {}
        authorizationPolicies:
          - name: a
            selector: {}
            rules:
              - from: []
              - to:
                  - operation: {notPorts: []}
              - from:
                  - source: {principals: []}
              - from:
                  - {}
        """) == [
        "node.yaml:7: peerAuthentications[0].selector: must not be empty "
        "(omit it to select every workload in scope)",
        "node.yaml:10: authorizationPolicies[0].selector: must not be empty "
        "(omit it to select every workload in scope)",
        "node.yaml:12: authorizationPolicies[0].rules[0].from: must not be empty "
        "(omit it to match anything)",
        "node.yaml:14: authorizationPolicies[0].rules[1].to[0].operation: "
        "an operation must set at least one of hosts, notHosts, ports, notPorts, methods, "
        "notMethods, paths, notPaths",
        "node.yaml:16: authorizationPolicies[0].rules[2].from[0].source: a source must set at "
        "least one of principals, notPrincipals, namespaces, notNamespaces, ipBlocks, "
        "notIpBlocks",
        "node.yaml:18: authorizationPolicies[0].rules[3].from[0].source: required field missing",
    ]


def test_duplicate_names_and_scopes() -> None:
    assert problems("""\
        peerAuthentications:
          - {name: a, mode: STRICT}
          - {name: a, selector: {app: x}}
          - {name: b, namespace: shop, portLevelMtls: {80: STRICT}}
          - {name: c, namespace: shop}
          - {name: a, namespace: shop, selector: {app: x}}
        authorizationPolicies:
          - {name: a, namespace: shop}
          - {name: a}
          - name: a
            namespace: shop
        """) == [
        "node.yaml:7: peerAuthentications[1].name: peer authentication 'a' is already "
        "defined in the mesh-wide scope at peerAuthentications[0]",
        "node.yaml:8: peerAuthentications[2].portLevelMtls: portLevelMtls requires a "
        "selector (as in Istio)",
        "node.yaml:9: peerAuthentications[3]: namespace shop already has a peer "
        "authentication without a selector at peerAuthentications[2]",
        "node.yaml:14: authorizationPolicies[2].name: authorization policy 'a' is already "
        "defined in namespace shop at authorizationPolicies[0]",
    ]


def test_identity_and_tunnel_settings() -> None:
    assert problems("""\
        identity:
          caKey: /k
          certTtlSeconds: 0
          rotateAtFraction: 1
        tunnel:
          maxStreamsPerConnection: 0
        """, HEAD_NO_CA) == [
        "node.yaml:7: identity.certTtlSeconds: must be greater than 0 (got 0)",
        "node.yaml:8: identity.rotateAtFraction: must be less than 1 (got 1)",
        "node.yaml:10: tunnel.maxStreamsPerConnection: must be at least 1 (got 0)",
    ]
    assert problems("identity:\n  caKey: /k\n", HEAD_NO_CA) == [
        "node.yaml:6: identity.caKey: caKey needs caCert"
    ]
    config = config_with()
    assert config.identity.ca_cert == "/etc/nodeproxy/ca/root-cert.pem"
    assert config.identity.cert_ttl_seconds == 86400
    assert config.tunnel.max_connections_per_key == 4
    assert config.inbound.probe_sources == []


def test_policy_config_round_trips() -> None:
    config = config_with(
        inbound={"probeSources": ["10.244.0.1"]},
        peer_authentications=[{"name": "a", "namespace": "shop", "selector": {"app": "x"},
                               "portLevelMtls": {80: "STRICT"}}],
        authorization_policies=[allow({**src(ipBlocks=["10.0.0.0/8"]), **ports("80")})],
    )
    assert NodeConfig.model_validate(config.model_dump(by_alias=True)) == config
    assert NodeConfig.model_validate_json(config.model_dump_json(by_alias=True)) == config


def test_strict_without_a_ca_is_refused_at_load():
    from nodeproxy.config.loader import ConfigError, parse_config

    doc = """apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
peerAuthentications:
  - name: strict
    mode: STRICT
"""
    try:
        parse_config(doc, "node.yaml")
    except ConfigError as e:
        assert ("node.yaml:6: peerAuthentications[0].mode: STRICT needs mTLS: set "
                "identity.caCert and identity.caKey") in e.problems
    else:
        raise AssertionError("STRICT without a CA was accepted")

"""Kubelet's probes from an address of their own (inbound.probeSnat): the node rewrites the
connections its own processes open to enrolled pods to 169.254.7.127 (IPv6: fd16:...),
which inbound capture leaves to the pod, so no node address has to be a probe source.

The point of it: a connection the node *forwards* and masquerades to its own address (a
NodePort with kube-proxy's masquerade, simulated here by DNAT + MASQUERADE rules in the
node's netns) is captured and judged like any other, where listing the node's address in
inbound.probeSources let it past STRICT.

Real kernel, real daemon: one simulated node with an enrolled STRICT pod and an
unenrolled one, in the capture mode of each parameter; the node's probe SNAT chain read
back with iptables-save.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from nodeproxy.config.model import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum as sample
from tests.integration.probes import NO_HANDSHAKE, connect, connect_as, probe_from_node

pytestmark = pytest.mark.privileged

PORT = 7000  # the application listens
CLOSED = 7100  # nothing listens
NODE_PORT = 30070  # the simulated NodePort, on the node's bridge address
CAPTURED = "nodeproxy_kernel_inbound_connections_captured_total"
CHAIN = "NODEPROXY_PROBE_SNAT"

_STRICT = {"peerAuthentications": [
    {"name": "strict", "selector": {"app": "app"}, "mode": "STRICT"}]}
_SNAT = {**_STRICT, "inbound": {"probeSources": [], "probeSnat": {}}}


def _node_port(c: Cluster, family: int, action: str) -> None:
    """kube-proxy's NodePort with masquerade, as rules in the node's nat table: the node's
    bridge address NODE_PORT -> the app pod's PORT, the source rewritten to the node's."""
    app, n = c.pods["app"], c.nodes["node0"]
    tool, node_ip, pod_ip = (("iptables", n.gateway4, app.ip4) if family == 4
                             else ("ip6tables", n.gateway6, app.ip6))
    for rule in (["PREROUTING", "-d", node_ip, "-p", "tcp", "--dport", str(NODE_PORT),
                  "-j", "DNAT", "--to-destination",
                  f"{pod_ip}:{PORT}" if family == 4 else f"[{pod_ip}]:{PORT}"],
                 ["POSTROUTING", "-d", pod_ip, "-p", "tcp", "--dport", str(PORT),
                  "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE"]):
        result = c.run_in_node("node0", [tool, "-w", "-t", "nat", action, *rule])
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def node(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster(1, capture_mode=request.param) as c:
        c.add_pod("node0", "app", labels={"app": "app"}, service_account="app")
        c.add_unenrolled_pod("node0", "stranger")
        c.serve_peer("app", PORT)
        c.serve_peer("stranger", PORT)
        c.write_configs(overrides=_SNAT)
        c.start_daemons()
        _AT_READY[request.param] = _chain(c, "iptables") or []
        for family in (4, 6):
            _node_port(c, family, "-A")
        yield c


# The IPv4 chain as it was the moment the daemon answered /ready, per capture mode.
_AT_READY: dict[str, list[str]] = {}


def test_the_rules_are_written_before_the_node_is_ready(node: Cluster):
    """kubelet probes a pod as soon as the node is ready: a probe in the gap before the
    chain is written would be captured (a STRICT pod refuses it)."""
    app = node.pods["app"]
    assert any(app.ip4 in rule for rule in _AT_READY[node.capture_mode]), _AT_READY


def _captured(c: Cluster) -> float:
    return sample(c.metrics("node0"), CAPTURED, pod_name="app")


def _probe(c: Cluster, host: str, port: int) -> str:
    return probe_from_node(c, "node0", host, port)


def _peer_seen(answer: str) -> str:
    """The source address the peer server saw, from its 'connected {json}' answer."""
    assert answer.startswith("connected {"), answer
    return json.loads(answer.removeprefix("connected "))["peer"].rsplit(":", 1)[0].strip("[]")


def _chain(c: Cluster, tool: str) -> list[str] | None:
    """The node's probe SNAT chain's rules (None: no chain)."""
    out = c.run_in_node("node0", [f"{tool}-save", "-t", "nat"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if f":{CHAIN} - [0:0]" not in lines and not any(x.startswith(f":{CHAIN} ") for x in lines):
        return None
    return [x.split(" ", 2)[2] for x in lines if x.startswith(f"-A {CHAIN} ")]


@pytest.mark.parametrize("family", [4, 6])
def test_a_probe_to_a_port_nothing_listens_on_is_refused(node: Cluster, family: int):
    app = node.pods["app"]
    before = _captured(node)
    assert _probe(node, app.ip4 if family == 4 else app.ip6, CLOSED) == "ConnectionRefusedError"
    assert _captured(node) == before


@pytest.mark.parametrize("family", [4, 6])
def test_a_probe_reaches_the_application_from_the_probe_address(node: Cluster, family: int):
    app = node.pods["app"]
    ip, probe = (app.ip4, PROBE_SNAT_IPV4) if family == 4 else (app.ip6, PROBE_SNAT_IPV6)
    before = _captured(node)
    assert _peer_seen(_probe(node, ip, PORT)) == str(probe)
    assert _captured(node) == before  # left to the pod: neither kernel nor proxy counted it


def test_a_pod_outside_the_mesh_still_sees_the_node(node: Cluster):
    stranger, n = node.pods["stranger"], node.nodes["node0"]
    assert _peer_seen(_probe(node, stranger.ip4, PORT)) == n.gateway4


@pytest.mark.parametrize("family", [4, 6])
def test_a_masqueraded_node_port_connection_is_captured_and_refused(node: Cluster,
                                                                    family: int):
    """A client outside the mesh through the NodePort arrives from the node's address:
    captured, and STRICT refuses its plaintext; the application never answers it."""
    n = node.nodes["node0"]
    before = _captured(node)
    answer = connect(node, "stranger", n.gateway4 if family == 4 else n.gateway6, NODE_PORT)
    assert not answer.startswith("connected"), answer
    assert _captured(node) == before + 1


def test_the_node_address_as_probe_source_let_the_node_port_past_strict(node: Cluster):
    """What the probe address fixes, shown: with the node's own address in
    inbound.probeSources (the only way before), the same NodePort connection reaches the
    STRICT pod's application in plaintext."""
    n = node.nodes["node0"]
    node.write_configs(overrides={**_STRICT, "inbound": {"probeSources": [n.gateway4]}})
    try:
        node.reload_daemons()
        answer = connect(node, "stranger", n.gateway4, NODE_PORT)
        assert _peer_seen(answer) == n.gateway4
    finally:
        node.write_configs(overrides=_SNAT)
        node.reload_daemons()
    assert not connect(node, "stranger", n.gateway4, NODE_PORT).startswith("connected")


def test_a_pod_claiming_the_probe_address_gets_no_connection(node: Cluster):
    """A hostile pod that sends its SYN from 169.254.7.127 is left uncaptured, but the
    application's SYN-ACK goes to the node, which has no connection to give it back to:
    no handshake, no byte delivered."""
    app = node.pods["app"]
    assert connect_as(node, "stranger", str(PROBE_SNAT_IPV4), app.ip4, PORT) in NO_HANDSHAKE
    # The node's own probes still work.
    assert _peer_seen(_probe(node, app.ip4, PORT)) == str(PROBE_SNAT_IPV4)


def test_the_chain_holds_exactly_the_enrolled_pods(node: Cluster):
    app = node.pods["app"]
    assert _chain(node, "iptables") == [
        f"-d {app.ip4}/32 -p tcp -m owner --socket-exists -j SNAT --to-source {PROBE_SNAT_IPV4}"]
    assert _chain(node, "ip6tables") == [
        f"-d {app.ip6}/128 -p tcp -m owner --socket-exists -j SNAT "
        f"--to-source {PROBE_SNAT_IPV6}"]
    # A pod enrolled at run time gets its rule; unenrolled, it loses it again.
    late = node.add_pod("node0", "late", labels={"app": "late"})
    try:
        assert _wait_for(lambda: any(late.ip4 in r for r in _chain(node, "iptables") or []))
    finally:
        node.remove_pod("late")
    assert _wait_for(lambda: not any(late.ip4 in r for r in _chain(node, "iptables") or []))


def test_a_reload_without_probe_snat_removes_the_chain(node: Cluster):
    node.write_configs(overrides={**_STRICT, "inbound": {"probeSources": []}})
    try:
        node.reload_daemons()
        assert _wait_for(lambda: _chain(node, "iptables") is None
                         and _chain(node, "ip6tables") is None)
        # The probe is captured again (the node's address is no probe source here).
        assert _probe(node, node.pods["app"].ip4, CLOSED) != "ConnectionRefusedError"
    finally:
        node.write_configs(overrides=_SNAT)
        node.reload_daemons()
    assert _wait_for(lambda: _chain(node, "iptables") is not None)
    assert _probe(node, node.pods["app"].ip4, CLOSED) == "ConnectionRefusedError"


def test_stopping_the_daemon_removes_the_chain(node: Cluster):
    """Last in the module: the daemon stops, and leaves nothing in the node's tables."""
    assert _chain(node, "iptables") is not None
    codes = node.stop_daemons()
    assert all(code == 0 for code in codes.values()), codes
    assert _chain(node, "iptables") is None and _chain(node, "ip6tables") is None


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())

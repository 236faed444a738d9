"""Kubelet probes are not captured: a connection from a probe source (inbound.probeSources,
the node's bridge addresses in the testbed) reaches the enrolled pod's own sockets, so a
tcpSocket probe fails when the application does not listen, as without a mesh.  Any other
source is still steered to the inbound proxy (STRICT refuses it, the kernel counts it);
a reload that drops a probe source brings capture back for it.

Real kernel, real daemon: one simulated node with an enrolled STRICT pod and an
unenrolled one, in the capture mode of each parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum as sample
from tests.integration.probes import NO_HANDSHAKE, connect, connect_as, probe_from_node

pytestmark = pytest.mark.privileged

PORT = 7000  # the application listens
CLOSED = 7100  # nothing listens
CAPTURED = "nodeproxy_kernel_inbound_connections_captured_total"


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def node(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster(1, capture_mode=request.param) as c:
        c.add_pod("node0", "app", labels={"app": "app"}, service_account="app")
        c.add_unenrolled_pod("node0", "stranger")
        c.serve_peer("app", PORT)
        c.write_configs(overrides=_STRICT)
        c.start_daemons()
        yield c


_STRICT = {"peerAuthentications": [
    {"name": "strict", "selector": {"app": "app"}, "mode": "STRICT"}]}


def _captured(c: Cluster) -> float:
    return sample(c.metrics("node0"), CAPTURED, pod_name="app")


def _probe(c: Cluster, host: str, port: int) -> str:
    return probe_from_node(c, "node0", host, port)


def _from_the_node(c: Cluster, host: str, port: int) -> dict[str, str]:
    """What the application answers a connection from the node (a kubelet probe)."""
    sock = netns.connect(c.nodes["node0"].netns_path, host, port)
    try:
        sock.sendall(b"W")
        return json.loads(sock.recv(300))
    finally:
        sock.close()


@pytest.mark.parametrize("family", [4, 6])
def test_a_probe_to_a_port_nothing_listens_on_is_refused(node: Cluster, family: int):
    app = node.pods["app"]
    ip = app.ip4 if family == 4 else app.ip6
    before = _captured(node)
    assert _probe(node, ip, CLOSED) == "ConnectionRefusedError"
    assert _captured(node) == before


@pytest.mark.parametrize("family", [4, 6])
def test_a_probe_reaches_the_application_itself(node: Cluster, family: int):
    app, n = node.pods["app"], node.nodes["node0"]
    ip, source = (app.ip4, n.gateway4) if family == 4 else (app.ip6, n.gateway6)
    before = _captured(node)
    answer = _from_the_node(node, ip, PORT)
    assert answer["name"] == "app"
    assert answer["peer"].rsplit(":", 1)[0].strip("[]") == source
    # Not through the inbound proxy: neither the kernel nor the proxy counted it.
    assert _captured(node) == before


def test_other_sources_are_still_captured(node: Cluster):
    app = node.pods["app"]
    before = _captured(node)
    # STRICT refuses plaintext from a pod outside the mesh: the proxy accepted the
    # connection (it was captured) and reset it without an answer.
    assert not connect(node, "stranger", app.ip4, PORT).startswith("connected {")
    # A port nothing listens on: captured all the same (accepted by the proxy, then
    # reset), unlike a probe.
    assert connect(node, "stranger", app.ip4, CLOSED) != "ECONNREFUSED"
    assert _captured(node) == before + 2


def test_a_pod_claiming_the_probe_source_gets_no_connection(node: Cluster):
    """A hostile pod that sends its SYN from the node's address is left uncaptured, but
    the application's SYN-ACK goes to the real node, which resets it: no handshake."""
    app, n = node.pods["app"], node.nodes["node0"]
    assert connect_as(node, "stranger", n.gateway4, app.ip4, PORT) in NO_HANDSHAKE
    # The real node still probes as before.
    assert _from_the_node(node, app.ip4, PORT)["name"] == "app"


def test_a_reload_without_the_probe_source_captures_it_again(node: Cluster):
    app, n = node.pods["app"], node.nodes["node0"]
    node.write_configs(overrides={**_STRICT, "inbound": {"probeSources": [n.gateway6]}})
    try:
        node.reload_daemons()
        before = _captured(node)
        # Captured again over IPv4: the inbound proxy takes the connection whether the
        # application listens or not, and STRICT refuses the node (reset, no answer).
        assert _probe(node, app.ip4, CLOSED) != "ConnectionRefusedError"
        assert not _probe(node, app.ip4, PORT).startswith("connected {")
        assert _captured(node) == before + 2
        # The IPv6 probe source it kept is still left to the pod.
        assert _probe(node, app.ip6, CLOSED) == "ConnectionRefusedError"
    finally:
        node.write_configs(overrides=_STRICT)
        node.reload_daemons()
    assert _probe(node, app.ip4, CLOSED) == "ConnectionRefusedError"
    assert _probe(node, app.ip4, PORT).startswith("connected {")

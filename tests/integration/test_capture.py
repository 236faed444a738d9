"""The daemon captures meshed pods' TCP in the kernel and proxies it.

One two-node simulated cluster with a daemon per node serves every test here, once per
capture mode: ebpf (cgroup/connect4/6, sk_lookup) and iptables (REDIRECT rules in each
pod's netns).  Each test asserts what a user of the pods would notice: bytes arrive
intact (SHA-256 both ways), the peer is who it should be, an uncaptured connection is
left alone, a refused one is refused, and the kernel's counters equal the bytes sent.
Where a mode differs by nature (the errno of a connect refused by policy), the test
says so and checks that mode's own answer.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.ports import INBOUND_PORT, OUTBOUND_PORT, READINESS_PORT
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum as sample
from tests.integration.probes import attached_programs, connect

pytestmark = pytest.mark.privileged

PORT = 7000
DENIED_PORT = 9200  # an identity-free DENY: nobody may reach the web pods on it
MB = 1_000_000
# The peer's transfer protocol: 'T' + 8-byte length + 16-byte seed up; SHA-256 down.
REQUEST_HEADER = 25
RESPONSE_HEADER = 32


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster(2, capture_mode=request.param) as c:
        c.add_pod("node0", "client-0", labels={"app": "client"}, service_account="client")
        c.add_pod("node1", "client-1", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-0", labels={"app": "web", "zone": "z0"}, service_account="web")
        c.add_pod("node1", "web-1", labels={"app": "web", "zone": "z1"}, service_account="web")
        # In node0's pod cgroup subtree but not enrolled; and one outside any pod cgroup.
        c.add_pod("node0", "bystander", labels={"app": "bystander"}, enroll=False)
        c.add_unenrolled_pod("node0", "outsider")
        c.add_service("web", port=80, target_port=PORT, selector={"app": "web"})
        c.add_service("web-z0", port=80, target_port=PORT, selector={"zone": "z0"})
        c.add_service("web-z1", port=80, target_port=PORT, selector={"zone": "z1"})
        for pod in ("web-0", "web-1", "outsider"):
            c.serve_peer(pod, PORT)
        c.serve_peer("web-0", DENIED_PORT)
        c.write_configs(overrides={"authorizationPolicies": [
            {"name": "no-web-9200", "selector": {"app": "web"}, "action": "DENY",
             "rules": [{"to": [{"operation": {"ports": [str(DENIED_PORT)]}}]}]}]})
        c.start_daemons()
        yield c


def kernel(mesh: Cluster, node: str, name: str, pod: str, direction: str | None = None) -> float:
    """One nodeproxy_kernel_* sample of a pod (0 if absent)."""
    for family in text_string_to_metric_families(mesh.metrics(node)):
        for s in family.samples:
            if s.name != name or s.labels.get("pod_name") != pod:
                continue
            if direction is None or s.labels.get("direction") == direction:
                return s.value
    return 0.0


def transfer(mesh: Cluster, pod: str, target: str, send: int, receive: int,
             connections: int = 1, parallel: int = 1, timeout: float = 120) -> dict:
    result = mesh.peer(pod, "transfer", "--to", target, "--send", str(send),
                       "--receive", str(receive), "--connections", str(connections),
                       "--parallel", str(parallel), "--timeout", str(timeout),
                       timeout=timeout + 30)
    assert result["ok"] and result["exit_code"] == 0, result
    assert result["sha_mismatch"] == 0, result
    return result


def whoami(mesh: Cluster, pod: str, target: str) -> dict:
    result = mesh.peer(pod, "whoami", "--to", target)
    assert result["exit_code"] == 0, result
    return result


def test_same_node_vip_100mb_both_ways_and_kernel_counters_match(mesh: Cluster):
    counters = ("nodeproxy_kernel_tcp_sent_bytes_total",
                "nodeproxy_kernel_tcp_received_bytes_total")
    before = [kernel(mesh, "node0", c, "client-0", "outbound") for c in counters]
    opened = kernel(mesh, "node0", "nodeproxy_kernel_tcp_connections_closed_total", "client-0",
                    "outbound")
    transfer(mesh, "client-0", mesh.services["default/web-z0"].address(4), 100 * MB, 100 * MB)
    # The kernel adds a connection's bytes when it closes; give the close a moment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        closed = kernel(mesh, "node0", "nodeproxy_kernel_tcp_connections_closed_total",
                        "client-0", "outbound")
        if closed == opened + 1:
            break
        time.sleep(0.1)
    after = [kernel(mesh, "node0", c, "client-0", "outbound") for c in counters]
    assert after[0] - before[0] == 100 * MB + REQUEST_HEADER
    assert after[1] - before[1] == 100 * MB + RESPONSE_HEADER


def test_cross_node_vip_100mb_both_ways(mesh: Cluster):
    transfer(mesh, "client-0", mesh.services["default/web-z1"].address(4), 100 * MB, 100 * MB)


@pytest.mark.parametrize("service", ["web-z0", "web-z1"])
def test_ipv6_vip_same_and_cross_node(mesh: Cluster, service: str):
    transfer(mesh, "client-0", mesh.services[f"default/{service}"].address(6), 20 * MB, 20 * MB)


def test_200_concurrent_connections(mesh: Cluster):
    result = transfer(mesh, "client-1", mesh.services["default/web"].address(4), 64_000,
                      256_000, connections=200, parallel=200)
    assert result["connections"] == 200 and result["failed"] == 0


def test_destination_sees_the_client_pod_ip_not_the_proxy(mesh: Cluster):
    me = mesh.pods["client-0"]
    for target, server in ((mesh.services["default/web-z0"].address(4), "web-0"),
                           (mesh.services["default/web-z1"].address(4), "web-1")):
        answer = whoami(mesh, "client-0", target)
        assert answer["name"] == server
        assert answer["peer"].rsplit(":", 1)[0] == me.ip4


def test_getpeername_shows_the_vip_the_app_dialled(mesh: Cluster):
    vip = mesh.services["default/web"].vip4
    script = (f"import socket; s = socket.create_connection(({vip!r}, 80), 5); "
              "print(s.getpeername()[0], s.getpeername()[1])")
    out = mesh.run_in_pod("client-0", [mesh.python, "-c", script], timeout=15)
    assert out.stdout.split() == [vip, "80"], out.stderr


def test_round_robin_over_both_nodes(mesh: Cluster):
    target = mesh.services["default/web"].address(4)
    names = [whoami(mesh, "client-1", target)["name"] for _ in range(6)]
    assert sorted(set(names)) == ["web-0", "web-1"]
    assert names.count("web-0") == names.count("web-1") == 3


def test_proxy_own_upstream_connects_are_not_captured(mesh: Cluster):
    """One client connect is captured exactly once: the proxy's own dial is not looped back."""
    before = kernel(mesh, "node0", "nodeproxy_kernel_connections_captured_total", "client-0")
    transfer(mesh, "client-0", mesh.services["default/web-z1"].address(4), 1000, 1000,
             connections=10, parallel=5)
    after = kernel(mesh, "node0", "nodeproxy_kernel_connections_captured_total", "client-0")
    assert after - before == 10


def test_unenrolled_pods_are_untouched(mesh: Cluster):
    vip = mesh.services["default/web"].vip4
    # Outside the mesh a VIP is not routable: the connect fails at once, nothing captures it.
    # (ebpf: the pod's own unreachable route; iptables: the pod routes the VIP to the bridge
    # and the node, where it is unreachable, answers at once.)
    assert connect(mesh, "outsider", vip, 80) == "EHOSTUNREACH"
    assert connect(mesh, "bystander", vip, 80) == "EHOSTUNREACH"
    # Direct pod-to-pod traffic of an unenrolled pod flows as without the mesh.
    web0 = mesh.pods["web-0"].ip4
    assert whoami(mesh, "bystander", f"{web0}:{PORT}")["peer"].startswith(
        mesh.pods["bystander"].ip4 + ":")
    assert kernel(mesh, "node0", "nodeproxy_kernel_connections_captured_total", "bystander") == 0


def test_loopback_inside_a_pod_is_untouched(mesh: Cluster):
    server = mesh.spawn_in_pod("client-0", mesh.peer_argv("serve", "--host", "127.0.0.1",
                                                          "--port", "9100", "--name", "local"),
                               stdout=subprocess.PIPE)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        before = kernel(mesh, "node0", "nodeproxy_kernel_connections_captured_total", "client-0")
        answer = whoami(mesh, "client-0", "127.0.0.1:9100")
        assert answer["name"] == "local" and answer["peer"].startswith("127.0.0.1:")
        after = kernel(mesh, "node0", "nodeproxy_kernel_connections_captured_total", "client-0")
        assert after == before
    finally:
        server.kill()
        server.wait()


def test_pod_ip_and_unknown_destinations_pass_through_under_allow_any(mesh: Cluster):
    web1 = mesh.pods["web-1"].ip4
    assert whoami(mesh, "client-0", f"{web1}:{PORT}")["name"] == "web-1"
    outsider = mesh.pods["outsider"].ip4  # not in the registry
    assert whoami(mesh, "client-0", f"{outsider}:{PORT}")["name"] == "outsider"


def test_istio_metrics_count_connections_and_bytes(mesh: Cluster):
    def istio(name: str) -> float:
        total = 0.0
        for family in text_string_to_metric_families(mesh.metrics("node1")):
            for s in family.samples:
                if (s.name == name and s.labels["source_workload"] == "client"
                        and s.labels["destination_service"] == "web-z0.default.svc.cluster.local"):
                    assert s.labels["reporter"] == "source"
                    assert s.labels["destination_workload"] == "web"
                    assert s.labels["source_principal"] == (
                        "spiffe://cluster.local/ns/default/sa/client")
                    total += s.value
        return total

    names = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
             "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")
    before = [istio(n) for n in names]
    transfer(mesh, "client-1", mesh.services["default/web-z0"].address(4), 3 * MB, 2 * MB,
             connections=3, parallel=3)
    time.sleep(0.3)
    after = [istio(n) for n in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        3, 3, 3 * (3 * MB + REQUEST_HEADER), 3 * (2 * MB + RESPONSE_HEADER)]


def test_metrics_pass_promtool(mesh: Cluster):
    result = subprocess.run(["promtool", "check", "metrics"], input=mesh.metrics("node0"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_admin_endpoints(mesh: Cluster):
    assert mesh.admin_get("node0", "/ready")[0] == 200
    pods = {p["name"]: p for p in mesh.admin_json("node0", "/pods")}
    assert set(pods) == {"client-0", "web-0"}
    assert pods["client-0"]["principal"] == "spiffe://cluster.local/ns/default/sa/client"
    dump = mesh.admin_json("node0", "/config_dump")
    assert len(dump["digest"]) == 64
    assert dump["config"]["node"]["name"] == "node0"


def test_a_resetting_client_affects_only_its_own_connection(mesh: Cluster):
    """A client that sends garbage and resets mid-stream; a concurrent transfer is intact."""
    vip = mesh.services["default/web-z1"].vip4
    abuser = textwrap.dedent(f"""
        import socket, struct, os
        for _ in range(20):
            s = socket.create_connection(({vip!r}, 80), 5)
            s.sendall(b"P" + os.urandom(200_000))   # garbage into an echo stream
            s.recv(1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()                               # RST mid-stream
            s = socket.create_connection(({vip!r}, 80), 5)
            s.sendall(os.urandom(5000))             # not a protocol the server speaks
            s.close()
        print("done")
    """)
    bad = mesh.spawn_in_pod("client-0", [mesh.python, "-c", abuser], stdout=subprocess.PIPE,
                            text=True)
    transfer(mesh, "client-0", f"{vip}:80", 30 * MB, 30 * MB, connections=4, parallel=2)
    out, _ = bad.communicate(timeout=60)
    assert out.strip() == "done"
    assert mesh.admin_get("node0", "/ready")[0] == 200
    transfer(mesh, "client-0", f"{vip}:80", MB, MB)


def test_a_client_reset_reaches_the_server_as_a_reset(mesh: Cluster):
    """RST propagates through the proxy: the server's read fails, it does not see a FIN."""
    server = mesh.spawn_in_pod("web-1", [mesh.python, "-c", textwrap.dedent("""
        import socket
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", 9300)); l.listen(); print("listening", flush=True)
        c, _ = l.accept(); c.settimeout(10)
        try:
            while c.recv(65536):
                pass
            print("FIN")
        except OSError as e:
            print(type(e).__name__)
    """)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    client = textwrap.dedent(f"""
        import socket, struct, time
        s = socket.create_connection(({mesh.pods['web-1'].ip4!r}, 9300), 5)
        s.sendall(b"x" * 100000); time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    """)
    mesh.run_in_pod("client-0", [mesh.python, "-c", client], timeout=20)
    out, _ = server.communicate(timeout=20)
    assert out.strip() == "ConnectionResetError"


def test_readiness_port(mesh: Cluster):
    node = mesh.nodes["node0"]
    status, body = netns.http_get(
        node.netns_path, f"http://127.0.0.1:{READINESS_PORT}/healthz/ready", 5)
    assert (status, body.strip()) == (200, "ready")


def test_identity_free_deny_is_refused_at_connect_in_the_source_pod(mesh: Cluster):
    web0 = mesh.pods["web-0"].ip4
    before = mesh.metrics("node0")
    captured = sample(before, "nodeproxy_kernel_connections_captured_total", pod_name="client-0")
    denied = connect(mesh, "client-0", web0, DENIED_PORT)
    after = mesh.metrics("node0")
    if mesh.capture_mode == "ebpf":
        # cgroup/connect4 refuses the connect() itself and counts it, per pod and policy.
        assert denied == "EPERM"
        assert sample(after, "nodeproxy_kernel_connect_denied_total", pod_name="client-0") > (
            sample(before, "nodeproxy_kernel_connect_denied_total", pod_name="client-0"))
        assert sample(after, "nodeproxy_kernel_policy_denials_total",
                      policy="*/no-web-9200") >= 1
    else:
        # By nature of netfilter: the pod's deny chain REJECTs the SYN with a TCP reset, so
        # connect() fails with ECONNREFUSED (no rule can make it EPERM); the rule keeps its
        # own count (iptables -L -v in the pod), the daemon exports none.
        assert denied == "ECONNREFUSED"
        assert "nodeproxy_kernel_connect_denied_total" not in after
    # Refused in the source pod's kernel: the proxy never saw it.
    assert sample(after, "nodeproxy_kernel_connections_captured_total",
                  pod_name="client-0") == captured
    # Other ports of the same pod, and other clients' ports, are unaffected.
    assert connect(mesh, "client-0", web0, PORT).startswith("connected {")
    assert connect(mesh, "bystander", web0, PORT).startswith("connected {")


def test_plaintext_from_outside_the_mesh_goes_through_the_inbound_proxy(mesh: Cluster):
    web0 = mesh.pods["web-0"]
    before = kernel(mesh, "node0", "nodeproxy_kernel_inbound_connections_captured_total",
                    "web-0")
    answer = whoami(mesh, "outsider", f"{web0.ip4}:{PORT}")
    assert answer["name"] == "web-0"
    # The application sees the real client, as it would without the mesh.
    assert answer["peer"].rsplit(":", 1)[0] == mesh.pods["outsider"].ip4
    after = kernel(mesh, "node0", "nodeproxy_kernel_inbound_connections_captured_total",
                   "web-0")
    assert after == before + 1
    answer = whoami(mesh, "outsider", f"[{web0.ip6}]:{PORT}")
    assert answer["name"] == "web-0"
    assert answer["peer"].rsplit(":", 1)[0].strip("[]") == mesh.pods["outsider"].ip6


def test_a_connection_to_the_inbound_port_itself_is_refused_not_relayed(mesh: Cluster):
    """Relaying it would dial the inbound listener again, and again, without end."""
    web0 = mesh.pods["web-0"].ip4
    for _ in range(3):
        assert not connect(mesh, "outsider", web0, INBOUND_PORT).startswith("connected {")
    assert mesh.admin_get("node0", "/ready")[0] == 200
    assert whoami(mesh, "outsider", f"{web0}:{PORT}")["name"] == "web-0"




def test_the_capture_mode_is_the_one_configured(mesh: Cluster):
    node = mesh.nodes["node0"]
    rules = netns.run(mesh.pods["client-0"].netns_path, ["iptables-save"]).stdout
    untouched = netns.run(mesh.pods["bystander"].netns_path, ["iptables-save"]).stdout
    assert "NODEPROXY" not in untouched
    if mesh.capture_mode == "ebpf":
        assert len(attached_programs(node.cgroup)) == 5  # connect4/6, getpeername4/6, sockops
        assert "NODEPROXY" not in rules
    else:
        # Only sockops (the kernel counters) is attached; the pod's rules do the capturing.
        assert len(attached_programs(node.cgroup)) == 1
        assert attached_programs(node.cgroup, (3,)) == attached_programs(node.cgroup)
        assert "-A OUTPUT -p tcp -j NODEPROXY_OUTPUT" in rules
        assert f"-A NODEPROXY_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}" in rules

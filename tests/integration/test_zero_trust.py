"""Zero trust on the simulated cluster: traffic between nodes is encrypted, every
connection carries a verified SPIFFE identity, bad certificates and garbage are
refused at the tunnel, inbound plaintext obeys peer authentication, and
authorization holds at the destination and, for identity-free DENY rules, in the
source pod's kernel.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.identity import tls
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.ports import HBONE_PORT
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum as sample
from tests.integration.probes import connect

pytestmark = pytest.mark.privileged

PORT = 7000
SECRET = "NODEPROXY-PLAINTEXT-MARKER-4b1d"




@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client-a", labels={"app": "client-a"}, service_account="alpha")
        c.add_pod("node0", "client-b", labels={"app": "client-b"}, service_account="beta")
        c.add_pod("node1", "web-1", labels={"app": "web"}, service_account="web")
        c.add_pod("node1", "strict-1", labels={"app": "strict"}, service_account="strict")
        c.add_pod("node1", "open-1", labels={"app": "open"}, service_account="open")
        c.add_pod("node1", "nomtls-1", labels={"app": "nomtls"}, service_account="nomtls")
        c.add_pod("node0", "guarded-0", labels={"app": "guarded"}, service_account="guarded")
        c.add_unenrolled_pod("node1", "stranger")
        c.add_service("web", port=80, target_port=PORT, selector={"app": "web"})
        c.add_service("guarded", port=80, target_port=PORT, selector={"app": "guarded"})
        for pod in ("web-1", "strict-1", "open-1", "nomtls-1", "guarded-0"):
            c.serve_peer(pod, PORT)
            c.serve_peer(pod, 9000)
        c.write_configs(overrides={
            "peerAuthentications": [
                {"name": "strict", "selector": {"app": "strict"}, "mode": "STRICT",
                 "portLevelMtls": {9000: "PERMISSIVE"}},
                {"name": "open", "selector": {"app": "open"}, "mode": "PERMISSIVE"},
                {"name": "nomtls", "selector": {"app": "nomtls"}, "mode": "DISABLE"},
            ],
            "authorizationPolicies": [
                # Only alpha may reach web; beta is denied at the destination.
                {"name": "web-from-alpha", "selector": {"app": "web"}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [
                     "cluster.local/ns/default/sa/alpha"]}}]}]},
                # Same node: only alpha may reach guarded (authorized on the netns identity).
                {"name": "guarded-from-alpha", "selector": {"app": "guarded"},
                 "action": "ALLOW", "rules": [{"from": [{"source": {"principals": [
                     "cluster.local/ns/default/sa/alpha"]}}]}]},
                # Identity-free: nobody may reach guarded's port 9000 -> compiled to the kernel.
                {"name": "no-guarded-9000", "selector": {"app": "guarded"}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]},
            ],
        })
        c.start_daemons()
        yield c


def test_traffic_between_nodes_is_encrypted(mesh: Cluster):
    """A raw packet socket on node0's link to node1 sees every byte that crosses it."""
    node = mesh.nodes["node0"]
    sniffer = netns.in_netns(node.netns_path, lambda: socket.socket(
        socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))  # ETH_P_ALL
    sniffer.bind(("nt1", 0))
    sniffer.settimeout(0.2)
    captured = bytearray()
    stop = threading.Event()

    def sniff() -> None:
        while not stop.is_set() and len(captured) < 50_000_000:
            try:
                captured.extend(sniffer.recv(65536))
            except TimeoutError:
                continue

    thread = threading.Thread(target=sniff)
    thread.start()
    try:
        script = (f"import socket; s = socket.create_connection(('{mesh.pods['web-1'].ip4}', "
                  f"{PORT}), 5); s.sendall(b'P' + b'{SECRET}' * 2000); "
                  f"s.shutdown(socket.SHUT_WR); n = 0\nwhile True:\n"
                  f"    d = s.recv(65536)\n    if not d: break\n    n += len(d)\nprint(n)")
        out = mesh.run_in_pod("client-a", [mesh.python, "-c", script], timeout=20)
        assert out.stdout.strip() == str(len(SECRET) * 2000), out.stderr
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        sniffer.close()
    assert len(captured) > 2 * len(SECRET) * 2000, "the link carried less than the echo"
    assert SECRET.encode() not in captured
    assert b"\x17\x03\x03" in captured  # TLS application-data records



@pytest.mark.parametrize(("send", "receive"), [(1, 0), (65_535, 1), (1_048_583, 70_000),
                                               (9 * 1024 * 1024 + 3, 9 * 1024 * 1024 + 5)])
def test_bytes_cross_nodes_intact_through_hbone(mesh: Cluster, send: int, receive: int):
    """Through HBONE's own DATA framing (past frame and stream-window sizes, both ways, two
    connections at once on the pooled tunnel): the peer verifies SHA-256 of every byte."""
    result = mesh.peer("client-a", "transfer", "--to",
                       f"{mesh.services['default/web'].vip4}:80", "--send", str(send),
                       "--receive", str(receive), "--connections", "2", "--parallel", "2",
                       "--timeout", "60", timeout=90)
    assert result["ok"] and result["exit_code"] == 0, result
    assert result["sha_mismatch"] == 0, result

def test_destination_sees_each_client_identity(mesh: Cluster):
    assert connect(mesh, "client-a", mesh.services["default/web"].vip4, 80).startswith(
        "connected {")
    metrics = mesh.metrics("node1")
    assert sample(metrics, "istio_tcp_connections_opened_total", reporter="destination",
                  source_principal="spiffe://cluster.local/ns/default/sa/alpha",
                  destination_principal="spiffe://cluster.local/ns/default/sa/web",
                  connection_security_policy="mutual_tls") >= 1


def test_authorization_at_the_destination_by_principal(mesh: Cluster):
    vip = mesh.services["default/web"].vip4
    assert connect(mesh, "client-a", vip, 80).startswith("connected")
    denied = connect(mesh, "client-b", vip, 80)
    assert not denied.startswith("connected {"), denied
    metrics = mesh.metrics("node1")
    assert sample(metrics, "nodeproxy_authorization_decisions_total", result="denied") >= 1
    assert sample(metrics, "nodeproxy_hbone_streams_total", side="server", result="denied") >= 1


def test_same_node_connections_are_authorized_too(mesh: Cluster):
    vip = mesh.services["default/guarded"].vip4
    assert connect(mesh, "client-a", vip, 80).startswith("connected {")
    assert not connect(mesh, "client-b", vip, 80).startswith("connected {")
    assert 'reason="denied"' in mesh.metrics("node0")


def test_identity_free_deny_is_refused_in_the_kernel(mesh: Cluster):
    guarded = mesh.pods["guarded-0"].ip4
    before = mesh.metrics("node0")
    captured = sample(before, "nodeproxy_kernel_connections_captured_total", pod_name="client-a")
    assert connect(mesh, "client-a", guarded, 9000) == "EPERM"
    after = mesh.metrics("node0")
    assert sample(after, "nodeproxy_kernel_connect_denied_total", pod_name="client-a") >= 1
    assert sample(after, "nodeproxy_kernel_policy_denials_total") >= 1
    # Refused before capture: the proxy never saw it.
    assert sample(after, "nodeproxy_kernel_connections_captured_total",
                  pod_name="client-a") == captured
    # Other ports of the same pod are unaffected.
    assert connect(mesh, "client-a", guarded, PORT).startswith("connected")


def test_peer_authentication_modes_for_plaintext_clients(mesh: Cluster):
    pods = mesh.pods
    # STRICT: plaintext from outside the mesh is refused...
    assert not connect(mesh, "stranger", pods["strict-1"].ip4, PORT).startswith("connected {")
    # ...except on the port-level PERMISSIVE override.
    assert connect(mesh, "stranger", pods["strict-1"].ip4, 9000).startswith("connected")
    # PERMISSIVE and DISABLE accept it, and the application sees the real client.
    for pod in ("open-1", "nomtls-1"):
        answer = connect(mesh, "stranger", pods[pod].ip4, PORT)
        assert answer.startswith("connected"), (pod, answer)
        assert json.loads(answer.split(" ", 1)[1])["peer"].startswith(pods["stranger"].ip4 + ":")
    metrics = mesh.metrics("node1")
    assert sample(metrics, "nodeproxy_peer_authentication_refused_total",
                  destination_workload="strict-1") >= 1
    assert sample(metrics, "nodeproxy_kernel_inbound_connections_captured_total",
                  pod_name="open-1") >= 1
    # Mesh clients reach a STRICT workload over mTLS.
    assert connect(mesh, "client-a", pods["strict-1"].ip4, PORT).startswith("connected")


def test_probes_from_the_node_pass_strict(mesh: Cluster):
    node = mesh.nodes["node1"]
    sock = netns.connect(node.netns_path, mesh.pods["strict-1"].ip4, PORT)
    try:
        sock.sendall(b"W")
        answer = json.loads(sock.recv(300))
        assert answer["name"] == "strict-1"
        assert answer["peer"].startswith(node.gateway4 + ":")
    finally:
        sock.close()


def _tls_client(mesh: Cluster, ca: MeshCA, identity_ns: str = "default",
                sa: str = "intruder", clock_offset: float = 0.0,
                trust_domain: str = "cluster.local") -> ssl.SSLContext:
    """A client presenting a leaf signed by `ca`, trusting the mesh's real root (so it is
    the server that must refuse it)."""
    manager = CertificateManager(ca, trust_domain, ttl_seconds=3600,
                                 clock=lambda: time.time() + clock_offset)
    leaf = manager.get(identity_ns, sa)
    mesh_root = open(mesh.ca_cert, "rb").read()
    return tls.build_context(leaf, mesh_root, server_side=False)


def _handshake(mesh: Cluster, context: ssl.SSLContext, pod: str = "web-1") -> str:
    """Open TLS to a pod's 15008 from node0; 'ok' or the error text."""
    raw = netns.connect(mesh.nodes["node0"].netns_path, mesh.pods[pod].ip4, HBONE_PORT)
    raw.settimeout(5)
    try:
        with context.wrap_socket(raw, server_hostname=None) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            # TLS 1.3: a refused client certificate shows up only now, as an alert or EOF;
            # an accepted one is answered with the server's HTTP/2 SETTINGS.
            return "ok" if s.recv(100) else "closed"
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"


def test_bad_client_certificates_are_refused_and_counted(mesh: Cluster):
    trusted = MeshCA.load(mesh.ca_cert, mesh.ca_key, "cluster.local")
    before = mesh.metrics("node1")
    ok = _handshake(mesh, _tls_client(mesh, trusted))
    assert ok == "ok"
    foreign = _handshake(mesh, _tls_client(mesh, MeshCA.generate("cluster.local")))
    expired = _handshake(mesh, _tls_client(mesh, trusted, clock_offset=-7200))
    other_domain = _handshake(mesh, _tls_client(mesh, MeshCA.generate("evil.example"),
                                                trust_domain="evil.example"))
    for result in (foreign, expired, other_domain):
        assert result != "ok"
    after = mesh.metrics("node1")

    def refused(reason: str) -> float:
        return (sample(after, "nodeproxy_hbone_handshakes_total", side="server", result=reason)
                - sample(before, "nodeproxy_hbone_handshakes_total", side="server",
                         result=reason))

    reasons = {s.labels["result"]: s.value for f in text_string_to_metric_families(after)
               for s in f.samples if s.name == "nodeproxy_hbone_handshakes_total"
               and s.labels["side"] == "server"}
    assert refused("untrusted_ca") >= 2, reasons  # foreign CA and the other domain's CA
    assert refused("expired") >= 1


def test_garbage_on_the_tunnel_port_is_refused_and_harms_nothing(mesh: Cluster):
    before = sample(mesh.metrics("node1"), "nodeproxy_hbone_handshakes_total", side="server",
                    result="protocol_error")
    raw = netns.connect(mesh.nodes["node0"].netns_path, mesh.pods["web-1"].ip4, HBONE_PORT)
    raw.settimeout(5)
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(500))
    try:
        raw.recv(100)  # the server closes it; what it sends first does not matter
    except OSError:
        pass
    raw.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = sample(mesh.metrics("node1"), "nodeproxy_hbone_handshakes_total", side="server",
                     result="protocol_error")
        if now > before:
            break
        time.sleep(0.1)
    assert now > before
    assert connect(mesh, "client-a", mesh.services["default/web"].vip4, 80).startswith(
        "connected")


def test_stream_to_a_destination_that_is_not_a_local_pod_is_refused(mesh: Cluster):
    """A valid client asks node1's tunnel for a pod that lives on node0: 404, counted."""
    import h2.connection
    import h2.events

    trusted = MeshCA.load(mesh.ca_cert, mesh.ca_key, "cluster.local")
    raw = netns.connect(mesh.nodes["node0"].netns_path, mesh.pods["web-1"].ip4, HBONE_PORT)
    raw.settimeout(5)
    manager = CertificateManager(trusted, "cluster.local", ttl_seconds=3600)
    with tls.client_context(manager, "default", "alpha").wrap_socket(
            raw, server_hostname=None) as s:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"),
                              (":authority", f"{mesh.pods['guarded-0'].ip4}:{PORT}")])
        s.sendall(conn.data_to_send())
        status = None
        deadline = time.monotonic() + 5
        while status is None and time.monotonic() < deadline:
            for event in conn.receive_data(s.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
            s.sendall(conn.data_to_send())
    assert status == b"404"
    assert sample(mesh.metrics("node1"), "nodeproxy_hbone_streams_total", side="server",
                  result="unknown_destination") >= 1


def test_pooled_tunnel_connections_are_reused(mesh: Cluster):
    before = sample(mesh.metrics("node0"), "nodeproxy_hbone_handshakes_total", side="client",
                    result="ok")
    result = mesh.peer("client-a", "transfer", "--to", f"{mesh.pods['open-1'].ip4}:{PORT}",
                       "--send", "1000", "--receive", "1000", "--connections", "50",
                       "--parallel", "5")
    assert result["ok"], result
    after = sample(mesh.metrics("node0"), "nodeproxy_hbone_handshakes_total", side="client",
                   result="ok")
    assert after - before <= 1  # one handshake (or none, if already pooled) for 50 connections


def test_certificate_metrics(mesh: Cluster):
    metrics = mesh.metrics("node0")
    expiry = sample(metrics, "nodeproxy_certificate_expiry_timestamp_seconds",
                    identity=spiffe_id("cluster.local", "default", "alpha"))
    assert time.time() < expiry < time.time() + 86400 + 120


def test_rotation_under_continuous_traffic_fails_no_connection():
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node1", "server", labels={"app": "server"}, service_account="server")
        c.add_service("server", port=80, target_port=PORT)
        c.serve_peer("server", PORT)
        # Leaves live 6 s and are renewed at half-life; the pool reconnects every 1 s idle.
        c.write_configs(overrides={"identity": {"certTtlSeconds": 6},
                                   "tunnel": {"idleTimeoutSeconds": 0.5,
                                              "keepaliveSeconds": 0.5}})
        c.start_daemons()
        result = c.peer("client", "load", "--to", c.services["default/server"].address(4),
                        "--mode", "transfer", "--send", "20000", "--receive", "20000",
                        "--duration", "10", "--rate", "40", "--concurrency", "4",
                        timeout=60)
        assert result["failed"] == 0 and result["succeeded"] >= 200, result
        for node in ("node0", "node1"):
            metrics = c.metrics(node)
            assert sample(metrics, "nodeproxy_certificate_rotations_total") >= 2, node


def test_a_stale_pooled_connection_does_not_fail_the_next_connection():
    """The destination node's daemon restarts: the pooled tunnel connection dies with it, and
    the next connection is carried on a fresh one."""
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node1", "server", labels={"app": "server"})
        c.add_service("server", port=80, target_port=PORT)
        c.serve_peer("server", PORT)
        c.write_configs()
        c.start_daemons()
        vip = c.services["default/server"].vip4
        assert connect(c, "client", vip, 80).startswith("connected {")
        node1 = c.nodes["node1"]
        assert node1.daemon is not None
        node1.daemon.kill()
        node1.daemon.wait(timeout=10)
        c.start_daemons(nodes=["node1"])
        for _ in range(5):
            assert connect(c, "client", vip, 80).startswith("connected {")
        assert sample(c.metrics("node0"), "nodeproxy_hbone_handshakes_total", side="client",
                      result="ok") == 2

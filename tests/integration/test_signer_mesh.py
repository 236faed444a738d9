"""Node daemons with no CA key: their workload certificates come from the mesh signing
service (`nodeproxy ca serve`), a process in the simulated cluster, and traffic between
the nodes rides on them; the service going away and coming back loses no connection.

The Kubernetes API the service asks (TokenReview, pods) is the suite's stand-in speaking
the documented protocol (tests/integration/fake_kube_api.py), listening inside node0's
netns; the service listens on node0's address on the link to node1, so both daemons
reach it over the simulated network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from nodeproxy_dev.testbed.signer_process import signer_argv, wait_listening
from tests.integration import fake_kube_api as kube
from tests.integration.observe import metric_sum as sample

pytestmark = pytest.mark.privileged

PORT = 7000
SIGNER_IP = "10.250.0.1"  # node0's end of the node0-node1 link
SIGNER_PORT = 15012
DNS = "nodeproxy-ca.test"
AUDIENCE = "nodeproxy-ca"
TTL = 90  # leaves live 150 s (60 s of clock-skew allowance): renewed 15 s after issue


class Mesh:
    def __init__(self, cluster: Cluster, api: kube.ApiThread):
        self.c = cluster
        self.api = api
        self.signer: subprocess.Popen[bytes] | None = None
        self.signer_log = os.path.join(cluster.dir, "signer.log")

    def start_signer(self) -> None:
        ca_dir = os.path.dirname(self.c.ca_cert)
        offset = os.path.getsize(self.signer_log) if os.path.exists(self.signer_log) else 0
        with open(self.signer_log, "ab") as log:
            self.signer = self.c.spawn_in_node("node0", signer_argv(
                self.c.python, ca_dir, trust_domain=self.c.trust_domain,
                listen=f"{SIGNER_IP}:{SIGNER_PORT}", kube_api=self.api.url, dns_name=DNS,
                audience=AUDIENCE, max_ttl_seconds=TTL), stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.signer, self.signer_log, offset)

    def stop_signer(self) -> None:
        assert self.signer is not None
        self.signer.terminate()
        self.signer.wait(10)
        self.signer = None

    def log(self) -> str:
        with open(self.signer_log, errors="replace") as f:
            return f.read()

    def ready_text(self, node: str) -> str:
        return self.c.admin_get(node, "/ready")[1]

    def wait(self, what: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Cluster(2) as c:
        c.add_pod("node0", "client-a", labels={"app": "client-a"}, service_account="alpha")
        c.add_pod("node1", "web-1", labels={"app": "web"}, service_account="web")
        c.add_service("web", port=80, target_port=PORT, selector={"app": "web"})
        c.serve_peer("web-1", PORT)
        api = kube.ApiThread.in_netns(c.nodes["node0"].netns_path)
        m = Mesh(c, api)
        try:
            per_node = {}
            for node in ("node0", "node1"):
                name = f"nodeproxy-{node}"
                pod = kube.pod(name, "nodeproxy-system", node=node, sa="nodeproxy",
                               host_network=True)
                api.do(api.api.put, "pods", pod)
                token = api.do(api.api.issue_token, f"token-{node}",
                               namespace="nodeproxy-system", service_account="nodeproxy",
                               pod_name=name, pod_uid=pod["metadata"]["uid"],
                               audiences=[AUDIENCE])
                token_path = os.path.join(c.dir, f"{node}.token")
                with open(token_path, "w") as f:
                    f.write(token)
                per_node[node] = {"identity": {"signer": {"tokenPath": token_path}}}
            for name, node, sa in (("client-a", "node0", "alpha"), ("web-1", "node1", "web")):
                api.do(api.api.put, "pods", kube.pod(name, node=node, sa=sa,
                                                     ip=c.pods[name].ip4))
            m.start_signer()
            c.write_configs(overrides={"identity": {
                "caKey": None, "certTtlSeconds": TTL,
                "signer": {"address": f"https://{SIGNER_IP}:{SIGNER_PORT}",
                           "serverName": DNS, "retrySeconds": 1}}}, per_node=per_node)
            c.start_daemons()
            yield m
        finally:
            if m.signer is not None:
                m.stop_signer()
            api.close()


def transfer(mesh: Mesh, connections: int = 5) -> dict[str, Any]:
    return mesh.c.peer("client-a", "transfer", "--to",
                       f"{mesh.c.services['default/web'].vip4}:80", "--send", "2000",
                       "--receive", "2000", "--connections", str(connections),
                       "--parallel", "2")


def test_nodes_hold_no_ca_key_and_get_their_pods_identities(mesh: Mesh) -> None:
    for node in ("node0", "node1"):
        identity = mesh.c.admin_json(node, "/config_dump")["config"]["identity"]
        assert identity.get("caKey") is None
        assert mesh.ready_text(node).splitlines() == ["ready", "signer: available"]
    result = transfer(mesh)
    assert result["ok"], result
    log = mesh.log()
    assert f"signed spiffe://{mesh.c.trust_domain}/ns/default/sa/alpha for node node0" in log
    assert f"signed spiffe://{mesh.c.trust_domain}/ns/default/sa/web for node node1" in log
    assert sample(mesh.c.metrics("node0"), "nodeproxy_hbone_handshakes_total", side="client",
                  result="ok") >= 1


def test_signer_outage_and_restart_lose_no_connection(mesh: Mesh) -> None:
    """Traffic runs while the service is stopped across a renewal and started again: every
    connection verifies, the daemons say the signer is away meanwhile, and renew after."""
    load = mesh.c.spawn_in_pod("client-a", mesh.c.peer_argv(
        "load", "--to", f"{mesh.c.services['default/web'].vip4}:80", "--mode", "transfer",
        "--send", "2000", "--receive", "2000", "--duration", "30", "--rate", "10",
        "--concurrency", "4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        mesh.stop_signer()
        # The next renewal (15 s after issue) finds no signer: said in /ready and metrics.
        mesh.wait(lambda: "signer: unavailable" in mesh.ready_text("node1"), timeout=40)
        assert sample(mesh.c.metrics("node1"), "nodeproxy_identity_signer_up") == 0
        assert sample(mesh.c.metrics("node1"), "nodeproxy_identity_signer_failures_total",
                      reason="unavailable") >= 1
        assert mesh.c.admin_get("node1", "/ready")[0] == 200  # still serving
        mesh.start_signer()
        mesh.wait(lambda: "signer: available" in mesh.ready_text("node1"), timeout=30)
        out, err = load.communicate(timeout=90)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(5)
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["ok"], (result, err.decode()[-2000:])
    assert result.get("failed", 0) == 0, result
    assert sample(mesh.c.metrics("node1"), "nodeproxy_identity_signer_up") == 1
    assert sample(mesh.c.metrics("node1"), "nodeproxy_certificate_rotations_total") >= 1

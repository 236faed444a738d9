"""The daemon with Kubernetes discovery on, against a fake API server that speaks the
documented list/watch protocol (no API server runs here; tests/integration/fake_kube_api.py).

The fake server listens inside the node's network namespace, where the daemon lives.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration import fake_kube_api as kube
from tests.integration.probes import connect

pytestmark = pytest.mark.privileged

PORT = 7000
VIP = "10.96.7.7"


def put_peer_service(api: kube.ApiThread, web_ip: str, vip: str = VIP) -> None:
    """Service api-web (vip, port 80) and its EndpointSlice: web_ip's PORT on node0."""
    api.do(api.api.put, "services", kube.service(
        "api-web", vips=[vip], ports=[{"name": "tcp-peer", "port": 80,
                                       "targetPort": PORT, "protocol": "TCP"}]))
    api.do(api.api.put, "endpointslices", kube.endpoint_slice(
        "api-web-1", "api-web", ports=[{"name": "tcp-peer", "port": PORT, "protocol": "TCP"}],
        endpoints=[kube.slice_endpoint(web_ip, node="node0")]))


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster, kube.ApiThread]]:
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node0", "web-0", enroll=False)
        c.add_pod("node0", "optout", enroll=False)
        c.serve_peer("web-0", PORT)
        api = kube.ApiThread.in_netns(c.nodes["node0"].netns_path)
        try:
            web_ip = c.pods["web-0"].ip4
            api.do(api.api.put, "namespaces", kube.namespace(
                "default", {"istio.io/dataplane-mode": "ambient"}))
            api.do(api.api.put, "pods", kube.pod("web-0", ip=web_ip, node="node0", sa="web",
                                                 labels={"app": "web"}))
            api.do(api.api.put, "pods", kube.pod(
                "optout", ip=c.pods["optout"].ip4, node="node0",
                labels={"nodeproxy.io/dataplane-mode": "none"}))
            # The peer protocol is not HTTP: the port is named as Istio's convention
            # says (a port named "http" would be parsed as HTTP).
            put_peer_service(api, web_ip)
            c.write_configs(overrides={"discovery": {"kubernetes": True,
                                                     "apiServer": api.url}})
            c.start_daemons()
            yield c, api
        finally:
            c.stop_daemons()
            api.close()


def enroll_minimal(c: Cluster, name: str) -> dict:
    """What the CNI plugin sends: no service account, no labels."""
    pod = c.pods[name]
    body = {"name": name, "namespace": "default", "netns": pod.netns_path,
            "cgroup": pod.cgroup, "ips": pod.ips}
    status, text = netns.unix_http(c.nodes["node0"].control_socket, "POST", "/v1/pods",
                                   json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
    assert status == 200, text
    return json.loads(text)


def test_services_and_endpoints_come_from_the_api(cluster):
    c, api = cluster
    answer = connect(c, "client", VIP, 80)
    assert answer.startswith("connected {") and '"name": "web-0"' in answer
    # A change in the API reaches the running daemon through the watch.
    api.do(api.api.delete, "services", "default/api-web")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and connect(c, "client", VIP, 80).startswith("connected"):
        time.sleep(0.3)
    assert not connect(c, "client", VIP, 80).startswith("connected {")


def test_identity_and_labels_of_a_cni_enrolled_pod_come_from_the_api(cluster):
    c, _ = cluster
    enroll_minimal(c, "web-0")
    pods = {p["name"]: p for p in c.admin_json("node0", "/pods")}
    assert pods["web-0"]["principal"] == "spiffe://cluster.local/ns/default/sa/web"
    assert pods["web-0"]["workload"] == "web"


def test_a_pod_that_opts_out_is_not_enrolled(cluster):
    c, _ = cluster
    answer = enroll_minimal(c, "optout")
    assert answer.get("skipped") == "default/optout"
    assert "optout" not in {p["name"] for p in c.admin_json("node0", "/pods")}
    status, text = netns.unix_http(c.nodes["node0"].control_socket, "GET",
                                   "/v1/pods/default/optout")
    assert status == 200 and "skipped" in text

"""Operating a running daemon: policy hot reload (SIGHUP and ConfigMap-style symlink swaps),
refusal of a bad policy with the last good one kept, and pods enrolled at run time
surviving a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import wait_for
from tests.integration.probes import connect, echo_conversation

pytestmark = pytest.mark.privileged

PORT = 7000


def reloads(c: Cluster, result: str) -> float:
    for family in text_string_to_metric_families(c.metrics("node0")):
        for s in family.samples:
            if s.name == "nodeproxy_config_reload_total" and s.labels["result"] == result:
                return s.value
    return 0.0




@pytest.fixture
def node() -> Iterator[Cluster]:
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "admin", labels={"app": "admin"}, service_account="admin")
        c.add_pod("node0", "web-0", labels={"app": "web"}, service_account="web")
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        c.write_configs()
        c.start_daemons()
        yield c


def rewrite(c: Cluster, change) -> None:
    path = c.nodes["node0"].config_path
    doc = yaml.safe_load(open(path))
    change(doc)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)


def hup(c: Cluster) -> None:
    daemon = c.nodes["node0"].daemon
    assert daemon is not None
    daemon.send_signal(signal.SIGHUP)


def revoked(c: Cluster) -> float:
    for family in text_string_to_metric_families(c.metrics("node0")):
        for s in family.samples:
            if s.name == "nodeproxy_connections_revoked_total":
                return s.value
    return 0.0


def test_sighup_applies_a_new_policy_resets_what_it_denies_and_keeps_the_rest(node: Cluster):
    """Two long conversations through the same service: the new policy allows the admin's
    and no longer the client's.  The admin's goes on, every byte intact; the client's is
    reset at once (as ztunnel closes what a policy update denies), and new connections
    from the client are refused."""
    c = node
    vip = c.services["default/web"].vip4
    assert connect(c, "client", vip, 80).startswith("connected {")
    digest = c.admin_json("node0", "/config_dump")["digest"]
    slow = echo_conversation(vip, rounds=25, block=10_000)
    doomed = c.spawn_in_pod("client", [c.python, "-c", slow], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    kept = c.spawn_in_pod("admin", [c.python, "-c", slow], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert revoked(c) == 0
    rewrite(c, lambda doc: doc.update(authorizationPolicies=[{
        "name": "web-only-from-admin", "selector": {"app": "web"}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/admin"]}}]}],
    }]))
    hup(c)
    assert wait_for(lambda: reloads(c, "applied") == 1)
    assert c.admin_json("node0", "/config_dump")["digest"] != digest
    assert not connect(c, "client", vip, 80).startswith("connected {")  # new policy in force
    out, err = kept.communicate(timeout=30)
    assert out.strip() == "intact", err  # the allowed connection went on
    out, err = doomed.communicate(timeout=30)
    assert doomed.returncode != 0 and "ConnectionResetError" in err, (out, err)
    assert revoked(c) == 1
    log = c.daemon_output("node0")
    assert "reset 1 connection(s) spiffe://cluster.local/ns/default/sa/client" in log
    assert "no longer allowed by policy" in log


def test_a_bad_policy_is_refused_and_the_last_good_one_stays(node: Cluster):
    c = node
    vip = c.services["default/web"].vip4
    digest = c.admin_json("node0", "/config_dump")["digest"]
    path = c.nodes["node0"].config_path
    good = open(path).read()
    with open(path, "w") as f:
        f.write(good + "\nmesh: {outboundPolicy: SOMETIMES}\n  bad: [indent\n")
    hup(c)
    assert wait_for(lambda: reloads(c, "rejected") >= 1)
    assert c.admin_json("node0", "/config_dump")["digest"] == digest
    assert connect(c, "client", vip, 80).startswith("connected {")
    assert f"reload (sighup) of {path} refused" in c.daemon_output("node0")
    # A valid file that changes what only a restart can change is refused too.
    with open(path, "w") as f:
        f.write(good.replace("drainSeconds: 2.0", "drainSeconds: 3.0"))
    hup(c)
    assert wait_for(lambda: "proxy changed, which takes effect only" in c.daemon_output("node0"))
    assert c.admin_json("node0", "/config_dump")["digest"] == digest
    assert c.ready("node0")


def test_a_configmap_symlink_swap_is_noticed_without_a_signal(node: Cluster):
    """Kubernetes updates a ConfigMap volume by swapping the `..data` symlink."""
    c = node
    n = c.nodes["node0"]
    # Lay the config out as a ConfigMap volume: node.yaml -> ..data/node.yaml, ..data -> v1.
    volume = os.path.join(c.dir, "configmap")
    for version in ("v1", "v2"):
        os.makedirs(os.path.join(volume, version))
    doc = yaml.safe_load(open(n.config_path))
    yaml.safe_dump(doc, open(os.path.join(volume, "v1", "node.yaml"), "w"))
    os.symlink("v1", os.path.join(volume, "..data"))
    os.symlink("..data/node.yaml", os.path.join(volume, "node.yaml"))
    c.stop_daemons()
    n.config_path = os.path.join(volume, "node.yaml")
    c.start_daemons()
    c.serve_peer("web-0", 7100)
    doc["services"].append({"name": "late", "namespace": "default", "vips": ["10.96.9.9"],
                            "ports": [{"port": 80, "targetPort": 7100}],
                            "selector": {"app": "web"}})
    yaml.safe_dump(doc, open(os.path.join(volume, "v2", "node.yaml"), "w"))
    os.symlink("v2", os.path.join(volume, "..data_tmp"))
    os.replace(os.path.join(volume, "..data_tmp"), os.path.join(volume, "..data"))
    assert wait_for(lambda: reloads(c, "applied") == 1, timeout=10)
    assert connect(c, "client", "10.96.9.9", 80).startswith("connected {")


def test_pods_enrolled_at_run_time_survive_a_restart(node: Cluster):
    c = node
    c.add_pod("node0", "late", labels={"app": "late"})  # enrolled through the control socket
    vip = c.services["default/web"].vip4
    assert connect(c, "late", vip, 80).startswith("connected {")
    assert c.stop_daemons() == {"node0": 0}
    # Without the daemon, the pod is out of the mesh.
    assert connect(c, "late", vip, 80) == "EHOSTUNREACH"
    c.start_daemons()
    names = {p["name"]: p["source"] for p in c.admin_json("node0", "/pods")}
    assert names.get("late") == "runtime"
    assert connect(c, "late", vip, 80).startswith("connected {")

"""The daemon's life: enroll and unenroll at run time, pods that vanish, drain on SIGTERM,
what a crash leaves and what a restart does, and that nothing stays in the kernel after.

Each test builds its own small cluster, since most of them stop or kill daemons.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum
from tests.integration.probes import (
    DAEMON_CGROUP_ATTACH_TYPES,
    attached_programs,
    connect,
    sigterm_drains,
)

pytestmark = pytest.mark.privileged

PORT = 7000
MB = 1_000_000


@pytest.fixture
def one_node() -> Iterator[Cluster]:
    """node0 with a client, a server behind service `web`, and its daemon not started yet."""
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        yield c


def pins(c: Cluster, node: str) -> list[str]:
    root = os.path.join(c.nodes[node].bpffs, "nodeproxy")
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_registry_only_refuses_unknown_destinations(one_node: Cluster):
    c = one_node
    c.add_unenrolled_pod("node0", "outside")
    c.serve_peer("outside", PORT)
    c.write_configs(overrides={"mesh": {"outboundPolicy": "REGISTRY_ONLY"}})
    c.start_daemons()
    assert connect(c, "client", c.services["default/web"].vip4, 80).startswith("connected")
    assert connect(c, "client", c.pods["web-0"].ip4, PORT).startswith("connected")
    # Not a service and not a mesh pod: refused (reset), never reached.
    result = connect(c, "client", c.pods["outside"].ip4, PORT)
    assert result in ("ECONNRESET", "connected"), f"unknown destination reached: {result}"
    assert 'reason="registry_only"' in c.metrics("node0")


def test_unenroll_at_run_time_stops_capture_and_enroll_restores_it(one_node: Cluster):
    c = one_node
    c.write_configs()
    c.start_daemons()
    vip = c.services["default/web"].vip4
    assert connect(c, "client", vip, 80).startswith("connected")
    c.unenroll("client")
    assert [p["name"] for p in c.admin_json("node0", "/pods")] == ["web-0"]
    assert connect(c, "client", vip, 80) == "EHOSTUNREACH"  # no capture: VIP is not routable
    # Direct traffic still flows, with the pod's own address.
    answer = connect(c, "client", c.pods["web-0"].ip4, PORT)
    assert c.pods["client"].ip4 in answer
    c.enroll("client")
    assert connect(c, "client", vip, 80).startswith("connected")


def test_runtime_enroll_refuses_bad_requests(one_node: Cluster):
    c = one_node
    c.write_configs()
    c.start_daemons()
    sock = c.nodes["node0"].control_socket
    status, body = netns.unix_http(sock, "POST", "/v1/pods", b'{"name": "x", "ips": ["nope"]}',
                                   {"Content-Type": "application/json"})
    assert status == 400 and "ips[0]" in body and "not a valid IP address" in body
    status, body = netns.unix_http(sock, "POST", "/v1/pods", b"garbage")
    assert status == 400 and "not JSON" in body
    taken = dict(c.pods["client"].workload("node0"), name="impostor")
    status, body = netns.unix_http(sock, "POST", "/v1/pods", json.dumps(taken).encode(),
                                   {"Content-Type": "application/json"})
    assert status == 409 and "already" in body
    # The daemon and its pods are unaffected.
    assert connect(c, "client", c.services["default/web"].vip4, 80).startswith("connected")


def test_a_vanished_pod_is_unenrolled_and_others_keep_flowing(one_node: Cluster):
    c = one_node
    c.add_pod("node0", "doomed", labels={"app": "client"})
    c.write_configs()
    c.start_daemons()
    assert {p["name"] for p in c.admin_json("node0", "/pods")} == {"client", "web-0", "doomed"}
    target = c.services["default/web"].address(4)
    long_transfer = c.spawn_in_pod("client", c.peer_argv(
        "transfer", "--to", target, "--send", str(200 * MB), "--receive", str(200 * MB),
        "--timeout", "60"), stdout=subprocess.PIPE, text=True)
    netns.delete(c.pods["doomed"].netns)  # the runtime deleted the pod without a CNI DEL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if {p["name"] for p in c.admin_json("node0", "/pods")} == {"client", "web-0"}:
            break
        time.sleep(0.2)
    else:
        pytest.fail("vanished pod still enrolled: " + c.daemon_output("node0"))
    out, _ = long_transfer.communicate(timeout=90)
    assert '"ok": true' in out, out
    assert 'cause="netns_vanished"' in c.metrics("node0")


def test_sigterm_drains_open_connections_then_removes_everything(one_node: Cluster):
    c = one_node
    c.write_configs(overrides={"proxy": {"drainSeconds": 20}})
    c.start_daemons()
    node = c.nodes["node0"]
    assert attached_programs(node.cgroup), "capture programs should be attached while running"
    assert len(attached_programs(node.daemon_cgroup, DAEMON_CGROUP_ATTACH_TYPES)) == 1
    assert pins(c, "node0")
    vip = c.services["default/web"].vip4
    # A slow echo conversation over 3 s, checked byte for byte, drains through SIGTERM;
    # new connections are refused at once.
    sigterm_drains(c, "node0", "client", vip)
    assert attached_programs(node.cgroup) == []
    assert attached_programs(node.daemon_cgroup, DAEMON_CGROUP_ATTACH_TYPES) == []
    assert pins(c, "node0") == []
    assert not os.path.exists(node.control_socket)
    # After a clean exit pods are out of the mesh: the VIP is no longer captured.
    assert connect(c, "client", vip, 80) == "EHOSTUNREACH"


def test_crash_fails_closed_and_a_restart_takes_over(one_node: Cluster):
    c = one_node
    c.write_configs()
    c.start_daemons()
    node = c.nodes["node0"]
    vip = c.services["default/web"].vip4
    assert connect(c, "client", vip, 80).startswith("connected")
    assert node.daemon is not None
    node.daemon.kill()
    node.daemon.wait(timeout=10)
    # Capture is still pinned: the pod's connects are refused at once, not leaked or hung.
    started = time.monotonic()
    assert connect(c, "client", vip, 80) == "ECONNREFUSED"
    assert time.monotonic() - started < 3
    assert attached_programs(node.cgroup)
    c.start_daemons()
    assert "removed state left by an earlier instance" in c.daemon_output("node0")
    assert connect(c, "client", vip, 80).startswith("connected")
    assert len(attached_programs(node.cgroup)) == 5  # the old links are gone, not doubled
    assert len(attached_programs(node.daemon_cgroup, DAEMON_CGROUP_ATTACH_TYPES)) == 1
    assert c.stop_daemons() == {"node0": 0}
    assert attached_programs(node.cgroup) == []
    assert attached_programs(node.daemon_cgroup, DAEMON_CGROUP_ATTACH_TYPES) == []
    assert pins(c, "node0") == []


def test_fail_open_crash_leaves_pods_talking_directly(one_node: Cluster):
    c = one_node
    c.write_configs(overrides={"capture": {"onCrash": "fail_open"}})
    c.start_daemons()
    node = c.nodes["node0"]
    assert node.daemon is not None
    node.daemon.kill()
    node.daemon.wait(timeout=10)
    assert attached_programs(node.cgroup) == []
    answer = connect(c, "client", c.pods["web-0"].ip4, PORT)
    assert c.pods["client"].ip4 in answer


def test_start_up_objects_are_frozen_and_the_collectors_pauses_counted(one_node: Cluster):
    """Once ready, the daemon's start-up objects (imports, config, policies, the first
    snapshot: tens of thousands) are out of the cyclic collector's passes, and the
    passes it still makes while connections come and go are timed per generation."""
    c = one_node
    c.start_daemons()
    before = c.metrics("node0")
    assert metric_sum(before, "nodeproxy_gc_frozen_objects") > 20_000
    for _ in range(30):
        assert connect(c, "client", c.services["default/web"].vip4, 80).startswith("connected")
    after = c.metrics("node0")
    assert metric_sum(after, "python_gc_collections_total", generation="2") >= 1  # the freeze's
    assert (metric_sum(after, "python_gc_collections_total", generation="0")
            > metric_sum(before, "python_gc_collections_total", generation="0"))
    assert (metric_sum(after, "nodeproxy_gc_pause_seconds_total", generation="0")
            > metric_sum(before, "nodeproxy_gc_pause_seconds_total", generation="0"))
    assert 0 < metric_sum(after, "nodeproxy_gc_longest_pause_seconds", generation="2") < 5

"""The testbed itself, no daemon: pod networking, blackholed VIPs, configs, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from nodeproxy.config.model import NodeConfig, cross_check
from nodeproxy_dev.testbed import cgroups, netns, peer
from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster, sweep_leftovers

pytestmark = [
    pytest.mark.privileged,
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.add_pod("node0", "server", labels={"app": "echo"})
        c.add_pod("node0", "local-client", labels={"app": "client"})
        c.add_pod("node1", "remote-client", labels={"app": "client"}, service_account="client")
        c.add_unenrolled_pod("node1", "outsider")
        c.add_service("echo", port=7000)
        c.serve_peer("server", 7000)
        yield c


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def assert_gone(run_id: str, pids: Sequence[int] = ()) -> None:
    prefix = f"npt-{run_id}"
    assert not [n for n in netns.list_names() if n.startswith(prefix)]
    assert not os.path.exists(os.path.join(cgroups.cgroup2_mount(), prefix))
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), prefix))
    with open("/proc/mounts") as f:
        assert prefix not in f.read()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} survived"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("client", ["local-client", "remote-client", "outsider"])
def test_pod_to_pod_transfer_by_pod_ip(cluster: Cluster, client: str, family: int) -> None:
    server = cluster.pods["server"]
    to = f"{server.ip4}:7000" if family == 4 else f"[{server.ip6}]:7000"
    out = cluster.peer(client, "transfer", "--to", to, "--send", "3M", "--receive", "5M",
                       "--connections", "4", "--timeout", "20")
    assert out["ok"], out
    assert out["sha_mismatch"] == 0
    assert (out["sent"], out["received"]) == (4 * 3 << 20, 4 * 5 << 20)


def test_cni_check_passes_for_wired_pods(cluster: Cluster) -> None:
    for pod in cluster.pods.values():
        cluster.nodes[pod.node].network.check(pod.netns, pod.netns_path, pod.cni_result)
    assert cluster.pods["server"].ips[0].startswith("10.244.0.")
    assert cluster.pods["remote-client"].ips[1].startswith("fd00:10:244:1::")


def test_whoami_sees_the_client_pod_ip(cluster: Cluster) -> None:
    server, client = cluster.pods["server"], cluster.pods["remote-client"]
    out = cluster.peer(client, "whoami", "--to", f"[{server.ip6}]:7000")
    assert out["peer"].startswith(f"[{client.ip6}]:")
    assert out["name"] == "server"
    out = cluster.peer(client, "whoami", "--to", f"{server.ip4}:7000")
    assert out["peer"].startswith(f"{client.ip4}:")


@pytest.mark.parametrize("family", [4, 6])
def test_vip_connect_fails_at_once_without_daemon(cluster: Cluster, family: int) -> None:
    service = cluster.services["default/echo"]
    out = cluster.peer("remote-client", "transfer", "--to", service.address(family), "--send", "1",
                       "--timeout", "5")
    assert not out["ok"]
    assert out["elapsed_s"] < 0.5, out
    assert "No route to host" in out["errors"][0] or "unreachable" in out["errors"][0]


@pytest.mark.parametrize("vip", ["10.96.0.10", "fd00:10:96::a", "10.96.255.254"])
def test_vip_range_is_unreachable_in_node_netns(cluster: Cluster, vip: str) -> None:
    node = cluster.nodes["node0"]
    route = subprocess.run(["ip", "-n", node.netns, "route", "get", vip], capture_output=True,
                           text=True)
    assert route.returncode != 0 or "unreachable" in route.stdout
    started = time.monotonic()
    with pytest.raises(OSError):
        netns.connect(node.netns, vip, 80, timeout=3.0).close()
    assert time.monotonic() - started < 0.5


def test_nodes_have_no_way_out(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        for family in ("-4", "-6"):
            routes = subprocess.run(["ip", "-n", node.netns, family, "route", "show", "default"],
                                    capture_output=True, text=True, check=True)
            assert routes.stdout.strip() == ""
    out = cluster.peer("local-client", "transfer", "--to", "192.0.2.1:80", "--timeout", "3")
    assert not out["ok"] and out["elapsed_s"] < 0.5, out


def test_configs_validate_against_the_model(cluster: Cluster) -> None:
    paths = cluster.write_configs()
    for node_name, path in paths.items():
        config = NodeConfig.model_validate(yaml.safe_load(Path(path).read_text()))
        assert cross_check(config) == []
        assert config.node.name == node_name
        assert config.node.pod_cgroup == cluster.nodes[node_name].cgroup
        with open("/proc/mounts") as f:  # a private bpffs per node
            assert f"bpf {config.node.bpffs} bpf " in f.read()
        names = {w.name for w in config.workloads}
        assert names == {"server", "local-client", "remote-client"}  # not the outsider
        for w in config.workloads:
            pod = cluster.pods[w.name]
            if pod.node == node_name:
                assert w.node is None and os.path.exists(w.netns or "")
                assert os.path.isdir(w.cgroup or "")
            else:
                assert w.node == pod.node and w.netns is None
        assert [s.name for s in config.services] == ["echo"]
        assert config.services[0].selector == {"app": "echo"}


def test_processes_land_in_pod_cgroup_and_netns(cluster: Cluster) -> None:
    pod, outsider = cluster.pods["local-client"], cluster.pods["outsider"]
    cg_root = cgroups.cgroup2_mount()
    for p, expect_cgroup in ((pod, pod.cgroup), (outsider, None)):
        proc = cluster.spawn_in_pod(p, ["sleep", "30"])
        try:
            time.sleep(0.2)
            cgroup_line = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
            v2 = next(line for line in cgroup_line if line.startswith("0::"))[3:]
            if expect_cgroup:
                assert os.path.join(cg_root, v2.lstrip("/")) == expect_cgroup
            else:
                assert f"npt-{cluster.run_id}" not in v2
            assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(p.netns_path).st_ino
        finally:
            proc.kill()
            proc.wait()


def test_stream_verifier_catches_corruption() -> None:
    for length in (0, 1, 65535, 65536, 65537, 3 * 65536 + 17):
        data = b"".join(peer.Stream(b"s" * 16, length).chunks())
        assert len(data) == length
        ok = peer.Verifier(peer.Stream(b"s" * 16, length))
        for i in range(0, length, 1000):
            ok.feed(data[i:i + 1000])
        assert ok.complete
        if length:
            bad = bytearray(data)
            bad[length // 2] ^= 1
            v = peer.Verifier(peer.Stream(b"s" * 16, length))
            v.feed(bytes(bad))
            assert not v.complete
    blocks = [peer.Stream(b"x" * 16, 1 << 20).block(i) for i in range(3)]
    assert len(set(blocks)) == 3  # reordering is visible


def test_cluster_leaves_nothing_behind() -> None:
    links_before = root_links()
    with Cluster() as c:
        c.add_pod("node0", "a")
        c.add_pod("node1", "b")
        c.add_unenrolled_pod("node1", "c")
        pids = [c.spawn_in_pod(p, ["sleep", "60"]).pid for p in ("a", "b", "c")]
        pids.append(c.spawn_in_node("node0", ["sleep", "60"]).pid)
        time.sleep(0.1)
        run_id = c.run_id
    assert c.teardown_errors == []
    assert_gone(run_id, pids)
    assert root_links() == links_before


def test_cluster_cleans_up_on_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster() as c:
            c.add_pod("node0", "a")
            pid = c.spawn_in_pod("a", ["sleep", "60"]).pid
            raise RuntimeError("boom")
    assert_gone(c.run_id, [pid])


SCRIPT = textwrap.dedent("""
    import sys, time
    from nodeproxy_dev.testbed.cluster import Cluster
    with Cluster() as c:
        c.add_pod("node0", "a")
        c.add_pod("node1", "b")
        c.spawn_in_pod("a", ["sleep", "60"])
        print(c.run_id, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_down(sig: signal.Signals) -> None:
    # SIGINT at its default, as a shell gives a foreground program (Ctrl-C), also when
    # this run was started with SIGINT ignored (a background job, nohup): a Python
    # started with it ignored never sees a KeyboardInterrupt.
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, "-c", SCRIPT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        # The teardown takes about a second; the margin is for a busy machine.
        proc.wait(120)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_gone(run_id)


def test_sweep_removes_what_a_killed_run_left() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    assert run_id
    proc.kill()  # no chance to clean up
    proc.wait()
    assert any(n.startswith(f"npt-{run_id}") for n in netns.list_names())
    removed = sweep_leftovers()
    assert any(f"npt-{run_id}" in r for r in removed), json.dumps(removed)
    assert_gone(run_id)

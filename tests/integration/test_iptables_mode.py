"""The daemon's life in iptables capture mode: the pods' rules follow enrollment, go at
shutdown, stay after a crash (failing closed) and are replaced cleanly by the next
instance; denies follow a reload; and where no eBPF program can be set up the daemon
still captures, without kernel counters.

Each test builds its own one-node cluster, since most of them stop or kill the daemon.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.capture.bpf_build import HEADERS, SOURCES
from nodeproxy.ports import OUTBOUND_PORT
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.probes import attached_programs, connect, sigterm_drains

pytestmark = pytest.mark.privileged

PORT = 7000


@pytest.fixture
def one_node() -> Iterator[Cluster]:
    """node0 in iptables mode: a client, a server behind `web`, the daemon not started."""
    with Cluster(1, capture_mode="iptables") as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        yield c


def rules(c: Cluster, pod: str, tool: str = "iptables-save") -> str:
    return netns.run(c.pods[pod].netns_path, [tool]).stdout


def tables(c: Cluster, pod: str) -> list[str]:
    out = netns.run(c.pods[pod].netns_path, ["nft", "list", "tables"]).stdout
    return out.split("\n") if out.strip() else []


def assert_clean(c: Cluster, pod: str) -> None:
    """Nothing of ours in the pod, and no table left behind either."""
    for tool in ("iptables-save", "ip6tables-save"):
        assert "NODEPROXY" not in rules(c, pod, tool)
    assert tables(c, pod) == []


def sample(c: Cluster, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(c.metrics("node0")):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_rules_follow_enrollment_and_sigterm_removes_them(one_node: Cluster):
    c = one_node
    c.write_configs(overrides={"proxy": {"drainSeconds": 20}})
    c.start_daemons()
    node = c.nodes["node0"]
    vip = c.services["default/web"].vip4
    for pod in ("client", "web-0"):
        for tool in ("iptables-save", "ip6tables-save"):
            assert f"-j REDIRECT --to-ports {OUTBOUND_PORT}" in rules(c, pod, tool), (pod, tool)
    assert connect(c, "client", vip, 80).startswith("connected {")
    # Unenrolled: the pod is exactly as before the mesh, and the VIP is not captured.
    c.unenroll("client")
    assert_clean(c, "client")
    assert connect(c, "client", vip, 80) == "EHOSTUNREACH"
    assert c.pods["client"].ip4 in connect(c, "client", c.pods["web-0"].ip4, PORT)
    c.enroll("client")
    assert rules(c, "client").count("-A OUTPUT -p tcp -j NODEPROXY_OUTPUT\n") == 1
    assert connect(c, "client", vip, 80).startswith("connected {")
    # SIGTERM: the open conversation drains, new connects are refused at once.
    sigterm_drains(c, "node0", "client", vip)
    for pod in ("client", "web-0"):
        assert_clean(c, pod)
    assert attached_programs(node.cgroup) == []
    assert connect(c, "client", vip, 80) == "EHOSTUNREACH"


def test_a_crash_fails_closed_and_the_next_instance_replaces_the_rules(one_node: Cluster):
    c = one_node
    c.write_configs()
    c.start_daemons()
    node = c.nodes["node0"]
    vip = c.services["default/web"].vip4
    assert node.daemon is not None
    node.daemon.kill()
    node.daemon.wait(timeout=10)
    # The rules are the pods', not the process's: connects go on being redirected, to a
    # port nobody listens on any more, and are refused at once.
    started = time.monotonic()
    assert connect(c, "client", vip, 80) == "ECONNREFUSED"
    assert time.monotonic() - started < 3
    c.start_daemons()
    assert connect(c, "client", vip, 80).startswith("connected {")
    for tool in ("iptables-save", "ip6tables-save"):
        saved = rules(c, "client", tool)
        for jump in ("-A OUTPUT -j NODEPROXY_NOTRACK", "-A OUTPUT -p tcp -j NODEPROXY_OUTPUT",
                     "-A PREROUTING -p tcp -j NODEPROXY_PREROUTING",
                     "-A OUTPUT -p tcp -j NODEPROXY_DENY"):
            assert saved.count(jump + "\n") == 1, (tool, jump, saved)
        assert saved.count(f"-j REDIRECT --to-ports {OUTBOUND_PORT}") == 1
    assert c.stop_daemons() == {"node0": 0}
    assert_clean(c, "client")


def test_denies_follow_a_reload(one_node: Cluster):
    c = one_node
    c.serve_peer("web-0", 9000)
    c.write_configs()
    c.start_daemons()
    web0 = c.pods["web-0"]
    assert connect(c, "client", web0.ip4, 9000).startswith("connected {")
    path = Path(c.nodes["node0"].config_path)
    doc = yaml.safe_load(path.read_text())
    doc["authorizationPolicies"] = [
        {"name": "no-9000", "namespace": "default", "selector": {"app": "web"},
         "action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}]
    path.write_text(yaml.safe_dump(doc))
    assert c.nodes["node0"].daemon is not None
    c.nodes["node0"].daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "NODEPROXY_DENY -p tcp" not in rules(c, "client", "ip6tables-save"):
        assert time.monotonic() < deadline, c.daemon_output("node0")
        time.sleep(0.1)
    # Refused in the client's own netns, for both of web-0's addresses, and only there.
    assert connect(c, "client", web0.ip4, 9000) == "ECONNREFUSED"
    assert connect(c, "client", web0.ip6, 9000) == "ECONNREFUSED"
    assert '--comment "default/no-9000"' in rules(c, "client")
    assert connect(c, "client", web0.ip4, PORT).startswith("connected {")
    doc.pop("authorizationPolicies")
    path.write_text(yaml.safe_dump(doc))
    c.nodes["node0"].daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "NODEPROXY_DENY -p tcp" in rules(c, "client"):
        assert time.monotonic() < deadline, c.daemon_output("node0")
        time.sleep(0.1)
    assert connect(c, "client", web0.ip4, 9000).startswith("connected {")


def test_without_ebpf_programs_capture_goes_on_without_kernel_counters(
        one_node: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A kernel (or machine) where sockops cannot be set up: here the C sources do not
    compile.  iptables mode still captures and proxies; the per-pod TCP counters are
    what is lost, and captured connections are counted by the proxy."""
    broken = tmp_path / "bpf"
    broken.mkdir()
    for name in (*SOURCES, *HEADERS):
        (broken / name).write_text("this is not C;\n")
    monkeypatch.setenv("NODEPROXY_BPF_DIR", str(broken))
    c = one_node
    c.write_configs()
    c.start_daemons()
    assert "iptables capture runs without kernel counters" in c.daemon_output("node0")
    vip = c.services["default/web"].vip4
    for _ in range(3):
        assert connect(c, "client", vip, 80).startswith("connected {")
    assert sample(c, "nodeproxy_kernel_connections_captured_total", pod_name="client") == 3
    assert sample(c, "nodeproxy_kernel_tcp_connections_opened_total", pod_name="client",
                  direction="outbound") is None
    assert attached_programs(c.nodes["node0"].cgroup) == []
    assert not os.path.exists(os.path.join(c.nodes["node0"].bpffs, "nodeproxy", "node0"))
    assert c.stop_daemons() == {"node0": 0}
    assert_clean(c, "client")

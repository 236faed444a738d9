"""`nodeproxy uninstall` on a real kernel: what a SIGKILLed daemon leaves, and removing it.

Runs the command as a separate process (``python -m nodeproxy.cli.uninstall``, the
same module ``nodeproxy uninstall`` dispatches to) from the host, with the node's
private bpffs and control socket.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster
from tests.integration.probes import attached_programs, connect

pytestmark = pytest.mark.privileged

PORT = 7000
# connect4/6, getpeername4/6, sock_ops: the attach types of the capture programs.
ATTACH_TYPES = (10, 11, 29, 30, 3)


def pinned_files(c: Cluster, node: str) -> list[str]:
    bpffs = c.nodes[node].bpffs
    assert bpffs is not None
    return [os.path.join(d, f) for d, _, files in os.walk(os.path.join(bpffs, "nodeproxy"))
            for f in files]


def uninstall(c: Cluster, node: str, *extra: str) -> subprocess.CompletedProcess[str]:
    n = c.nodes[node]
    assert n.bpffs is not None
    argv = [c.python, "-m", "nodeproxy.cli.uninstall", "--node", n.name, "--bpffs", n.bpffs,
            "--control-socket", n.control_socket, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env=c.child_env())


@pytest.fixture
def one_node() -> Iterator[Cluster]:
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        c.write_configs()
        c.start_daemons()
        yield c


def test_uninstall_after_a_crash_detaches_capture(one_node: Cluster):
    c = one_node
    node = c.nodes["node0"]
    vip = c.services["default/web"].vip4
    assert connect(c, "client", vip, 80).startswith("connected")
    assert node.daemon is not None
    node.daemon.kill()
    node.daemon.wait(timeout=10)
    node.daemon = None
    # fail_closed: the pinned links keep capturing; connects are refused.
    assert connect(c, "client", vip, 80) == "ECONNREFUSED"
    assert len(attached_programs(node.cgroup)) == 5
    pins = pinned_files(c, "node0")

    done = uninstall(c, "node0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    links = sorted(p for p in pins if "/links/" in p)
    assert len(links) >= 5  # the cgroup programs, and inbound capture per pod netns
    assert sorted(line.removeprefix("removed pinned link ") for line in lines
                  if line.startswith("removed pinned link ")) == links, done.stdout
    assert any(line.startswith("removed pinned map ") for line in lines), done.stdout
    assert sorted(line.split()[-1] for line in lines) == sorted(pins)
    # Nothing is attached any more: the pod talks directly, outside the mesh.
    assert attached_programs(node.cgroup) == []
    assert pinned_files(c, "node0") == []
    assert connect(c, "client", vip, 80) == "EHOSTUNREACH"
    # ... and into a pod without inbound capture: the server sees the client itself.
    assert c.pods["client"].ip4 in connect(c, "client", c.pods["web-0"].ip4, PORT)
    # Idempotent.
    again = uninstall(c, "node0")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to remove", again.stdout


def test_uninstall_refuses_while_the_daemon_runs(one_node: Cluster):
    c = one_node
    node = c.nodes["node0"]
    before = pinned_files(c, "node0")
    refused = uninstall(c, "node0")
    assert refused.returncode == 1
    assert "a daemon is running" in refused.stderr and node.control_socket in refused.stderr
    assert pinned_files(c, "node0") == before
    assert connect(c, "client", c.services["default/web"].vip4, 80).startswith("connected")
    # A clean stop removes everything by itself: nothing is left to uninstall.
    assert c.stop_daemons() == {"node0": 0}
    done = uninstall(c, "node0")
    assert done.returncode == 0 and done.stdout.strip() == "nothing to remove", done.stdout


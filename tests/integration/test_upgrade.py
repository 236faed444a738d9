"""Zero-downtime upgrade: a new daemon instance takes over a node under continuous traffic.

The new instance compiles and attaches its programs on the same pinned maps, opens its
listeners beside the old ones (SO_REUSEPORT), enrolls the same pods (with the same kernel
ids), then asks the old instance to hand over; the old one stops accepting, detaches its
programs and drains.  Nothing may fail and no byte may be lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster, scaled
from tests.integration.probes import attached_programs, connect, echo_conversation

pytestmark = pytest.mark.privileged

PORT = 7000
LOAD_SECONDS = 8  # the load runs at least this long, and on until the handover is over


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
@pytest.mark.parametrize("upgraded", ["node0", "node1"],
                         ids=["client-side-node", "server-side-node"])
def test_upgrade_under_continuous_traffic_fails_nothing(upgraded: str, mode: str):
    """node0 holds the clients; node1 only serves, through the HBONE tunnel.  In iptables
    mode the new instance installs the pods' rules over the old one's (the same rules, in
    one transaction) and the old one leaves them in place when it hands over."""
    with Cluster(2, capture_mode=mode) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-0", labels={"app": "web"}, service_account="web")
        c.add_pod("node1", "web-1", labels={"app": "web"}, service_account="web")
        for pod in ("web-0", "web-1"):
            c.serve_peer(pod, PORT)
        c.add_service("web", port=80, target_port=PORT)
        c.write_configs(overrides={"proxy": {"drainSeconds": 15},
                                   "inbound": {"probeSnat": {}}})
        c.start_daemons()
        c.add_pod("node0", "late", labels={"app": "client"})  # enrolled at run time (CNI)
        node = c.nodes[upgraded]
        vip = c.services["default/web"].vip4
        target = c.services["default/web"].address(4)

        # Both run into the handover, however long the new instance takes to start
        # (minutes under emulation): the conversation (one connection, through the old
        # instance) ends once the new one has taken over, the load once the old one has
        # drained.
        took_over = os.path.join(c.dir, "took-over")
        started = time.monotonic()
        load = c.spawn_in_pod("client", c.peer_argv(
            "load", "--to", target, "--mode", "transfer", "--send", "50000", "--receive",
            "50000", "--duration", str(LOAD_SECONDS + scaled(120)), "--rate", "60",
            "--concurrency", "8"), stdout=subprocess.PIPE, text=True)
        conversation = c.spawn_in_pod(
            "late", [c.python, "-c", echo_conversation(vip, rounds=50, block=20_000,
                                                      until=took_over, limit=scaled(180))],
            stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)

        old = node.daemon
        assert old is not None
        with open(node.daemon_log + ".new", "ab") as log:
            new = subprocess.Popen(c.daemon_argv(upgraded), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=REPO_ROOT, env=c.child_env(), start_new_session=True)
        node.daemon = new  # the cluster stops the new one at the end
        # The old instance hands over, drains, and idles until told to stop (as a
        # DaemonSet's old pod is, once the new one is ready).
        # Bounds the new instance's start (compiling its programs) and the handover.
        deadline = time.monotonic() + scaled(120)
        while "drained after handover" not in c.daemon_output(upgraded, tail=100_000):
            assert time.monotonic() < deadline, c.daemon_output(upgraded)
            assert old.poll() is None, "the old instance exited by itself"
            if not os.path.exists(took_over) and "taking over from it" in open(
                    node.daemon_log + ".new").read():
                assert conversation.poll() is None, "the conversation ended before the handover"
                open(took_over, "w").close()
            time.sleep(0.2)
        old.terminate()
        assert old.wait(timeout=scaled(30)) == 0, c.daemon_output(upgraded)

        # The load was still running when the old instance had drained; now it ends.
        assert os.path.exists(took_over) and load.poll() is None, "the load ended too early"
        time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
        load.send_signal(signal.SIGINT)  # stops issuing, finishes what is in flight
        load_out, _ = load.communicate(timeout=scaled(60))
        conversation_out, _ = conversation.communicate(timeout=scaled(60))
        summary = json.loads(load_out.strip().splitlines()[-1])
        print("upgrade under load:", {k: summary[k] for k in ("requests", "succeeded", "failed")})
        assert summary["failed"] == 0, summary
        assert summary["succeeded"] >= 300, summary
        assert conversation_out.strip() == "intact"

        log_text = open(node.daemon_log + ".new").read()
        assert "taking over from it" in log_text, log_text[-3000:]
        assert new.poll() is None
        # One set of programs attached, not two; the runtime pod is still meshed.
        assert len(attached_programs(node.cgroup)) == (5 if mode == "ebpf" else 1)
        if mode == "iptables":
            for pod in (p for p in c.pods.values() if p.node == upgraded):
                rules = netns.run(pod.netns_path, ["iptables-save"]).stdout
                assert rules.count("-j NODEPROXY_OUTPUT\n") == 1, (pod.name, rules)
        if upgraded == "node0":
            pods = {p["name"]: p["source"] for p in c.admin_json("node0", "/pods")}
            assert pods.get("late") == "runtime" and "client" in pods
        for _ in range(4):  # both endpoints, through the new instance
            assert connect(c, "late", vip, 80).startswith("connected {")
        # The node's probe SNAT chain: the old instance left it to the new one, which
        # rewrote it with its own pods (one jump, one rule per enrolled pod address).
        nat = netns.run(node.netns_path, ["iptables-save", "-t", "nat"]).stdout
        assert nat.count("-A POSTROUTING -j NODEPROXY_PROBE_SNAT\n") == 1, nat
        assert sorted(line.split()[3] for line in nat.splitlines()
                      if line.startswith("-A NODEPROXY_PROBE_SNAT ")) == sorted(
            f"{p.ip4}/32" for p in c.pods.values() if p.node == upgraded), nat
        assert c.stop_daemons()[upgraded] == 0
        assert len(attached_programs(node.cgroup)) == 0
        assert "NODEPROXY" not in netns.run(node.netns_path, ["iptables-save"]).stdout
        for pod in c.pods.values():
            assert "NODEPROXY" not in netns.run(pod.netns_path, ["iptables-save"]).stdout

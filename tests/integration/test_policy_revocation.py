"""A policy put in force resets the open connections it no longer allows, on every path a
connection is admitted (daemon/revocation.py): across nodes (the destination node judges
its HBONE streams again) and same node with the splice on (the kernel moves the bytes;
the proxy still resets both ends).  A connection the new policy still allows goes on with
every byte intact.  (Relayed same-node flows, asleep or awake, and plaintext from outside
the mesh: test_relay_sleep.py and test_reload.py.)"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster, scaled
from tests.integration.observe import metric_sum, wait_for
from tests.integration.policy_reload import reload_with
from tests.integration.probes import echo_conversation

pytestmark = pytest.mark.privileged

PORT = 7000
DENY_CLIENT = [{"name": "cut", "namespace": "default", "action": "DENY",
                "selector": {"app": "web"},
                "rules": [{"from": [{"source": {
                    "principals": ["cluster.local/ns/default/sa/client"]}}]}]}]


def revoked(c: Cluster, node: str) -> float:
    return metric_sum(c.metrics(node), "nodeproxy_connections_revoked_total")


def conversations(c: Cluster, vip: str) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """A slow echo conversation from the client (to be denied) and one from the admin
    (still allowed), both long enough to outlive the reload."""
    slow = echo_conversation(vip, rounds=60, block=20_000)
    procs = tuple(c.spawn_in_pod(pod, [c.python, "-c", slow], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                  for pod in ("client", "admin"))
    time.sleep(1.0)  # both are exchanging
    return procs  # type: ignore[return-value]


def settle(doomed: subprocess.Popen[str], kept: subprocess.Popen[str]) -> None:
    try:
        out, err = kept.communicate(timeout=scaled(60))
        assert out.strip() == "intact", err
        out, err = doomed.communicate(timeout=scaled(30))
        assert doomed.returncode != 0 and "ConnectionResetError" in err, (out, err)
    finally:
        doomed.kill()
        kept.kill()


def cluster(nodes: int, web_node: str, overrides: dict[str, Any] | None = None
            ) -> Iterator[Cluster]:
    """The client and the admin on node0, web-0 behind service web on ``web_node``."""
    with Cluster(nodes) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "admin", labels={"app": "admin"}, service_account="admin")
        c.add_pod(web_node, "web-0", labels={"app": "web"}, service_account="web")
        c.add_service("web", port=80, target_port=PORT, app_protocol="tcp")
        c.serve_peer("web-0", PORT)
        c.write_configs(overrides=overrides)
        c.start_daemons()
        yield c


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    yield from cluster(2, "node1")


def test_the_destination_node_resets_the_hbone_streams_a_new_policy_denies(
        two_nodes: Cluster) -> None:
    c = two_nodes
    doomed, kept = conversations(c, c.services["default/web"].vip4)
    assert revoked(c, "node1") == 0
    reload_with(c, "node1", DENY_CLIENT)  # the destination's policy
    settle(doomed, kept)
    assert revoked(c, "node1") == 1
    log = c.daemon_output("node1")
    assert ("reset 1 connection(s) spiffe://cluster.local/ns/default/sa/client" in log
            and "by policy default/cut" in log), log[-3000:]


@pytest.fixture
def spliced() -> Iterator[Cluster]:
    yield from cluster(1, "node0", {"fastPath": {"splice": True}})


def test_spliced_flows_a_new_policy_denies_are_reset(spliced: Cluster) -> None:
    c = spliced
    def spliced_flows() -> float:
        return metric_sum(c.metrics("node0"), "nodeproxy_splice_flows_total", event="spliced")

    before = spliced_flows()
    doomed, kept = conversations(c, c.services["default/web"].vip4)
    assert wait_for(lambda: spliced_flows() >= before + 2, 10), "not spliced"
    reload_with(c, "node0", DENY_CLIENT)
    settle(doomed, kept)
    assert revoked(c, "node0") == 1

"""What the tests that change a running daemon's policies share: rewrite a node's file
with new authorization policies and SIGHUP it, returning once the daemon applied it.  A
pod whose netns an earlier test deleted leaves the file too, as it would leave the
cluster's pod list (the daemon refuses a file naming a netns that does not exist)."""

from __future__ import annotations

import os
import signal

import yaml

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum, wait_for


def reload_with(c: Cluster, node: str, policies: list[dict[str, object]]) -> None:
    path = c.nodes[node].config_path
    with open(path) as f:
        doc = yaml.safe_load(f)
    doc["authorizationPolicies"] = policies
    doc["workloads"] = [w for w in doc.get("workloads", [])
                        if not w.get("netns") or os.path.exists(w["netns"])]
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    applied = metric_sum(c.metrics(node), "nodeproxy_config_reload_total", result="applied")
    daemon = c.nodes[node].daemon
    assert daemon is not None
    daemon.send_signal(signal.SIGHUP)
    assert wait_for(lambda: metric_sum(c.metrics(node), "nodeproxy_config_reload_total",
                                       result="applied") > applied, 20), \
        c.daemon_output(node, 20000)[-3000:]

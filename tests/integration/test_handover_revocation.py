"""A policy put in force during an upgrade reaches the connections the old instance is
still draining: the old instance keeps reading the node file after it handed the node
over, judges its open connections by the new version, and resets the ones refused
(daemon/lifecycle.py `_judge_draining`), while writing nothing of the kernel's state,
which is the new instance's.  Without it a connection admitted before the handover ran
unjudged for as long as `proxy.drainSeconds` (up to an hour).

Placements: the destination pod on the upgraded node with the client beside it, and the
destination node of an HBONE stream (the node that judges it) being upgraded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster, scaled
from tests.integration.policy_reload import reload_with
from tests.integration.probes import connect, echo_conversation
from tests.integration.test_policy_revocation import DENY_CLIENT, cluster

pytestmark = pytest.mark.privileged

DRAIN_SECONDS = 600  # far longer than the test: only the judgement can end the doomed one


def wait_in_log(c: Cluster, node: str, path: str, text: str, seconds: float) -> None:
    deadline = time.monotonic() + scaled(seconds)
    while text not in open(path).read():
        assert time.monotonic() < deadline, (text, c.daemon_output(node)[-3000:])
        time.sleep(0.2)


@pytest.mark.parametrize("nodes,web_node", [(1, "node0"), (2, "node1")],
                         ids=["same-node", "destination-node-across"])
def test_connections_draining_after_a_handover_are_judged_by_a_new_policy(
        nodes: int, web_node: str) -> None:
    with contextmanager(cluster)(nodes, web_node,
                                 {"proxy": {"drainSeconds": DRAIN_SECONDS}}) as c:
        vip = c.services["default/web"].vip4
        node = c.nodes[web_node]
        done = os.path.join(c.dir, "conversations-done")
        script = echo_conversation(vip, rounds=10, block=20_000, until=done,
                                   limit=scaled(240))
        doomed, kept = (c.spawn_in_pod(pod, [c.python, "-c", script], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
                        for pod in ("client", "admin"))
        old = node.daemon
        assert old is not None
        old_log = node.daemon_log
        try:
            time.sleep(1.0)  # both are exchanging, through the old instance
            with open(node.daemon_log + ".new", "ab") as log:
                new = subprocess.Popen(c.daemon_argv(web_node), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=REPO_ROOT, env=c.child_env(),
                                       start_new_session=True)
            node.daemon = new  # the cluster stops the new one at the end
            wait_in_log(c, web_node, old_log, "handed over to a new instance", 120)
            assert doomed.poll() is None and kept.poll() is None  # both still draining

            # The DENY goes into the node file; the new instance applies it (and has no
            # connection of the client's to reset), the old one is asked too.
            reload_with(c, web_node, DENY_CLIENT)
            old.send_signal(signal.SIGHUP)
            wait_in_log(c, web_node, old_log, "judged again by the new version", 30)
            _, err = doomed.communicate(timeout=scaled(30))
            assert doomed.returncode != 0 and "ConnectionResetError" in err, err
            open(done, "w").close()
            out, err = kept.communicate(timeout=scaled(60))
            assert out.strip() == "intact", err
            text = open(old_log).read()
            assert ("reset 1 connection(s) spiffe://cluster.local/ns/default/sa/client"
                    in text and "by policy default/cut" in text), text[-3000:]
            # The new instance refuses the client's new connections by the same policy.
            assert not connect(c, "client", vip, 80).startswith("connected")
            assert connect(c, "admin", vip, 80).startswith("connected {")
            # The old instance stops cleanly, and what it leaves removes none of the new
            # instance's denies: the client's new connections are still refused.
            assert old.poll() is None, "the old instance exited by itself"
            old.terminate()
            assert old.wait(timeout=scaled(30)) == 0, c.daemon_output(web_node)[-3000:]
            assert not connect(c, "client", vip, 80).startswith("connected")
        finally:
            open(done, "w").close()
            for proc in (doomed, kept):
                proc.kill()
            if old.poll() is None:
                old.kill()
                old.wait()

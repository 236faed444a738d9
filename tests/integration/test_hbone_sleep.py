"""Cross-node flows asleep (tcp/half_sleep.py): over HBONE, a quiet flow's relay gives up
its socket's transport at the source node (the client's socket) and at the destination
node (the server's), and wakes on the first byte, FIN or reset from either application
or on what the tunnel stream reports, with nothing lost.

Two nodes, the client (and the admin) on node0, web-0 on node1, the shipped defaults.
Each test waits for both daemons' own count of sleeps (nodeproxy_relay_sleeps_total)
before each step, so a flow that never sleeps at either end fails it; asserted is what a
user notices: SHA-256 of every byte after each sleep, both ways at once, a FIN reaching
the other end after the bytes before it, and a policy revoked at the destination
resetting an asleep flow at both ends while an allowed one sleeps on and still carries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed.cluster import Cluster, scaled
from tests.integration.observe import metric_sum, wait_for
from tests.integration.policy_reload import reload_with
from tests.integration.sleeping import serve_script, spawn_script
from tests.integration.test_relay_sleep import (
    LAST_WORD,
    RECV_EXACT,
    outcomes,
    quiet_pair,
    reset_after,
)

pytestmark = pytest.mark.privileged

PORT = 7000
MB = 1_000_000
NODES = ("node0", "node1")


@pytest.fixture(scope="module")
def nodes() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "admin", labels={"app": "admin"}, service_account="admin")
        c.add_pod("node1", "web-0", labels={"app": "web"}, service_account="web")
        c.add_service("web", port=80, target_port=PORT, app_protocol="tcp")
        c.serve_peer("web-0", PORT)
        c.write_configs()
        c.start_daemons()
        yield c


def sample(c: Cluster, node: str, name: str) -> float:
    return metric_sum(c.metrics(node), name)


def sleeps(c: Cluster) -> dict[str, float]:
    return {n: sample(c, n, "nodeproxy_relay_sleeps_total") for n in NODES}


def await_sleeps(c: Cluster, since: dict[str, float], k: int) -> None:
    """At least k more sleeps on each node."""
    assert wait_for(lambda: all(sleeps(c)[n] - since[n] >= k for n in NODES), 30), (
        k, sleeps(c), since)


def test_an_asleep_cross_node_flow_wakes_intact_both_ways_at_once_and_on_a_fin(
        nodes: Cluster):
    c, n = nodes, 4 * MB
    port = 9600
    phase = os.path.join(c.dir, "hbone-phase")
    server = serve_script(c, "web-0", RECV_EXACT, f"""
        import threading
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", {port})); l.listen(); print("listening", flush=True)
        c, _ = l.accept(); c.settimeout(60)
        c.sendall(b"hello")
        for round in (1, 2):                               # both at once, twice
            data = os.urandom({n} * round)
            t = threading.Thread(target=c.sendall, args=(data,)); t.start()
            got = read_digest(c, {n} * round); t.join(); c.sendall(got)
            assert recv_exact(c, 32) == hashlib.sha256(data).digest(), round
        rest = c.recv(1)                                   # the client's FIN
        c.sendall(b"after your FIN"); c.shutdown(socket.SHUT_WR)
        print("served", repr(rest), flush=True)
    """)
    slept = sleeps(c)
    client = spawn_script(c, "client", RECV_EXACT, f"""
        import threading
        s = socket.create_connection(({c.pods['web-0'].ip4!r}, {port}), 5)
        s.settimeout(60); assert recv_exact(s, 5) == b"hello"
        for round in (1, 2):
            wait_phase({phase!r} + str(round))
            data = os.urandom({n} * round)
            t = threading.Thread(target=s.sendall, args=(data,)); t.start()
            got = read_digest(s, {n} * round); t.join(); s.sendall(got)
            assert recv_exact(s, 32) == hashlib.sha256(data).digest(), round
        wait_phase({phase!r} + "3")
        s.shutdown(socket.SHUT_WR); tail = b""
        while chunk := s.recv(100):
            tail += chunk
        print("done", tail.decode(), flush=True)
    """)
    try:
        for k in (1, 2, 3):  # asleep at both ends before each round and before the FIN
            await_sleeps(c, slept, k)
            open(phase + str(k), "w").close()
        out, err = client.communicate(timeout=scaled(120))
        served, _ = server.communicate(timeout=scaled(30))
    finally:
        client.kill()
        server.kill()
    assert client.returncode == 0 and out.strip() == "done after your FIN", (out, err)
    assert served.strip() == "served b''"
    for node in NODES:
        assert sample(c, node, "nodeproxy_relay_wakes_total") >= 3


def test_a_policy_revoked_at_the_destination_resets_an_asleep_cross_node_flow(
        nodes: Cluster):
    """The destination node judges its streams again (daemon/revocation.py): the asleep
    flow the DENY names is reset at both applications; the admin's sleeps on and its
    reset still reaches the server."""
    c = nodes
    slept = sleeps(c)
    revoked = sample(c, "node1", "nodeproxy_connections_revoked_total")
    doomed = quiet_pair(c, 9601, "client", LAST_WORD, LAST_WORD)
    spared_path = os.path.join(c.dir, "hbone-spared")
    spared = quiet_pair(c, 9602, "admin", reset_after(spared_path), LAST_WORD)
    try:
        await_sleeps(c, slept, 2)
        reload_with(c, "node1", [{
            "name": "cut", "namespace": "default", "action": "DENY",
            "selector": {"app": "web"}, "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/default/sa/client"]}}]}]}])
        assert outcomes(*doomed) == ["ConnectionResetError", "ConnectionResetError"]
        assert sample(c, "node1", "nodeproxy_connections_revoked_total") == revoked + 1
        assert sample(c, "node1", "nodeproxy_relays_asleep") >= 1  # the spared flow
        open(spared_path, "w").close()
        assert sorted(outcomes(*spared)) == ["ConnectionResetError", "reset"]
    finally:
        for proc in (*doomed, *spared):
            proc.kill()
        reload_with(c, "node1", [])
    assert wait_for(lambda: all(sample(c, n, "nodeproxy_relays_asleep") == 0
                                for n in NODES), 10)

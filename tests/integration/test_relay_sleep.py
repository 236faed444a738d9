"""Relayed flows asleep (tcp/relay_sleep.py): a quiet relay gives up its transports and
wakes on the first byte, FIN or reset, with nothing lost.

One node with the shipped defaults (fastPath.splice off: Python relays same-node flows,
with the sk_msg fast path between the application and the proxy), in each capture mode:
ebpf, and iptables, the mode that runs where eBPF capture cannot (Debian 11's 5.10, where
no eBPF program loads and the relay is all Python's: docs/kernels.md).  Each test waits
for the daemon's own count of sleeps (nodeproxy_relay_sleeps_total) before each step, so
a relay that never sleeps fails it; what is asserted is what a user notices: SHA-256 of
every byte after each sleep, in each direction and both at once, FIN and reset reaching
the other end, the idle timeout and a vanished pod ending asleep flows, and the byte
series (Istio's and the kernel's per-pod counters) equal to what was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed.cluster import Cluster, scaled
from tests.integration.observe import metric_sum, wait_for
from tests.integration.policy_reload import reload_with
from tests.integration.sleeping import serve_script, spawn_script

pytestmark = pytest.mark.privileged

PORT = 7000
MB = 1_000_000
# The route a client takes to web-0: a meshed pod's outbound listener (same node, sk_msg)
# or, from outside the mesh, the destination pod's inbound plaintext listener.
CLIENTS = {"outbound": "client", "inbound": "outsider"}

RECV_EXACT = """
def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(min(1 << 16, n - len(out))); assert chunk, len(out); out += chunk
    return out
def read_digest(s, n):
    got = hashlib.sha256(); size = 0
    while size < n:
        chunk = s.recv(min(1 << 16, n - size)); assert chunk, size
        got.update(chunk); size += len(chunk)
    return got.digest()
"""


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def node(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster(1, capture_mode=request.param) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "leaving", labels={"app": "leaving"}, service_account="leaving")
        c.add_pod("node0", "web-0", labels={"app": "web"}, service_account="web")
        c.add_unenrolled_pod("node0", "outsider")
        c.add_service("web", port=80, target_port=PORT, app_protocol="tcp")
        c.serve_peer("web-0", PORT)
        c.write_configs()  # the defaults: splice off, sk_msg on
        c.start_daemons()
        yield c


def sample(c: Cluster, name: str, **labels: str) -> float:
    return metric_sum(c.metrics("node0"), name, **labels)


def sleeps(c: Cluster) -> float:
    return sample(c, "nodeproxy_relay_sleeps_total")


def wakes(c: Cluster) -> float:
    return sample(c, "nodeproxy_relay_wakes_total")


def asleep(c: Cluster) -> float:
    return sample(c, "nodeproxy_relays_asleep")


def await_sleeps(c: Cluster, since: float, k: int) -> None:
    assert wait_for(lambda: sleeps(c) - since >= k, 30), (
        k, sleeps(c) - since, c.daemon_output("node0", 20000)[-2000:])


def bytes_series(c: Cluster) -> dict[str, float]:
    """Every byte the proxy relayed (Istio's series) and the client pod's kernel counters."""
    names = ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")
    kernel = ("nodeproxy_kernel_tcp_sent_bytes_total",
              "nodeproxy_kernel_tcp_received_bytes_total")
    out = {n: sample(c, n) for n in names}
    out.update({n: sample(c, n, pod_name="client", direction="outbound") for n in kernel})
    out["msg"] = sample(c, "nodeproxy_kernel_fastpath_msg_redirect_bytes_total")
    return out


@pytest.mark.parametrize("route", list(CLIENTS))
def test_a_sleeping_relay_wakes_intact_each_way_both_at_once_and_on_a_fin(
        node: Cluster, route: str):
    """Four times asleep on one connection: bytes client to server, server to client,
    both at once (each side's bytes wake the flow in the same moment), then the client's
    FIN, which the server answers before its own.  SHA-256 intact every time, and the
    byte series equal to what each side sent."""
    n = 4 * MB
    port = 9500 if route == "outbound" else 9501
    phase = os.path.join(node.dir, f"relay-{route}-phase")
    server = serve_script(node, "web-0", RECV_EXACT, f"""
        import threading
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", {port})); l.listen(); print("listening", flush=True)
        c, _ = l.accept(); c.settimeout(60)
        c.sendall(b"hello")
        c.sendall(read_digest(c, {n}))                     # round 1: the client sends
        wait_phase({phase!r} + "2")                        # round 2: the server sends
        data = os.urandom({n}); c.sendall(data)
        assert recv_exact(c, 32) == hashlib.sha256(data).digest(), "round 2"
        wait_phase({phase!r} + "3")                        # round 3: both at once
        data = os.urandom({n})
        t = threading.Thread(target=c.sendall, args=(data,)); t.start()
        got = read_digest(c, {n}); t.join(); c.sendall(got)
        assert recv_exact(c, 32) == hashlib.sha256(data).digest(), "round 3"
        rest = c.recv(1)                                   # round 4: the client's FIN
        c.sendall(b"after your FIN"); c.shutdown(socket.SHUT_WR)
        print("served", repr(rest), flush=True)
    """)
    before, slept, woke = bytes_series(node), sleeps(node), wakes(node)
    client = spawn_script(node, CLIENTS[route], RECV_EXACT, f"""
        import threading
        s = socket.create_connection(({node.pods['web-0'].ip4!r}, {port}), 5)
        s.settimeout(60); assert recv_exact(s, 5) == b"hello"
        wait_phase({phase!r} + "1")
        data = os.urandom({n}); s.sendall(data)
        assert recv_exact(s, 32) == hashlib.sha256(data).digest(), "round 1"
        s.sendall(read_digest(s, {n}))
        wait_phase({phase!r} + "3")
        data = os.urandom({n})
        t = threading.Thread(target=s.sendall, args=(data,)); t.start()
        got = read_digest(s, {n}); t.join(); s.sendall(got)
        assert recv_exact(s, 32) == hashlib.sha256(data).digest(), "round 3"
        wait_phase({phase!r} + "4")
        s.shutdown(socket.SHUT_WR); tail = b""
        while chunk := s.recv(100):
            tail += chunk
        print("done", tail.decode(), flush=True)
    """)
    try:
        for k in (1, 2, 3, 4):  # asleep before each round and before the FIN
            await_sleeps(node, slept, k)
            assert asleep(node) >= 1
            if k > 1:  # the round before woke it
                assert wakes(node) - woke >= k - 1, (k, wakes(node) - woke)
            open(phase + str(k), "w").close()
        out, err = client.communicate(timeout=scaled(120))
        served, _ = server.communicate(timeout=scaled(30))
    finally:
        client.kill()
        server.kill()
    assert client.returncode == 0 and out.strip() == "done after your FIN", (out, err)
    assert served.strip() == "served b''"
    assert wakes(node) - woke >= 4  # the last by the client's FIN
    client_sent = n + 32 + n + 32
    server_sent = 5 + 32 + n + n + 32 + len("after your FIN")
    assert wait_for(lambda: bytes_series(node)["istio_tcp_sent_bytes_total"]
                    - before["istio_tcp_sent_bytes_total"] == server_sent, 10)
    after = bytes_series(node)
    assert after["istio_tcp_received_bytes_total"] - before[
        "istio_tcp_received_bytes_total"] == client_sent
    if route == "outbound" and node.capture_mode == "ebpf":
        # The kernel adds a connection's bytes to its pod's counters when it closes.
        assert wait_for(lambda: bytes_series(node)["nodeproxy_kernel_tcp_received_bytes_total"]
                        - before["nodeproxy_kernel_tcp_received_bytes_total"] == server_sent,
                        10)
        after = bytes_series(node)
        assert after["nodeproxy_kernel_tcp_sent_bytes_total"] - before[
            "nodeproxy_kernel_tcp_sent_bytes_total"] == client_sent
        # The sk_msg fast path carried bytes of this flow across its sleeps.
        assert 0 < after["msg"] - before["msg"] <= client_sent + server_sent


def test_a_burst_of_idle_relays_all_sleep_and_wake_intact(node: Cluster):
    """200 relayed connections open at once and stay quiet: every one sleeps (the
    daemon's gauge counts them asleep at once), then each wakes on its client's bytes
    and echoes random-sized payloads intact (SHA-256 per connection)."""
    n = 200
    go = os.path.join(node.dir, "relay-burst-go")
    slept = sleeps(node)
    proc = node.spawn_in_pod("client", node.peer_argv(
        "transfer", "--to", f"{node.services['default/web'].vip4}:80", "--timeout",
        str(scaled(120)), "--start-when", go, "--send", "200000", "--receive", "200000",
        "--random-sizes", "--connections", str(n), "--parallel", str(n)),
        stdout=subprocess.PIPE, text=True)
    try:
        try:
            assert wait_for(lambda: asleep(node) >= n, 40), (asleep(node),
                                                             sleeps(node) - slept)
            open(go, "w").close()
        except BaseException:
            proc.kill()
            raise
        out, _ = proc.communicate(timeout=scaled(180))
    finally:
        proc.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and result["sha_mismatch"] == 0, result
    assert wait_for(lambda: asleep(node) == 0, 10)


def quiet_pair(node: Cluster, port: int, client_pod: str, client_end: str,
               server_end: str) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """A connection from client_pod to web-0 that exchanges a greeting, then each end
    runs its `*_end` step (script lines using the socket `s` and wait_phase)."""
    server = serve_script(node, "web-0", f"""
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", {port})); l.listen(); print("listening", flush=True)
        s, _ = l.accept(); s.settimeout(60); s.sendall(b"hello")
    """, server_end)
    client = spawn_script(node, client_pod, f"""
        s = socket.create_connection(({node.pods['web-0'].ip4!r}, {port}), 5)
        s.settimeout(60); assert s.recv(5) == b"hello"
    """, client_end)
    return client, server


LAST_WORD = """
try:
    print("FIN" if s.recv(10) == b"" else "data", flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"""


def reset_after(path: str) -> str:
    return f"""
wait_phase({path!r})
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close(); print("reset", flush=True)
"""


def outcomes(client: subprocess.Popen[str], server: subprocess.Popen[str]) -> list[str]:
    try:
        out, err = client.communicate(timeout=scaled(40))
        served, _ = server.communicate(timeout=scaled(40))
    finally:
        client.kill()
        server.kill()
    assert client.returncode == 0, err
    return [out.strip(), served.strip()]


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_reset_on_a_sleeping_relay_reaches_the_other_side(node: Cluster, who: str):
    path = os.path.join(node.dir, f"relay-reset-{who}")
    port = 9502 if who == "client" else 9503
    slept = sleeps(node)
    client, server = quiet_pair(
        node, port, "client", reset_after(path) if who == "client" else LAST_WORD,
        reset_after(path) if who == "server" else LAST_WORD)
    await_sleeps(node, slept, 1)
    open(path, "w").close()
    results = outcomes(client, server)
    assert sorted(results) == ["ConnectionResetError", "reset"], results
    assert wait_for(lambda: asleep(node) == 0, 10)


def test_the_idle_timeout_closes_a_sleeping_relay_with_fins(node: Cluster):
    """limits.tcpIdleTimeoutSeconds reaches a relay while it sleeps: both ends get a FIN
    and the flow is counted closed for being idle."""
    closed = sample(node, "nodeproxy_tcp_idle_timeouts_total")
    slept = sleeps(node)
    node.write_configs(overrides={"limits": {"tcpIdleTimeoutSeconds": 6}})
    node.reload_daemons()
    try:
        client, server = quiet_pair(node, 9504, "client", LAST_WORD, LAST_WORD)
        await_sleeps(node, slept, 1)
        assert outcomes(client, server) == ["FIN", "FIN"]
    finally:
        node.write_configs(overrides={"limits": {"tcpIdleTimeoutSeconds": 3600}})
        node.reload_daemons()
    assert sample(node, "nodeproxy_tcp_idle_timeouts_total") - closed >= 1
    assert asleep(node) == 0


def test_a_vanished_pod_has_its_sleeping_relays_reset(node: Cluster):
    """A pod whose network namespace disappears (deleted without a CNI DEL) is unenrolled
    and its flows are reset, also those asleep: both ends see the reset.  (A pod
    unenrolled through the API keeps its running flows, asleep or not.)"""
    slept = sleeps(node)
    client, server = quiet_pair(node, 9505, "leaving", LAST_WORD, LAST_WORD)
    await_sleeps(node, slept, 1)
    # The runtime removed the netns; the client's process, still in it, sees the reset.
    subprocess.run(["ip", "netns", "delete", node.pods["leaving"].netns], check=True)
    assert outcomes(client, server) == ["ConnectionResetError", "ConnectionResetError"]
    assert 'cause="netns_vanished"' in node.metrics("node0")
    assert wait_for(lambda: asleep(node) == 0, 10)


@pytest.mark.parametrize("route", list(CLIENTS))
def test_a_policy_that_no_longer_allows_a_sleeping_relay_resets_it(node: Cluster,
                                                                   route: str):
    """A DENY applied while a flow sleeps (same-node mesh client, or plaintext from
    outside the mesh into the pod's inbound listener): the daemon judges its admission
    again and both ends see the reset; a flow the policy does not name sleeps on."""
    port = 9507 if route == "outbound" else 9508
    slept, revoked = sleeps(node), sample(node, "nodeproxy_connections_revoked_total")
    doomed = quiet_pair(node, port, CLIENTS[route], LAST_WORD, LAST_WORD)
    other = "outsider" if route == "outbound" else "client"
    spared = quiet_pair(node, port + 10, other, reset_after(os.path.join(
        node.dir, f"revoke-spared-{route}")), LAST_WORD)
    try:
        await_sleeps(node, slept, 2)
        deny = ({"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]}
                if route == "outbound" else
                {"from": [{"source": {"ipBlocks": [f"{node.pods['outsider'].ip4}/32"]}}]})
        reload_with(node, "node0", [{"name": "cut", "namespace": "default", "action": "DENY",
                            "selector": {"app": "web"}, "rules": [deny]}])
        assert outcomes(*doomed) == ["ConnectionResetError", "ConnectionResetError"]
        assert sample(node, "nodeproxy_connections_revoked_total") == revoked + 1
        assert asleep(node) >= 1  # the spared flow
        open(os.path.join(node.dir, f"revoke-spared-{route}"), "w").close()
        assert sorted(outcomes(*spared)) == ["ConnectionResetError", "reset"]
    finally:
        for proc in (*doomed, *spared):
            proc.kill()
        reload_with(node, "node0", [])


@pytest.mark.parametrize("mode", ["ebpf", "iptables"])
def test_drain_resets_both_ends_of_a_sleeping_relay_at_its_deadline(mode: str):
    """SIGTERM drains: a relayed flow asleep past the drain deadline is reset both ways
    (the proxy has no transports to abort: it resets the sockets themselves)."""
    with Cluster(1, capture_mode=mode) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-0", labels={"app": "web"}, service_account="web")
        c.write_configs(overrides={"proxy": {"drainSeconds": 1}})
        c.start_daemons()
        client, server = quiet_pair(c, 9506, "client", LAST_WORD, LAST_WORD)
        try:
            await_sleeps(c, 0, 1)
            assert c.stop_daemons() == {"node0": 0}
        except BaseException:
            client.kill()
            server.kill()
            raise
        assert outcomes(client, server) == ["ConnectionResetError", "ConnectionResetError"]

"""HTTP/2 abuse from an enrolled pod (issue 13, item 5): rapid reset and control-frame
floods against the node proxy, judged by nginx's own access log, the daemon's metrics
and /clusters, and a neighbour pod's requests.

The attacker is nodeproxy_dev.testbed.attack (the `h2` library, prior-knowledge h2c to a
service VIP, captured by the proxy), bounded in frames and seconds; the clients that
cancel and the neighbour's are tests/integration/h2_clients.py.  Backends are the
hostile ground's nginx over h2c (``<variant>-<site>-h2``; near: node0 like the attacker,
far: node1, across HBONE), plus a slow HTTP/1.1 backend per site whose connections show
whether a cancel reached it.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

import h2.connection
import h2.errors
import h2.events
import pytest

from nodeproxy.identity import tls
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.ports import HBONE_PORT
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration import hostile
from tests.integration.hostile import ATTACKER, NEIGHBOUR, HostileMesh, backend_log
from tests.integration.observe import metric_sum, wait_for

pytestmark = pytest.mark.privileged

CLIENTS = os.path.join(os.path.dirname(__file__), "h2_clients.py")
ABUSE = "nodeproxy_http2_abuse_total"
CALM = 0xB
CALM_NAME = "ENHANCE_YOUR_CALM"  # as the attack client reports it
SLOW_PORT = 8090
GRPC_PORT = 50051
GRPC_WORKERS = 4  # the gRPC backend serves this many calls at once, refuses the next
# The default budget: the connection ends at the 251st premature reset (more than half
# of 500), so at most 251 of its requests are ever started.
PREMATURE_BUDGET = 251


@pytest.fixture(scope="module")
def mesh() -> Iterator[HostileMesh]:
    with Cluster(2) as c:
        for site, node in hostile.SITES.items():
            name = f"slow-{site}"
            c.add_pod(node, name, labels={"app": name}, service_account="slow")
            c.serve_http(name, SLOW_PORT, name, "--log", os.path.join(c.dir, f"{name}.log"))
            c.add_service(name, port=80, target_port=SLOW_PORT, selector={"app": name},
                          app_protocol="http")
            grpc_name = f"grpc-slow-{site}"
            c.add_pod(node, grpc_name, labels={"app": grpc_name}, service_account="slow")
            c.serve_grpc(grpc_name, GRPC_PORT, grpc_name, "--workers", str(GRPC_WORKERS))
            c.add_service(grpc_name, port=GRPC_PORT, target_port=GRPC_PORT,
                          selector={"app": grpc_name}, app_protocol="grpc")
        yield hostile.build(c)


def attack_argv(mesh: HostileMesh, kind: str, service: str, *args: str) -> list[str]:
    """nodeproxy_dev.testbed.attack's ``kind`` at a service's VIP, port 80, one line of JSON."""
    return [sys.executable, "-m", "nodeproxy_dev.testbed.attack", kind, "--host",
            mesh.vip(service), "--port", "80", "--authority", service, "--path",
            "/public/flood", "--json", *args]


def run_argv(mesh: HostileMesh, argv: list[str], pod: str,
             timeout: float = 90.0) -> dict[str, Any]:
    out = mesh.cluster.run_in_pod(pod, argv, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{argv[2:4]}: no result (exit {out.returncode}): {out.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_attack(mesh: HostileMesh, kind: str, service: str, *args: str,
               pod: str = ATTACKER) -> dict[str, Any]:
    return run_argv(mesh, attack_argv(mesh, kind, service, *args), pod)


def run_client(mesh: HostileMesh, mode: str, service: str, *args: str,
               pod: str = ATTACKER) -> dict[str, Any]:
    return run_argv(mesh, [sys.executable, CLIENTS, mode, "--host", mesh.vip(service),
                           "--authority", service, *args], pod)


def only_goaway_last_stream(result: dict[str, Any]) -> int:
    """The last stream id of the one GOAWAY a one-connection attack got: asserts there
    was exactly one, ENHANCE_YOUR_CALM."""
    assert result["connections"] == 1 and result["goaway_codes"] == {CALM_NAME: 1}, result
    last: dict[str, int] = result["goaway_last_stream"]
    assert last["min"] == last["max"], result
    return last["max"]


def abuse_count(mesh: HostileMesh, reason: str, node: str = "node0") -> float:
    return metric_sum(mesh.cluster.metrics(node), ABUSE, reason=reason)


def daemon_cpu_seconds(mesh: HostileMesh, node: str = "node0") -> float:
    """The daemon's CPU time so far, from its cgroup (a figure, never asserted)."""
    path = os.path.join(mesh.cluster.nodes[node].daemon_cgroup, "cpu.stat")
    with open(path) as f:
        for line in f:
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
    return 0.0


def upstream_connections(mesh: HostileMesh, service: str, node: str = "node0") -> int:
    """Open upstream connections of a service, from /clusters (its circuit breaker's
    count, over every pool)."""
    total = 0
    for cluster in mesh.cluster.admin_json(node, "/clusters"):
        if cluster["fqdn"].startswith(f"{service}."):
            total += int(cluster["circuit_breaker"]["connections"])
    return total


def figure(name: str, **values: Any) -> None:
    print(f"\nFIGURE {name}: {json.dumps(values)}", flush=True)


@pytest.mark.parametrize("site", ["near", "far"])
def test_rapid_reset_gets_goaway_and_barely_reaches_the_backend(mesh: HostileMesh,
                                                                site: str) -> None:
    target = mesh.targets[f"deny-{site}"]
    served_before = len(backend_log(target.h2_dir))
    abuse_before = abuse_count(mesh, "premature_resets")
    cpu_before, t0 = daemon_cpu_seconds(mesh), time.monotonic()
    result = run_attack(mesh, "rapid-reset", target.h2_service, "--count", "10000",
                        "--duration", "20", "--batch", "100")
    cpu = daemon_cpu_seconds(mesh) - cpu_before
    elapsed = time.monotonic() - t0
    last_stream = only_goaway_last_stream(result)
    # The GOAWAY names the last stream a handler took: at most the budget's last one
    # (0 when the budget ran out within the first read: no handler ever started).
    assert 0 <= last_stream <= 2 * PREMATURE_BUDGET - 1, result
    assert wait_for(lambda: abuse_count(mesh, "premature_resets") == abuse_before + 1)
    time.sleep(1.0)  # anything still on its way to nginx gets there
    served = len(backend_log(target.h2_dir)) - served_before
    # The budget alone would let 251 requests through; cancelled streams are never sent
    # (a pair that a read splits may start one handler, whose request is then reset).
    assert served < 50, served
    connections = upstream_connections(mesh, target.h2_service)
    # A connection per 100 streams in flight at most (before: ~1,000 after one burst).
    assert connections <= 3, connections
    figure(f"rapid_reset_{site}", pairs_sent=result["sent"], goaway_last_stream=last_stream,
           nginx_served=served, upstream_connections=connections,
           daemon_cpu_s=round(cpu, 3), wall_s=round(elapsed, 3))


@pytest.mark.parametrize("site, mode", [("near", "cancel"), ("far", "cancel"),
                                        ("far", "cancel-h1")])
def test_a_reset_stream_is_cancelled_at_the_backend(mesh: HostileMesh, site: str,
                                                     mode: str) -> None:
    """A request in flight to a slow HTTP/1.1 backend, then RST_STREAM (the client's
    connection stays open), or for an HTTP/1.1 client its connection reset: the proxy
    closes the upstream connection at once (far: the other node's relay closes its own),
    long before the backend would have answered."""
    c = mesh.cluster
    pod = f"slow-{site}"
    log_path = os.path.join(c.dir, f"{pod}.log")
    path = f"/{mode}-{site}/delay/15000"

    def started() -> bool:
        return os.path.exists(log_path) and path in open(log_path).read()

    def established() -> int:
        out = c.run_in_pod(pod, ["ss", "-Htn", "state", "established",
                                 f"( sport = :{SLOW_PORT} )"])
        return len([line for line in out.stdout.splitlines() if line.strip()])

    client = c.spawn_in_pod(ATTACKER, [sys.executable, CLIENTS, mode, "--host",
                                       mesh.vip(pod), "--authority", pod, "--path", path,
                                       "--wait", "2", "--seconds", "20"],
                            stdout=open(os.path.join(c.dir, f"{mode}-{site}.out"), "w"))
    try:
        assert wait_for(started, timeout=10), "the request never reached the backend"
        assert established() >= 1
        t0 = time.monotonic()
        # The reset comes 2 s after sending; the backend would answer after 15 s.
        assert wait_for(lambda: established() == 0, timeout=8, interval=0.1), \
            "the upstream connection outlived the client's reset"
        figure(f"{mode}_{site}", upstream_closed_after_s=round(time.monotonic() - t0, 2))
        assert client.poll() is None  # still there (h2: its connection still open)
    finally:
        client.kill()
        client.wait()


@pytest.mark.parametrize("site", ["near", "far"])
def test_cancelled_grpc_calls_free_the_backend_at_once(mesh: HostileMesh, site: str) -> None:
    """HTTP/2 upstream: four 15 s gRPC calls fill a backend that serves four at once (a
    fifth is refused RESOURCE_EXHAUSTED); the client resets them, its connection open:
    the proxy's RST_STREAM(CANCEL) reaches the backend (far: inside the HBONE stream, to
    the other node and through its relay), which is free again at once."""
    c = mesh.cluster
    service = f"grpc-slow-{site}"
    target = f"{mesh.vip(service)}:{GRPC_PORT}"
    signal = os.path.join(c.dir, f"grpc-reset-{site}")

    def probe() -> str:
        out = c.grpc_client(NEIGHBOUR, "--target", target, "--method", "Unary",
                            "--payload", "x", "--timeout", "5", "--authority", service)
        return next(iter(out["codes"]))

    client = c.spawn_in_pod(ATTACKER, [
        sys.executable, CLIENTS, "grpc-cancel", "--host", mesh.vip(service), "--port",
        str(GRPC_PORT), "--authority", service, "--streams", str(GRPC_WORKERS),
        "--reset-when", signal, "--seconds", "30"],
        stdout=open(os.path.join(c.dir, f"grpc-cancel-{site}.out"), "w"))
    try:
        assert wait_for(lambda: probe() == "RESOURCE_EXHAUSTED", timeout=10), \
            "the four calls never filled the backend"
        t0 = time.monotonic()
        open(signal, "w").close()
        assert wait_for(lambda: probe() == "OK", timeout=8, interval=0.2), \
            "the backend stayed busy with calls the client had reset"
        figure(f"grpc_cancel_{site}", backend_free_after_s=round(time.monotonic() - t0, 2))
        assert client.poll() is None
    finally:
        client.kill()
        client.wait()


def test_rapid_reset_with_reconnects_spares_the_neighbour(mesh: HostileMesh) -> None:
    """The attacker resets streams on connection after connection for 10 s; a neighbour
    pod's requests to another service on the same proxy all succeed meanwhile."""
    c = mesh.cluster
    target = mesh.targets["deny-near"]
    quiet = mesh.targets["allow-near"]
    served_before = len(backend_log(target.h2_dir))
    abuse_before = abuse_count(mesh, "premature_resets")
    baseline = run_client(mesh, "neighbour", quiet.h1_service, "--seconds", "5",
                          "--interval", "0.01", "--path", "/public/n", pod=NEIGHBOUR)
    cpu_before = daemon_cpu_seconds(mesh)
    out_path = os.path.join(c.dir, "reconnect-flood.out")
    with open(out_path, "w") as out:
        attacker = c.spawn_in_pod(ATTACKER, attack_argv(
            mesh, "rapid-reset", target.h2_service, "--count", "300000", "--duration", "10",
            "--batch", "100", "--reconnect"), stdout=out)
        try:
            during = run_client(mesh, "neighbour", quiet.h1_service, "--seconds", "10",
                                "--interval", "0.01", "--path", "/public/n", pod=NEIGHBOUR)
            attacker.wait(timeout=60)
        finally:
            if attacker.poll() is None:
                attacker.kill()
                attacker.wait()
    cpu = daemon_cpu_seconds(mesh) - cpu_before
    flood = json.loads(open(out_path).read().strip().splitlines()[-1])
    assert during["failed"] == 0, during
    assert set(during["statuses"]) == {"200"}, during
    assert flood["connections"] >= 2 and set(flood["goaway_codes"]) <= {CALM_NAME}, flood
    assert abuse_count(mesh, "premature_resets") - abuse_before >= flood["connections"] - 1
    time.sleep(1.0)
    served = len(backend_log(target.h2_dir)) - served_before
    assert served <= PREMATURE_BUDGET * flood["connections"], served
    connections = upstream_connections(mesh, target.h2_service)
    assert connections <= 3, connections
    figure("rapid_reset_reconnecting", pairs_sent=flood["sent"],
           connections=flood["connections"], nginx_served=served,
           upstream_connections=connections, daemon_cpu_s=round(cpu, 3),
           daemon_cpu_share=round(cpu / 10.0, 3),
           neighbour_baseline={k: baseline[k] for k in ("requests", "p50_ms", "p99_ms")},
           neighbour_during={k: during[k] for k in ("requests", "p50_ms", "p99_ms")})


@pytest.mark.parametrize("kind, reason", [("ping-flood", "ping_flood"),
                                          ("settings-flood", "settings_flood"),
                                          ("window-update-flood", "window_update_flood")])
def test_control_frame_floods_get_goaway(mesh: HostileMesh, kind: str, reason: str) -> None:
    target = mesh.targets["allow-far"]
    before = abuse_count(mesh, reason)
    result = run_attack(mesh, kind, target.h2_service, "--count", "10000", "--duration", "20",
                        "--batch", "100")
    assert only_goaway_last_stream(result) == 0  # it opened no stream
    assert wait_for(lambda: abuse_count(mesh, reason) == before + 1)
    figure(f"flood_{kind}", frames_sent=result["sent"])


def test_a_compromised_node_resetting_connect_streams_gets_goaway(mesh: HostileMesh) -> None:
    """A peer with a valid mesh certificate (a compromised node) opens HBONE CONNECT
    streams to a pod on node1 and resets each at once: node1's tunnel server sends GOAWAY
    ENHANCE_YOUR_CALM, dials few of them, and keeps serving the mesh."""
    c = mesh.cluster
    target = mesh.targets["deny-far"]
    pod_ip = c.pods[target.pod].ip4
    before = metric_sum(c.metrics("node1"), "nodeproxy_hbone_abuse_total",
                        reason="premature_resets")
    dialled_before = metric_sum(c.metrics("node1"), "nodeproxy_hbone_streams_total",
                                side="server")
    manager = CertificateManager(MeshCA.load(c.ca_cert, c.ca_key, c.trust_domain),
                                 c.trust_domain, ttl_seconds=3600)
    raw = netns.connect(c.nodes["node0"].netns_path, pod_ip, HBONE_PORT)
    raw.settimeout(5)
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    goaway: h2.events.ConnectionTerminated | None = None
    sent = 0
    with tls.client_context(manager, "default", ATTACKER).wrap_socket(
            raw, server_hostname=None) as s:
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 20
        while goaway is None and sent < 10_000 and time.monotonic() < deadline:
            for _ in range(100):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "CONNECT"),
                                        (":authority", f"{pod_ip}:{hostile.APP_H1}")])
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                sent += 1
            try:
                s.sendall(conn.data_to_send())
                s.settimeout(0.001)
                for event in conn.receive_data(s.recv(1 << 20)):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        goaway = event
            except (TimeoutError, ssl.SSLWantReadError):
                pass
            except OSError:
                break
            finally:
                s.settimeout(5)
        while goaway is None and time.monotonic() < deadline:
            try:
                data = s.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event
    assert goaway is not None and goaway.error_code == CALM, sent
    assert sent < 10_000
    assert wait_for(lambda: metric_sum(c.metrics("node1"), "nodeproxy_hbone_abuse_total",
                                       reason="premature_resets") == before + 1)
    streams = metric_sum(c.metrics("node1"), "nodeproxy_hbone_streams_total",
                         side="server") - dialled_before
    assert streams <= PREMATURE_BUDGET, streams
    # The mesh still works through node1: a neighbour's request to the far backend.
    result = run_client(mesh, "neighbour", mesh.targets["allow-far"].h1_service,
                        "--seconds", "2", "--count", "20", "--path", "/public/after",
                        pod=NEIGHBOUR)
    assert result["failed"] == 0 and set(result["statuses"]) == {"200"}, result
    cancelled = metric_sum(c.metrics("node1"), "nodeproxy_hbone_streams_total",
                           side="server", result="cancelled")
    figure("hbone_rapid_reset", pairs_sent=sent, goaway_last_stream=goaway.last_stream_id,
           streams_handled=streams, cancelled_before_dialling=cancelled)


def test_a_normal_h2_client_is_untouched(mesh: HostileMesh) -> None:
    """nghttp's many requests on one connection, with its own settings and window
    updates: all answered, no abuse counted."""
    target = mesh.targets["allow-near"]
    before = metric_sum(mesh.cluster.metrics("node0"), ABUSE)
    url = f"http://{mesh.vip(target.h2_service)}/public/normal"
    out = mesh.cluster.run_in_pod(NEIGHBOUR, ["h2load", "-n", "2000", "-c", "1", "-m", "50",
                                              url], timeout=60)
    assert "2000 succeeded" in out.stdout, out.stdout[-2000:]
    assert metric_sum(mesh.cluster.metrics("node0"), ABUSE) == before


def test_a_pod_that_abused_gets_a_tenth_of_the_reset_budget(mesh: HostileMesh) -> None:
    """A pod with no abuse behind it gets through its 250 early resets; right after its
    GOAWAY, its next connection is cut after 25.  (Last in this file: it penalizes the
    neighbour.)"""
    target = mesh.targets["deny-near"]
    args = ("--count", "5000", "--duration", "30", "--batch", "5", "--pause", "0.002")
    logged = len(mesh.cluster.daemon_output("node0", 10**9))
    first = run_attack(mesh, "rapid-reset", target.h2_service, *args, pod=NEIGHBOUR)
    second = run_attack(mesh, "rapid-reset", target.h2_service, *args, pod=NEIGHBOUR)
    last_first = only_goaway_last_stream(first)
    last_second = only_goaway_last_stream(second)
    # What the guard counted when it cut each connection, as the daemon logged it.
    log_text = mesh.cluster.daemon_output("node0", 10**9)[logged:]
    judged = [int(n) for n in re.findall(
        r"over its budget \(premature_resets\): (\d+) of \d+ streams reset early", log_text)]
    assert judged == [PREMATURE_BUDGET, 26], log_text[-3000:]
    # The GOAWAY names the last stream a handler took: at most the one that spent the
    # budget (streams read with it in the same read got no handler; how many depends on
    # how the machine scheduled the reads).
    assert last_first <= 2 * PREMATURE_BUDGET, first
    assert last_second <= 2 * 26, second
    figure("penalty", last_stream_first=last_first, last_stream_second=last_second)

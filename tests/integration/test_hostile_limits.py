"""One hostile pod must not take the node proxy from its neighbours (issue 13, items 6 and
7): per-pod caps on connections, new connections per second and HTTP requests in flight;
the descriptor reserve that keeps /ready and /metrics answering; request-header timeouts
against slowloris.  Scaled down by config (low caps, a low open-file limit, a 2 s header
timeout) so every run is small and bounded; judged by what the clients saw, by nginx's own
access log and by the daemon's counters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster, deep_merge
from tests.integration import hostile
from tests.integration.observe import access_log_entries, metric_sum, wait_for

pytestmark = pytest.mark.privileged

HEADER_TIMEOUT = 2.0
MARGIN = 1.5  # the proxy's timer fires within this of the deadline (loaded 2-core machine)
TCP_SERVICE = "tcp-near"  # nginx in an unguarded pod behind an opaque (tcp) port
PLAIN = "plain-web"  # that pod: no policy selects it, so its L4 flows are allowed
PLAIN_FAR = "plain-far"  # an unguarded pod on node1, behind TCP_FAR (opaque)
TCP_FAR = "tcp-far"
OUTSIDER = "outsider"  # an unenrolled pod on node0: plaintext into the mesh (15006)
SLOW_SERVICE = "slow-near"
SLOW_PORT = 8090


def backend_log_path(cluster: Cluster) -> str:
    return f"{cluster.dir}/plain-http.log"


def backend_requests(cluster: Cluster, prefix: str) -> int:
    """Requests the HTTP backend itself received whose path starts with prefix."""
    try:
        with open(backend_log_path(cluster)) as f:
            return sum(1 for line in f if line.strip()
                       and str(json.loads(line).get("path", "")).startswith(prefix))
    except FileNotFoundError:
        return 0
GENEROUS = {"maxConnections": 1000, "connectionsPerSecond": 10000, "maxRequests": 1000}


def _base(cluster: Cluster) -> dict[str, Any]:
    """What hostile.build wrote, so a rewrite keeps it."""
    return {"http": {"accessLog": {"path": f"{cluster.dir}/access.log"},
                     "requestHeadersTimeoutSeconds": HEADER_TIMEOUT},
            "authorizationPolicies": list(hostile.POLICIES)}


def _apply(mesh: hostile.HostileMesh, overrides: Mapping[str, Any], *,
           restart: bool = False) -> None:
    c = mesh.cluster
    c.write_configs(overrides=deep_merge(_base(c), overrides))
    if restart:
        c.stop_daemons()
        c.start_daemons()
    else:
        c.reload_daemons()


def _build(cluster: Cluster) -> hostile.HostileMesh:
    base = _base(cluster)
    del base["authorizationPolicies"]  # build adds them itself
    mesh = hostile.build(cluster, base, extra_pods=[("node0", PLAIN), ("node1", PLAIN_FAR)])
    cluster.serve_guarded(PLAIN, hostile.APP_H1)
    cluster.serve_guarded(PLAIN_FAR, hostile.APP_H1)
    cluster.add_service(TCP_FAR, port=80, target_port=hostile.APP_H1,
                        selector={"app": PLAIN_FAR}, app_protocol="tcp")
    cluster.add_unenrolled_pod("node0", OUTSIDER)
    cluster.add_service(TCP_SERVICE, port=80, target_port=hostile.APP_H1,
                        selector={"app": PLAIN}, app_protocol="tcp")
    # The testbed's HTTP backend (/delay/<ms> holds a request), logging what it served.
    cluster.serve_http(PLAIN, SLOW_PORT, PLAIN, "--log", backend_log_path(cluster))
    cluster.add_service(SLOW_SERVICE, port=80, target_port=SLOW_PORT,
                        selector={"app": PLAIN}, app_protocol="http")
    return mesh


@pytest.fixture(scope="module")
def mesh() -> Iterator[hostile.HostileMesh]:
    with Cluster(2) as c:
        m = _build(c)
        _apply(m, {"limits": {"perPod": GENEROUS}})
        yield m


# --- clients ------------------------------------------------------------------------------


class Flood:
    """nodeproxy_dev.testbed.attack's flood in a pod: started, read until its "held" report,
    released (stdin closed)."""

    def __init__(self, mesh: hostile.HostileMesh, pod: str, argv: list[str]):
        self._proc = mesh.cluster.spawn_in_pod(
            pod, [sys.executable, "-m", "nodeproxy_dev.testbed.attack", "flood", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def held(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                report = dict(json.loads(line))
                assert report.get("phase") == "held", report
                return report
        raise AssertionError(f"flood gave no result: {self._proc.stderr.read()}")  # type: ignore[union-attr]

    def release(self) -> dict[str, Any]:
        out, err = self._proc.communicate(input="", timeout=30)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, err
        return dict(json.loads(lines[-1]))


def flood(mesh: hostile.HostileMesh, pod: str, service: str, count: int, *extra: str,
          hold: float = 30.0, settle: float = 1.0, host: str | None = None,
          port: int = 80) -> Flood:
    """``count`` connections held (``--send-hex``: after writing those bytes), reported
    ``settle`` s after the last connect, released by the test or after ``hold`` s."""
    return Flood(mesh, pod, ["--host", host or mesh.vip(service), "--port", str(port),
                             "--connections", str(count), "--settle", str(settle),
                             "--duration", str(hold), "--connect-timeout", "3", "--json",
                             *extra])


def reset_at_connect(held: dict[str, Any]) -> int:
    """Connections the proxy reset at accept so fast that the client saw the reset as
    its connect failing (a race on a busy machine): refusals like the others."""
    errors = held.get("connect_errors", {})
    return int(errors.get("ConnectionResetError", 0)) + \
        int(errors.get("ConnectionRefusedError", 0))


def attempted(held: dict[str, Any]) -> int:
    """Connections the client opened, and those reset while it was connecting."""
    return int(held["opened"]) + reset_at_connect(held)


def refused_or_closed(held: dict[str, Any]) -> int:
    """Connections of a held report the peer reset or closed, at connect or after."""
    return int(held["reset_by_peer"]) + int(held["closed_by_peer"]) + reset_at_connect(held)


def neighbour_requests(mesh: hostile.HostileMesh, tag: str, n: int) -> list[str]:
    """n sequential requests from the neighbour with curl, each on a new connection; the
    status codes it saw."""
    url = f"http://{mesh.vip('deny-near')}/public/{tag}-"
    codes = []
    for i in range(n):
        out = mesh.cluster.run_in_pod(hostile.NEIGHBOUR, [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            url + str(i)], timeout=20)
        codes.append(out.stdout.strip())
    return codes


def served(mesh: hostile.HostileMesh, tag: str) -> int:
    """Requests with this tag deny-near's nginx itself served (its access log)."""
    log = hostile.backend_log(mesh.targets["deny-near"].h1_dir)
    return sum(1 for e in log if str(e.get("uri", "")).startswith(f"/public/{tag}-"))


def metrics(mesh: hostile.HostileMesh) -> str:
    return mesh.cluster.metrics("node0")


def refused(exposition: str, name: str, **labels: str) -> float:
    return metric_sum(exposition, name, **labels)


# --- per-pod caps -------------------------------------------------------------------------


def test_a_pod_past_its_connection_cap_is_refused_and_its_neighbour_is_not(mesh):
    _apply(mesh, {"limits": {"perPod": {**GENEROUS, "maxConnections": 20}}})
    before = metrics(mesh)
    attack = flood(mesh, hostile.ATTACKER, TCP_SERVICE, 30, hold=60)
    held = attack.held()
    try:
        codes = neighbour_requests(mesh, "cap", 20)
        after = metrics(mesh)
    finally:
        attack.release()
    assert attempted(held) == 30 and held["open_at_end"] == 20, held
    assert refused_or_closed(held) == 10, held
    assert codes == ["200"] * 20
    assert wait_for(lambda: served(mesh, "cap") == 20)
    name = "nodeproxy_outbound_refused_total"
    assert refused(after, name, source_workload=hostile.ATTACKER,
                   reason="pod_connection_limit") - \
        refused(before, name, source_workload=hostile.ATTACKER,
                reason="pod_connection_limit") == 10
    assert refused(after, name, source_workload=hostile.NEIGHBOUR) == \
        refused(before, name, source_workload=hostile.NEIGHBOUR)
    assert refused(after, "nodeproxy_pod_connections", pod=hostile.ATTACKER) == 20
    # Leaving gives the places back: the attacker connects again.
    again = flood(mesh, hostile.ATTACKER, TCP_SERVICE, 5, hold=5)
    assert again.held()["open_at_end"] == 5
    again.release()


def test_new_connections_per_second_are_capped_per_pod(mesh):
    _apply(mesh, {"limits": {"perPod": {**GENEROUS, "connectionsPerSecond": 5,
                                        "connectionBurst": 10}}})
    time.sleep(2.5)  # buckets full (a reload with a new rate starts them again anyway)
    before = metrics(mesh)
    attack = flood(mesh, hostile.ATTACKER, TCP_SERVICE, 40)
    held = attack.held()
    try:
        codes = neighbour_requests(mesh, "rate", 8)  # its own bucket: within its burst
        after = metrics(mesh)
    finally:
        attack.release()
    seconds = float(held["seconds"])
    assert attempted(held) == 40, held
    # burst + rate * elapsed, at most (elapsed includes the settle second).
    assert 10 <= held["open_at_end"] <= 10 + 5 * seconds + 1, held
    assert codes == ["200"] * 8
    name = "nodeproxy_outbound_refused_total"
    assert refused(after, name, source_workload=hostile.ATTACKER,
                   reason="pod_connection_rate") - \
        refused(before, name, source_workload=hostile.ATTACKER,
                reason="pod_connection_rate") == 40 - held["open_at_end"]


def test_requests_in_flight_past_the_pod_cap_get_503_om(mesh):
    """Requests the backend holds for 8 s: four in flight, the next six refused at once,
    never reaching the backend; the neighbour's requests meanwhile are served."""
    _apply(mesh, {"limits": {"perPod": {**GENEROUS, "maxRequests": 4}}})
    before = metrics(mesh)
    head = b"GET /inflight/delay/8000 HTTP/1.1\r\nHost: slow-near\r\n\r\n"
    attack = flood(mesh, hostile.ATTACKER, SLOW_SERVICE, 10, "--send-hex", head.hex(),
                   "--per-connection", settle=1.5)
    held = attack.held()
    try:
        codes = neighbour_requests(mesh, "inflight", 10)
        after = metrics(mesh)
    finally:
        attack.release()
    answers = [c["answer"] for c in held["per_connection"]]
    assert sum(1 for a in answers if a.startswith("HTTP/1.1 503")) == 6, held
    assert answers.count("") == 4, held  # still waiting for the backend
    assert codes == ["200"] * 10
    assert wait_for(lambda: served(mesh, "inflight") == 10)
    assert wait_for(lambda: backend_requests(mesh.cluster, "/inflight/") == 4, 15)
    name = "nodeproxy_http_refused_total"
    assert refused(after, name, source_workload=hostile.ATTACKER, reason="pod_request_limit") \
        - refused(before, name, source_workload=hostile.ATTACKER,
                  reason="pod_request_limit") == 6
    assert refused(after, name, source_workload=hostile.NEIGHBOUR) == 0
    om = [e for e in _access_log(mesh) if e.get("response_flags") == "OM"
          and str(e.get("path", "")).startswith("/inflight/")]
    assert len(om) == 6 and all(e["status"] == 503 for e in om), om
    # The four admitted requests end when the backend answers (8 s): until then their
    # half-closed connections still count against the attacker's share.
    assert wait_for(lambda: len([e for e in _access_log(mesh)
                                 if str(e.get("path", "")).startswith("/inflight/")
                                 and e.get("response_flags") != "OM"]) == 4, 20)


def test_upgraded_connections_give_their_place_back(mesh):
    """A WebSocket upgrade leaves HTTP; when it ends, its connection leaves the pod's
    share: five WebSocket sessions one after another (aiohttp) under a cap of three."""
    _apply(mesh, {"limits": {"perPod": {**GENEROUS, "maxConnections": 3}}})
    assert wait_for(lambda: refused(metrics(mesh), "nodeproxy_pod_connections",
                                    pod=hostile.ATTACKER) == 0, 20)
    url = f"http://{mesh.vip(SLOW_SERVICE)}/ws"
    script = (
        "import asyncio,aiohttp\n"
        "async def m():\n"
        "  for i in range(5):\n"
        "    async with aiohttp.ClientSession() as s:\n"
        f"      async with s.ws_connect({url!r}) as ws:\n"
        "        await ws.send_str(f'ping-{i}'); print((await ws.receive()).data)\n"
        "asyncio.run(m())")
    out = mesh.cluster.run_in_pod(hostile.ATTACKER, [sys.executable, "-c", script],
                                  timeout=60, check=True).stdout
    assert out.split() == [f"ping-{i}" for i in range(5)]


def test_plaintext_from_one_address_is_capped_at_the_inbound_listener(mesh):
    """An unenrolled pod (outside the mesh) connects straight to a meshed pod's port: the
    inbound listener (15006) holds it to maxPlaintextPerSource."""
    _apply(mesh, {"limits": {"perPod": GENEROUS, "inbound": {"maxPlaintextPerSource": 5}}})
    before = metrics(mesh)
    attack = flood(mesh, OUTSIDER, "", 12, host=mesh.cluster.pods[PLAIN].ip4,
                   port=hostile.APP_H1)
    held = attack.held()
    try:
        codes = neighbour_requests(mesh, "inbound", 5)
        after = metrics(mesh)
    finally:
        attack.release()
    assert attempted(held) == 12 and held["open_at_end"] == 5, held
    assert codes == ["200"] * 5
    name = "nodeproxy_inbound_refused_total"
    labels = {"destination_workload": PLAIN, "reason": "source_connection_limit"}
    assert refused(after, name, **labels) - refused(before, name, **labels) == 7


def test_hbone_streams_from_one_node_are_capped(mesh):
    """Cross node: node1 holds node0's HBONE streams to maxStreamsPerNode; past it the
    stream is refused and node0 resets the client's connection."""
    _apply(mesh, {"limits": {"perPod": GENEROUS, "inbound": {"maxStreamsPerNode": 6}}})
    node1 = mesh.cluster.metrics("node1")
    attack = flood(mesh, hostile.ATTACKER, TCP_FAR, 10)
    held = attack.held()
    try:
        after = mesh.cluster.metrics("node1")
    finally:
        attack.release()
    assert attempted(held) == 10 and held["open_at_end"] == 6, held
    name = "nodeproxy_inbound_refused_total"
    labels = {"destination_workload": PLAIN_FAR, "reason": "node_stream_limit"}
    assert refused(after, name, **labels) - refused(node1, name, **labels) == 4


def _access_log(mesh: hostile.HostileMesh) -> list[dict[str, Any]]:
    return access_log_entries(mesh.cluster.dir)


# --- timeouts -----------------------------------------------------------------------------


def test_slowloris_connections_are_closed_by_the_header_timeout(mesh):
    """A header byte every 0.5 s never ends the head: each connection gets 408 and is
    closed at the timeout, measured by the client; the neighbour is served meanwhile."""
    _apply(mesh, {"limits": {"perPod": GENEROUS}})
    before = metrics(mesh)
    conns = slow_clients(mesh, "deny-near", 20, "--interval", "0.5")
    codes = neighbour_requests(mesh, "slow", 5)
    after = metrics(mesh)
    closed = [c["ended_after"] for c in conns]
    assert all(t is not None and HEADER_TIMEOUT - 0.1 <= t <= HEADER_TIMEOUT + MARGIN
               for t in closed), closed
    assert all(c["answer"].startswith("HTTP/1.1 408 ") for c in conns), conns
    assert codes == ["200"] * 5
    name = "nodeproxy_http_downstream_timeouts_total"
    labels = {"protocol": "http/1.1", "timeout": "request_headers"}
    assert refused(after, name, **labels) - refused(before, name, **labels) == 20
    print(f"slowloris: 20 connections closed after {min(closed):.2f}..{max(closed):.2f} s "
          f"(timeout {HEADER_TIMEOUT} s)")


def slow_clients(mesh: hostile.HostileMesh, service: str, count: int,
                 *extra: str) -> list[dict[str, Any]]:
    """``count`` slowloris connections (the request line and Host header at once, then a
    header byte per ``--interval``; or ``--silent``): what each saw."""
    result = json.loads(mesh.cluster.run_in_pod(hostile.ATTACKER, [
        sys.executable, "-m", "nodeproxy_dev.testbed.attack", "slowloris",
        "--host", mesh.vip(service), "--port", "80", "--connections", str(count),
        "--duration", str(HEADER_TIMEOUT + 8), "--connect-timeout", "3", "--head-at-once",
        "--per-connection", "--json", *extra],
        timeout=60, check=True).stdout.splitlines()[-1])
    conns: list[dict[str, Any]] = result["per_connection"]
    assert result["opened"] == count and result["connect_failed"] == 0, result
    assert len(conns) == count, conns
    return conns


def test_silent_connections_do_not_hold_descriptors(mesh):
    """Nothing sent at all to a declared HTTP port: closed at the header timeout (counted
    from accept, the protocol wait included), without a response to misread."""
    before = metrics(mesh)
    conns = slow_clients(mesh, "deny-near", 10, "--silent")
    after = metrics(mesh)
    closed = [c["ended_after"] for c in conns]
    assert all(t is not None and HEADER_TIMEOUT - 0.1 <= t <= HEADER_TIMEOUT + MARGIN
               for t in closed), closed
    assert all(c["answer"] == "" for c in conns), conns
    name = "nodeproxy_http_downstream_timeouts_total"
    labels = {"protocol": "http/1.1", "timeout": "request_headers"}
    assert refused(after, name, **labels) - refused(before, name, **labels) == 10


def test_a_body_that_never_ends_gets_408_at_the_request_timeout(mesh):
    """Head whole, body stalled (slow POST, the head already streamed to the backend): the
    request timeout answers 408 and closes."""
    timeout = 2.0
    _apply(mesh, {"limits": {"perPod": GENEROUS}, "http": {"requestTimeoutSeconds": timeout}})
    before = metrics(mesh)
    head = (b"POST /stalled/echo HTTP/1.1\r\nHost: slow-near\r\n"
            b"Content-Length: 100\r\n\r\n0123456789")
    result = mesh.raw(mesh.vip(SLOW_SERVICE), [head], read_seconds=timeout + 5)
    after = metrics(mesh)
    assert result["received"].startswith(b"HTTP/1.1 408 "), result
    assert result["closed_by_peer"] or result["reset"], result
    assert timeout - 0.1 <= result["seconds"] <= timeout + MARGIN, result
    name = "nodeproxy_http_downstream_timeouts_total"
    labels = {"protocol": "http/1.1", "timeout": "request"}
    assert refused(after, name, **labels) - refused(before, name, **labels) == 1


def test_idle_tcp_flows_are_closed_at_the_idle_timeout(mesh):
    """A silent connection to an opaque port (nothing to sniff, no HTTP timeout) does not
    hold its descriptors for good: limits.tcpIdleTimeoutSeconds closes it."""
    _apply(mesh, {"limits": {"perPod": GENEROUS, "tcpIdleTimeoutSeconds": 2}})
    before = metrics(mesh)
    attack = flood(mesh, hostile.ATTACKER, TCP_SERVICE, 5, settle=0)
    assert attack.held()["open_at_end"] == 5
    assert wait_for(lambda: refused(metrics(mesh), "nodeproxy_tcp_idle_timeouts_total")
                    - refused(before, "nodeproxy_tcp_idle_timeouts_total") == 5, 15)
    attack.release()
    assert refused(metrics(mesh), "nodeproxy_pod_connections", pod=hostile.ATTACKER) == 0


def test_h2_header_block_never_finished_is_closed(mesh):
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    # HEADERS on stream 1 without END_HEADERS (":method GET" indexed), never continued.
    headers = bytes([0, 0, 1, 0x1, 0x1, 0, 0, 0, 1]) + b"\x82"
    before = metrics(mesh)
    result = mesh.raw(mesh.vip("deny-near-h2"), [preface + headers],
                      read_seconds=HEADER_TIMEOUT + 5)
    after = metrics(mesh)
    assert result["closed_by_peer"] or result["reset"], result
    assert result["seconds"] <= HEADER_TIMEOUT + MARGIN, result
    goaway = result["received"].find(bytes([0x7]) + b"\x00\x00\x00\x00\x00")
    assert goaway > 0 and result["received"][goaway + 10:goaway + 14] == b"\x00\x00\x00\x0b"
    labels = {"protocol": "http/2", "timeout": "request_headers"}
    name = "nodeproxy_http_downstream_timeouts_total"
    assert refused(after, name, **labels) - refused(before, name, **labels) == 1


# --- the descriptor reserve ---------------------------------------------------------------


def test_descriptor_reserve_keeps_ready_and_metrics_answering():
    """A low open-file limit (scaled down from the issue's 20,000): the attacker fills the
    proxied share of the table; /ready and /metrics still answer, the neighbour gets
    through while the share lasts, and refusals are counted."""
    reserved = 64
    cap = 40
    with Cluster(2) as c:
        mesh = _build(c)
        _apply(mesh, {"limits": {"perPod": GENEROUS}})
        baseline = metric_sum(c.metrics("node0"), "nodeproxy_open_files", kind="open")
        # Room above the baseline: the attacker's cap (two descriptors a connection) and
        # about 40 more for the neighbour.
        limit = int(baseline) + reserved + 2 * cap + 40
        _apply(mesh, {"limits": {"openFiles": limit, "reservedFiles": reserved,
                                 "perPod": {**GENEROUS, "maxConnections": cap}}},
               restart=True)
        exposition = c.metrics("node0")
        assert metric_sum(exposition, "nodeproxy_open_files", kind="limit") == limit
        first = flood(mesh, hostile.ATTACKER, TCP_SERVICE, cap, hold=120)
        assert first.held()["open_at_end"] == cap
        try:
            # Nearly spent: the neighbour still gets through.
            codes = neighbour_requests(mesh, "reserve", 10)
            assert codes == ["200"] * 10
            # Lift the pod cap (live) and take the rest: now the table's share runs out.
            _apply(mesh, {"limits": {"openFiles": limit, "reservedFiles": reserved,
                                     "perPod": GENEROUS}})
            second = flood(mesh, hostile.ATTACKER, TCP_SERVICE, 200, hold=120)
            held = second.held()
            try:
                assert held["open_at_end"] < 200 and refused_or_closed(held) > 0, held
                status, _ = c.admin_get("node0", "/ready")
                assert status == 200
                exposition = c.metrics("node0")
                assert metric_sum(exposition, "nodeproxy_outbound_refused_total",
                                  reason="descriptors") > 0
                open_now = metric_sum(exposition, "nodeproxy_open_files", kind="open")
                assert open_now < limit, (open_now, limit)
                print(f"descriptors: limit {limit}, reserve {reserved}, baseline "
                      f"{baseline:.0f}, open under attack {open_now:.0f}; attacker held "
                      f"{cap + held['open_at_end']} connections, {refused_or_closed(held)} "
                      f"refused")
            finally:
                second.release()
        finally:
            first.release()
        # The attacker gone, the neighbour is served again.
        assert wait_for(lambda: neighbour_requests(mesh, "after", 1) == ["200"], 10)

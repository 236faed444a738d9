"""A hostile enrolled pod against a really started daemon's HTTP faces that listen on every
address (metrics :15020, readiness :15021; nodeproxy.admin.http_server): it holds
thousands of connections with heads that never end, floods pipelined scrapes it never
reads, streams one header that never ends and sends bytes that are not HTTP.  Meanwhile
the kubelet's probe and a Prometheus scrape (from the node) and a probe from another pod
are answered, the daemon's descriptors and memory stay bounded, and its log names the
attacker's address."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy.admin import http_server
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster, Pod

pytestmark = pytest.mark.privileged

READINESS, METRICS = 15021, 15020
HELD = 1500  # connections the attacker opens to each face


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Cluster, Pod]]:
    with Cluster(1) as c:
        c.add_pod("node0", "web-0", labels={"app": "web"})
        attacker = c.add_pod("node0", "attacker", labels={"app": "attacker"})
        c.add_pod("node0", "scraper", labels={"app": "scraper"})
        c.write_configs()
        c.start_daemons()
        yield c, attacker


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_many(pod: Pod, host: str, port: int, count: int, first: bytes) -> list[socket.socket]:
    """``count`` connections from the pod, each sending ``first`` (errors ignored: the
    daemon may refuse any of them)."""
    socks = netns.in_netns(pod.netns_path, lambda: [socket.socket() for _ in range(count)])
    for s in socks:
        s.setblocking(False)
        s.connect_ex((host, port))
    time.sleep(0.5)
    for s in socks:
        try:
            s.send(first)
        except OSError:
            pass
    return socks


def node_get(c: Cluster, port: int, path: str) -> tuple[int, str]:
    return netns.http_get(c.nodes["node0"].netns_path, f"http://127.0.0.1:{port}{path}", 3.0)


def well_served(c: Cluster, other: Pod, gateway: str) -> None:
    """What the kubelet, Prometheus and another pod see, each answered within 3 s."""
    assert node_get(c, READINESS, "/healthz/ready")[0] == 200
    status, body = node_get(c, METRICS, "/metrics")
    assert status == 200 and "nodeproxy_" in body
    status, _ = netns.http_get(other.netns_path, f"http://{gateway}:{READINESS}/healthz/ready",
                               3.0)
    assert status == 200


def exchange(pod: Pod, host: str, port: int, data: bytes, seconds: float = 5.0) -> bytes:
    sock = netns.connect(pod.netns_path, host, port, seconds)
    with sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunks.append(b"<reset>")
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_hostile_pod_does_not_take_the_probe_and_the_scrape_away(
        node: tuple[Cluster, Pod]) -> None:
    c, attacker = node
    n = c.nodes["node0"]
    assert n.daemon is not None
    pid = n.daemon.pid
    gateway = n.gateway4
    other = c.pods["web-0"]
    well_served(c, other, gateway)
    fds0, rss0 = fds(pid), rss_kib(pid)

    held = []
    try:
        # One header field that never ends: 32 MiB offered.
        endless = exchange_endless(attacker, gateway, METRICS, 32 << 20)
        # Not HTTP at all.
        garbage = exchange(attacker, gateway, READINESS, bytes(range(256)) * 4)
        hello = exchange(attacker, gateway, READINESS, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1"
                         + bytes(200))
        # Pipelined scrapes never read (each answer is the whole metrics page).
        flood = netns.socket_in(attacker.netns_path)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.settimeout(3)
        try:
            flood.connect((gateway, METRICS))
            flood.settimeout(0.2)
            data = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
            sent, deadline = 0, time.monotonic() + 3
            while sent < len(data) and time.monotonic() < deadline:
                try:
                    sent += flood.send(data[sent:sent + 65536])
                except TimeoutError:
                    pass
        except OSError as e:  # refused at the face's cap: as good as bounded
            assert e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED), e
        held.append(flood)
        # Slowloris: heads that never end, on both faces.
        for port in (READINESS, METRICS):
            held += open_many(attacker, gateway, port, HELD, b"GET /metrics HTTP/1.1\r\nX: ")
        well_served(c, other, gateway)
        time.sleep(1.0)
        well_served(c, other, gateway)
        grown_fds, grown_rss = fds(pid) - fds0, rss_kib(pid) - rss0
    finally:
        for s in held:
            s.close()
    caps = 2 * http_server.MAX_CONNECTIONS  # type: ignore[attr-defined]
    assert grown_fds <= caps + 16, (grown_fds, caps)
    assert grown_rss < 40 * 1024, grown_rss
    assert endless.startswith(b"HTTP/1.1 431 "), endless[:200]
    assert garbage.startswith(b"HTTP/1.1 400 ") and hello.startswith(b"HTTP/1.1 400 ")
    log = c.daemon_output("node0", 200_000)
    assert f"readiness: {attacker.ip4}:" in log or f"metrics: {attacker.ip4}:" in log, log[-3000:]
    time.sleep(0.5)
    well_served(c, other, gateway)
    # The operator sees it: the garbage and the TLS hello were two 400s on the readiness
    # face, the endless field one 431 on the metrics face.
    _, body = node_get(c, METRICS, "/metrics")
    assert 'nodeproxy_admin_refusals_total{face="readiness",reason="refused_400"} 2.0' \
        in body, [line for line in body.splitlines() if "admin_refusals" in line]
    assert 'nodeproxy_admin_refusals_total{face="metrics",reason="refused_431"} 1.0' in body


def exchange_endless(pod: Pod, host: str, port: int, limit: int) -> bytes:
    """Stream one header's value until the daemon answers or ``limit`` bytes went."""
    sock = netns.connect(pod.netns_path, host, port, 5.0)
    answered = b""
    with sock:
        sock.settimeout(2.0)
        sent = 0
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Forever: ")
            while sent < limit:
                sent += sock.send(b"a" * 65536)
                if readable.poll(0):  # the answer came (select() cannot take fds past 1023)
                    break
            answered = sock.recv(65536)
        except OSError as e:
            answered = f"<{e} after {sent} bytes>".encode()
    return answered



@pytest.mark.parametrize("path", [
    "/v1/pods/default/web-0%2F",  # an escaped slash inside the name
    "/v1/pods/default%2Fweb-0/x",
    "/v1/pods/default/web-0%FF",  # not UTF-8: was U+FFFD, one name for many paths
    "/v1/pods/default/..",
    "/v1/pods/default/web-0%00",
])
def test_control_socket_pod_routes_name_exactly_one_pod(node: tuple[Cluster, Pod],
                                                         path: str) -> None:
    """DELETE on a path that does not name one pod exactly is refused before the handler,
    and the pod is still enrolled."""
    c, _ = node
    n = c.nodes["node0"]
    status, body = netns.unix_http(n.control_socket, "DELETE", path)
    assert status == 400, (status, body)
    status, body = netns.unix_http(n.control_socket, "GET", "/v1/pods/default/web-0")
    assert status == 200 and '"web-0"' in body


def pages(c: Cluster) -> dict[str, float]:
    _, body = node_get(c, METRICS, "/metrics")
    out = {}
    for line in body.splitlines():
        if line.startswith("nodeproxy_admin_metrics_pages_total{"):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def test_a_pod_scraping_as_fast_as_it_can_is_throttled_and_shares_one_rendering(
        node: tuple[Cluster, Pod]) -> None:
    """Eight connections from one pod, 25 pipelined scrapes on each, read for 4 s: the
    pod is answered at its address's rate (a burst, then RATE_PER_SOURCE a second, the
    rest waiting, none refused) from at most one rendering a second, while the node's
    own scrapes (the test's, the kubelet's) are answered at once and fresh."""
    c, _ = node
    scraper = c.pods["scraper"]  # its own pod: the attacker's silent connections may
    gateway = c.nodes["node0"].gateway4  # still hold its per-address share (75 s)
    before = pages(c)
    started = time.monotonic()
    seconds = 4.0
    socks = [netns.connect(scraper.netns_path, gateway, METRICS, 3.0) for _ in range(8)]
    received = [b""] * len(socks)
    try:
        for sock in socks:
            sock.sendall(b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n" * 25)
            sock.setblocking(False)
        deadline = time.monotonic() + seconds
        probes = 0
        while time.monotonic() < deadline:
            readable = select.select(socks, [], [], 0.1)[0]
            for sock in readable:
                i = socks.index(sock)
                received[i] += sock.recv(1 << 20)
            if probes < 5 and time.monotonic() > deadline - seconds / 2:
                probes += 1  # the node is not throttled, and its page is fresh
                assert node_get(c, READINESS, "/healthz/ready")[0] == 200
    finally:
        for sock in socks:
            sock.close()
    answers = sum(r.count(b"HTTP/1.1 200 OK\r\n") for r in received)
    assert not any(r.count(b"HTTP/1.1 4") or r.count(b"HTTP/1.1 5") for r in received)
    after = pages(c)
    elapsed = time.monotonic() - started
    rendered = after["rendered"] - before["rendered"]
    # the burst, then the rate, over the time read (and one turn of slack)
    bound = http_server.RATE_BURST + http_server.RATE_PER_SOURCE * (seconds + 1)
    assert http_server.RATE_BURST <= answers <= bound, (answers, bound)
    # one a second at most for the pod, + the node's own two pages() calls (and a turn)
    assert rendered <= elapsed + 3, (rendered, elapsed, answers)
    _, body = node_get(c, METRICS, "/metrics")
    throttled = [line for line in body.splitlines()
                 if 'face="metrics",reason="throttled"' in line]
    # every answer past the burst waited, and each of the 8 connections waits now
    assert throttled and float(throttled[0].split()[-1]) >= answers - http_server.RATE_BURST

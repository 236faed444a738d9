"""The daemon's HTTP faces run on its own small server (nodeproxy.admin.http_server), not
aiohttp's: a started daemon maps none of aiohttp's packages (its client half alone was
about 4 MiB of the daemon's resident set, the whole package about 11: docs/benchmarks.md,
"Idle memory, eighth round"), and every face still answers as it did: the admin port
(status, HEAD, 404, 405, a bad query, pipelined requests), metrics, readiness and the
control socket."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster

pytestmark = pytest.mark.privileged

# aiohttp and the packages only it brings; each has a C extension that an import maps.
AIOHTTP_PACKAGES = re.compile(r"/(aiohttp|multidict|yarl|frozenlist|propcache)/[^/\n]*\.so")


@pytest.fixture(scope="module")
def node() -> Iterator[Cluster]:
    with Cluster(1) as c:
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.write_configs()
        c.start_daemons()
        yield c


def raw_exchange(c: Cluster, port: int, data: bytes) -> bytes:
    """Send ``data`` on one connection to 127.0.0.1:port in node0's netns; all it answers
    until the daemon closes (every request here ends with ``Connection: close``)."""
    sock: socket.socket = netns.connect(c.nodes["node0"].netns_path, "127.0.0.1", port, 5.0)
    with sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_started_daemon_maps_no_aiohttp(node: Cluster) -> None:
    pid = node.nodes["node0"].daemon.pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "python" in Path(f"/proc/{pid}/cmdline").read_text()
    assert "_pydantic_core" in maps  # the check reads the daemon's own extensions
    assert not AIOHTTP_PACKAGES.findall(maps), sorted(set(AIOHTTP_PACKAGES.findall(maps)))


def test_the_admin_port_answers_as_before(node: Cluster) -> None:
    c = node
    port = c.nodes["node0"].admin_port()
    status, body = c.admin_get("node0", "/ready")
    assert (status, body.splitlines()[0]) == (200, "ready")
    assert c.admin_get("node0", "/nope")[0] == 404
    status, body = c.admin_get("node0", "/stats/live?window=abc")
    assert status == 400 and "whole number" in body
    assert [p["name"] for p in c.admin_json("node0", "/pods")] == ["web-0"]

    head = raw_exchange(c, port, b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    refused = raw_exchange(c, port, b"POST /ready HTTP/1.1\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET,HEAD\r\n" in refused
    # Two requests in one segment: two answers, in order, the second closing.
    both = raw_exchange(c, port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
                                 b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d+) ", both) == [b"200", b"404"], both
    assert raw_exchange(c, port, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    too_big = raw_exchange(c, port, b"POST /ready HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
    assert too_big.startswith(b"HTTP/1.1 413 ")


def test_metrics_readiness_and_the_control_socket_answer(node: Cluster) -> None:
    c = node
    n = c.nodes["node0"]
    text = c.metrics("node0")
    assert "nodeproxy_" in text
    status, body = netns.http_get(n.netns_path, "http://127.0.0.1:15021/healthz/ready")
    assert (status, body.splitlines()[0]) == (200, "ready")
    status, body = netns.unix_http(n.control_socket, "GET", "/v1/pods")
    assert status == 200 and '"web-0"' in body
    status, body = netns.unix_http(n.control_socket, "GET", "/v1/pods/default/absent")
    assert status == 404 and "not enrolled" in body
    status, body = netns.unix_http(n.control_socket, "POST", "/v1/pods", b"{not json",
                                   {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in body

"""A node that forges the L7-authorized marker gets the destination's own decision.

The attacker here is a node, not a pod: it holds a mesh certificate (any identity its
pods may have) and talks HBONE to another node's pods directly, setting
``x-nodeproxy-l7-authorized: 1`` on its CONNECT streams, which tells a destination that
believes it "I already applied your HTTP rules".  By default the destination does not
believe it: it parses the stream and judges every request itself (nodeproxy/listeners/
inbound_hbone_l7.py).  The judge is nginx's own access log (tests/integration/hostile.py): a
request the destination's policy forbids must never reach it, and a permitted one must
(so a destination that simply refused every forged stream would fail too).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from nodeproxy.identity import tls
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.tunnel.headers import L7_AUTHORIZED
from nodeproxy_dev.testbed import netns
from tests.integration.hostile import (
    APP_H1,
    APP_H2,
    ATTACKER,
    HostileMesh,
    backend_log,
    hostile_mesh,
    violations,
)
from tests.integration.observe import metric_sum as sample
from tests.integration.observe import wait_for

pytestmark = pytest.mark.privileged

# (path, x-role or None, allowed by the variant's policy)
REQUESTS = {
    "deny": [("/admin", None, False), ("/admin/users", None, False),
             ("/public/x", "blocked", False), ("/public/ok", None, True)],
    "allow": [("/secret", None, False), ("/member/x", None, False),
              ("/member/x", "member", True), ("/public/ok", None, True)],
}


@pytest.fixture(scope="module")
def mesh() -> Iterator[HostileMesh]:
    yield from hostile_mesh()


class ForgingNode:
    """One mTLS connection from node0 to a pod's 15008, with a certificate the node
    legitimately holds (its attacker pod's identity), speaking raw HTTP/2."""

    def __init__(self, mesh: HostileMesh, pod: str):
        cluster = mesh.cluster
        ca = MeshCA.load(cluster.ca_cert, cluster.ca_key, "cluster.local")
        manager = CertificateManager(ca, "cluster.local", ttl_seconds=3600)
        raw = netns.connect(cluster.nodes["node0"].netns_path, cluster.pods[pod].ip4, 15008)
        raw.settimeout(10)
        self.sock = tls.client_context(manager, "default", ATTACKER).wrap_socket(
            raw, server_hostname=None)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.pod_ip = cluster.pods[pod].ip4

    def exchange(self, port: int, payload: bytes, *, marker: bool,
                 read_seconds: float = 3.0) -> tuple[str, bytes]:
        """A CONNECT stream to the pod's `port` carrying `payload`; (CONNECT status, the
        bytes that came back until the stream ended or read_seconds passed)."""
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", f"{self.pod_ip}:{port}"),
                   ("forwarded", f"for={self.pod_ip}")]
        if marker:
            headers.append((L7_AUTHORIZED, "1"))
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, payload)
        self.sock.sendall(self.conn.data_to_send())
        status, received, ended = "", b"", False
        deadline = time.monotonic() + read_seconds
        while not ended and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = dict(event.headers).get(b":status", b"").decode()
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    received += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) \
                        and event.stream_id == stream:
                    ended = True
            self.sock.sendall(self.conn.data_to_send())
            if status and status != "200":
                break
            if b"\r\n\r\n" in received and _h1_complete(received):
                break
        return status, received

    def close(self) -> None:
        self.sock.close()


def _h1_complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def _h1_request(path: str, role: str | None) -> bytes:
    extra = f"x-role: {role}\r\n" if role else ""
    return (f"GET {path} HTTP/1.1\r\nHost: backend\r\n{extra}"
            "Connection: close\r\n\r\n").encode()


def _h1_status(received: bytes) -> int | None:
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received[9:12])


def _h2_request(path: str, role: str | None) -> tuple[h2.connection.H2Connection, bytes]:
    inner = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    inner.initiate_connection()
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"),
               (":authority", "backend")]
    if role:
        headers.append(("x-role", role))
    inner.send_headers(1, headers, end_stream=True)
    return inner, inner.data_to_send()


def _h2_status(inner: h2.connection.H2Connection, received: bytes) -> int | None:
    for event in inner.receive_data(received):
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
            return int(dict(event.headers)[b":status"])
    return None


@pytest.mark.parametrize("marker", [True, False], ids=["forged-marker", "unmarked"])
@pytest.mark.parametrize("variant", ["deny", "allow"])
def test_forged_marker_gets_the_destinations_own_decision(mesh: HostileMesh, variant: str,
                                                          marker: bool) -> None:
    target = mesh.targets[f"{variant}-far"]
    before_logged = len(backend_log(target.h1_dir)) + len(backend_log(target.h2_dir))
    before_denied = sample(mesh.cluster.metrics("node1"), "nodeproxy_hbone_l7_requests_total",
                           result="denied")
    node = ForgingNode(mesh, target.pod)
    seen: list[tuple[str, str | None, str, int | None]] = []
    try:
        for path, role, _allowed in REQUESTS[variant]:
            connect, received = node.exchange(APP_H1, _h1_request(path, role), marker=marker)
            seen.append(("h1", role, path, _h1_status(received) if connect == "200" else None))
            inner, payload = _h2_request(path, role)
            connect, received = node.exchange(APP_H2, payload, marker=marker)
            seen.append(("h2", role, path,
                         _h2_status(inner, received) if connect == "200" else None))
    finally:
        node.close()
    assert violations(target) == [], seen  # nginx never acted on a forbidden request
    expected = []
    for path, role, allowed in REQUESTS[variant]:
        expected += [("h1", role, path, 200 if allowed else 403),
                     ("h2", role, path, 200 if allowed else 403)]
    assert seen == expected
    # The permitted requests did reach nginx: the destination judged, it did not just refuse.
    allowed_count = 2 * sum(1 for *_, allowed in REQUESTS[variant] if allowed)

    def logged() -> int:  # nginx writes its log line after the response has left
        return len(backend_log(target.h1_dir)) + len(backend_log(target.h2_dir)) - before_logged

    wait_for(lambda: logged() >= allowed_count, timeout=5)
    assert logged() == allowed_count
    denied = sample(mesh.cluster.metrics("node1"), "nodeproxy_hbone_l7_requests_total",
                    result="denied")
    assert denied - before_denied == 2 * sum(1 for *_, ok in REQUESTS[variant] if not ok)


def test_forged_stream_that_is_not_http_reaches_nothing(mesh: HostileMesh) -> None:
    """Bytes that are not HTTP, on a stream only HTTP requests could be allowed on: the
    destination closes it and the backend logs nothing."""
    target = mesh.targets["allow-far"]
    before = len(backend_log(target.h1_dir))
    node = ForgingNode(mesh, target.pod)
    try:
        _connect, received = node.exchange(APP_H1, b"\x16\x03\x01garbage-not-http\r\n\r\n",
                                           marker=True)
    finally:
        node.close()
    assert not received.startswith(b"HTTP/1.1 200")
    assert len(backend_log(target.h1_dir)) == before


def test_requests_through_the_source_proxy_still_pass_across_nodes(mesh: HostileMesh) -> None:
    """The ordinary path: the attacker pod's own node proxy sends marked streams; the
    destination judges them again and lets the permitted request through."""
    target = mesh.targets["allow-far"]
    host = mesh.vip(target.h1_service)
    ok = mesh.raw(host, [_h1_request("/public/ok", None)])
    bad = mesh.raw(host, [_h1_request("/secret", None)])
    assert ok["received"].startswith(b"HTTP/1.1 200"), ok
    assert bad["received"].startswith(b"HTTP/1.1 403"), bad
    assert violations(target) == []


def test_trusting_the_marker_trusts_every_node_with_a_certificate() -> None:
    """What tunnel.trustSourceL7Authorization: true means (docs/security.md): the same
    forged stream now reaches the backend with a path the destination's policy denies.
    This is why the flag is off by default, and the proof that the tests above can fail."""
    for trusting in hostile_mesh({"tunnel": {"trustSourceL7Authorization": True}}):
        target = trusting.targets["deny-far"]
        node = ForgingNode(trusting, target.pod)
        try:
            connect, received = node.exchange(APP_H1, _h1_request("/admin", None), marker=True)
        finally:
            node.close()
        assert connect == "200"
        assert _h1_status(received) == 200
        # nginx writes its log line after the response has left: give it that moment.
        wait_for(lambda t=target: bool(violations(t)), timeout=5)
        assert [e["uri"] for e in violations(target)] == ["/admin"]

"""Upgrade smuggling and CONNECT from a hostile pod (issue 13, item 1), judged by the
backends' own logs.

The guarded nginx backends (tests/integration/hostile.py) answer an upgrade request with
an ordinary 200: the smuggling case, where a proxy that relays raw bytes before a 101
lets a request behind the upgrade reach nginx unchecked.  Two more backends run the
project's test server (``http_backend``: a real WebSocket echo on ``/ws``, and ``/switch``,
which answers 101 unasked) under the ALLOW-only policy, near and far, for the upgrades
that must keep working and the upstreams that switch when they must not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.hostile import ATTACKER, HostileMesh, Target, build, violations
from tests.integration.observe import access_log_entries, fqdn, metric_sum, wait_for

pytestmark = pytest.mark.privileged

WS_APP = 8080
WS_SITES = {"ws-near": "node0", "ws-far": "node1"}
TARGETS = ("deny-near", "deny-far", "allow-near", "allow-far")
SMUGGLED = b"GET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def mesh() -> Iterator[HostileMesh]:
    with Cluster(2) as c:
        for pod, node in WS_SITES.items():
            c.add_pod(node, pod, labels={"app": "allow-web", "site": pod},
                      service_account="allow-web")
            c.serve_http(pod, WS_APP, pod, "--log", os.path.join(c.dir, f"{pod}.log"))
            c.add_service(pod, port=80, target_port=WS_APP,
                          selector={"app": "allow-web", "site": pod}, app_protocol="http")
        yield build(c)


def ws_log(mesh: HostileMesh, pod: str) -> list[dict[str, Any]]:
    """The requests the http_backend in `pod` received (its --log)."""
    path = os.path.join(mesh.cluster.dir, f"{pod}.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def upgrade_request(path: str = "/public/ws", *, token: str | None = "websocket",
                    connection: tuple[str, ...] = ("Upgrade",), extra: bytes = b"") -> bytes:
    lines = [b"GET %s HTTP/1.1\r\nHost: x\r\n" % path.encode()]
    lines += [b"Connection: %s\r\n" % c.encode() for c in connection]
    if token is not None:
        lines.append(b"Upgrade: %s\r\n" % token.encode())
    return b"".join(lines) + extra + b"\r\n"


def responses(received: bytes) -> list[int]:
    """The status codes of the HTTP/1.1 responses at line starts in what came back."""
    return [int(m) for m in re.findall(rb"(?:^|\n)HTTP/1\.1 (\d{3}) ", received)]


def target(mesh: HostileMesh, name: str) -> Target:
    return mesh.targets[name]


# --- smuggling behind an upgrade: nginx answers 200, never 101 --------------------------

# (Upgrade token, Connection header(s), status the client must get)
OFFERS = {
    "websocket": ("websocket", ("Upgrade",), 200),  # allowed; nginx declines with a 200
    "mixed-case": ("WebSocket", ("Upgrade",), 200),
    "h2c": ("h2c", ("Upgrade, HTTP2-Settings",), 200),  # stripped: an ordinary request
    "made-up": ("x-tunnel", ("Upgrade",), 403),
    "several": ("websocket, h2c", ("Upgrade",), 403),
    "several-other": ("foo/1, websocket", ("Upgrade",), 403),
    "keep-alive-upgrade": ("websocket", ("keep-alive, Upgrade",), 200),
    "second-connection": ("websocket", ("keep-alive", "upgrade"), 200),
}
# An empty Upgrade header is no upgrade to llhttp: both requests are ordinary HTTP, and
# the second is authorized on its own (403).
PLAIN = ("", ("Upgrade",))


@pytest.mark.parametrize("offer", OFFERS)
@pytest.mark.parametrize("name", TARGETS)
def test_request_pipelined_behind_an_upgrade_is_never_forwarded(mesh: HostileMesh,
                                                                name: str, offer: str):
    t = target(mesh, name)
    token, connection, status = OFFERS[offer]
    extra = b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n" if token == "h2c" else b""
    result = mesh.raw(mesh.vip(t.h1_service),
                      [upgrade_request(token=token, connection=connection, extra=extra)
                       + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) == [status], result["received"][:300]
    assert b"ADMIN-SECRET" not in result["received"]
    assert result["closed_by_peer"] or result["reset"]  # the connection does not go on


# More shapes of the same attack: (first write, statuses the client may get).
SHAPES = {
    # An ordinary request first, then the upgrade, then the smuggled one: two answers.
    "after-a-plain-request": (b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n"
                              + upgrade_request(), ([200, 200],)),
    "http-1.0": (upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0"), ([200],)),
    "post": (upgrade_request().replace(b"GET", b"POST"), ([200],)),
    "upgrade-and-close": (upgrade_request(connection=("Upgrade, close",)), ([200],)),
    # Upgrade without Connection: upgrade is no upgrade: plain requests, each authorized.
    "no-connection-token": (upgrade_request(connection=("keep-alive",)), ([200, 403],)),
    # Two Upgrade headers: the first is offered (200), or joined into two tokens (403).
    "two-upgrade-headers": (upgrade_request(extra=b"Upgrade: h2c\r\n"), ([200], [403])),
    "lower-case-names": (upgrade_request().replace(b"Connection", b"connection")
                         .replace(b"Upgrade:", b"upgrade:"), ([200],)),
    "tab-in-token": (upgrade_request(token="\twebsocket"), ([200],)),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", TARGETS)
def test_more_upgrade_shapes_smuggle_nothing(mesh: HostileMesh, name: str, shape: str):
    t = target(mesh, name)
    data, outcomes = SHAPES[shape]
    result = mesh.raw(mesh.vip(t.h1_service), [data + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) in outcomes, result["received"][:400]
    assert b"ADMIN-SECRET" not in result["received"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("name", TARGETS)
def test_upgrade_request_with_a_body_is_refused(mesh: HostileMesh, name: str, framing: str):
    """The body is the smuggled request: where a body ends and the upgraded protocol
    begins is exactly where a proxy and a backend may disagree."""
    t = target(mesh, name)
    if framing == "chunked":
        extra, body = b"Transfer-Encoding: chunked\r\n", \
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    else:
        extra, body = b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED
    result = mesh.raw(mesh.vip(t.h1_service), [upgrade_request(extra=extra) + body + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) == [400]


@pytest.mark.parametrize("name", TARGETS)
def test_upgrade_to_an_http2_service_smuggles_nothing(mesh: HostileMesh, name: str):
    """An HTTP/1.1 client upgrading on a service declared HTTP/2 (nginx speaks h2c only)."""
    t = target(mesh, name)
    result = mesh.raw(mesh.vip(t.h2_service), [upgrade_request() + SMUGGLED])
    assert violations(t) == []
    assert b"ADMIN-SECRET" not in result["received"]
    assert len(responses(result["received"])) == 1, result["received"][:300]


@pytest.mark.parametrize("name", TARGETS)
def test_empty_upgrade_is_plain_http_and_each_request_is_authorized(mesh: HostileMesh,
                                                                    name: str):
    t = target(mesh, name)
    token, connection = PLAIN
    result = mesh.raw(mesh.vip(t.h1_service),
                      [upgrade_request(token=token, connection=connection) + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) == [200, 403]


@pytest.mark.parametrize("offer", ["websocket", "h2c", "made-up"])
@pytest.mark.parametrize("name", TARGETS)
def test_request_after_the_declined_upgrade_is_never_forwarded(mesh: HostileMesh,
                                                               name: str, offer: str):
    t = target(mesh, name)
    token, connection, status = OFFERS[offer]
    result = mesh.raw(mesh.vip(t.h1_service),
                      [upgrade_request(token=token, connection=connection), SMUGGLED],
                      gap=1.0)
    assert violations(t) == []
    assert responses(result["received"]) == [status], result["received"][:300]
    assert b"ADMIN-SECRET" not in result["received"]


@pytest.mark.parametrize("name", TARGETS)
def test_denied_upgrade_request_is_refused(mesh: HostileMesh, name: str):
    t = target(mesh, name)
    result = mesh.raw(mesh.vip(t.h1_service), [upgrade_request("/admin/ws") + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) == [403]


# --- CONNECT -------------------------------------------------------------------------------

@pytest.mark.parametrize("request_line", [
    b"CONNECT %(vip)s:80 HTTP/1.1",
    b"CONNECT /admin/x HTTP/1.1",
    b"CONNECT 127.0.0.1:8080 HTTP/1.1",
])
@pytest.mark.parametrize("name", TARGETS)
def test_http1_connect_is_refused(mesh: HostileMesh, name: str, request_line: bytes):
    t = target(mesh, name)
    vip = mesh.vip(t.h1_service)
    head = request_line % {b"vip": vip.encode()} + b"\r\nHost: x\r\n\r\n"
    result = mesh.raw(vip, [head + SMUGGLED])
    assert violations(t) == []
    assert responses(result["received"]) == [403]
    assert result["closed_by_peer"] or result["reset"]


H2_CLIENT = r"""
import json, socket, sys, time
import h2.config, h2.connection, h2.events
host, port, extended = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
sock = socket.create_connection((host, port), timeout=5)
conn = h2.connection.H2Connection(h2.config.H2Configuration(
    client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
conn.initiate_connection()
if extended:
    headers = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
               (":path", "/admin/x"), (":authority", "x")]
else:
    headers = [(":method", "CONNECT"), (":authority", host + ":80")]
conn.send_headers(1, headers)
conn.send_data(1, b"GET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n")
sock.sendall(conn.data_to_send())
out = {"status": None, "reset": None, "data": "", "ended": False}
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not out["ended"] and out["reset"] is None:
    try:
        chunk = sock.recv(65536)
    except (TimeoutError, OSError):
        break
    if not chunk:
        break
    for event in conn.receive_data(chunk):
        if isinstance(event, h2.events.ResponseReceived):
            out["status"] = dict(event.headers).get(b":status", b"").decode()
        elif isinstance(event, h2.events.DataReceived):
            out["data"] += event.data.decode("latin-1")
            conn.acknowledge_received_data(event.flow_controlled_length, 1)
        elif isinstance(event, h2.events.StreamEnded):
            out["ended"] = True
        elif isinstance(event, h2.events.StreamReset):
            out["reset"] = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            out["reset"] = -int(event.error_code)
    sock.sendall(conn.data_to_send())
print(json.dumps(out))
"""


@pytest.mark.parametrize("extended", [False, True], ids=["connect", "extended-connect"])
@pytest.mark.parametrize("name", TARGETS)
def test_http2_connect_is_refused(mesh: HostileMesh, name: str, extended: bool):
    t = target(mesh, name)
    result = h2_connect(mesh, t.h2_service, extended)
    assert violations(t) == []
    assert result["status"] == "403", result
    assert result["data"] == "upgrade not allowed"


# --- real upgrades (http_backend: WebSocket echo, /switch) -----------------------------

WS_CLIENT = r"""
import asyncio, hashlib, json, os, sys
import aiohttp
url, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    sent, got = hashlib.sha256(), hashlib.sha256()
    out = {}
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url) as ws:
                for i in range(count):
                    data = os.urandom(size)
                    sent.update(data)
                    await ws.send_bytes(data)
                    got.update(await ws.receive_bytes(timeout=10))
            out["status"] = 101
        except aiohttp.WSServerHandshakeError as e:
            out["status"] = e.status
    out["sent"], out["got"] = sent.hexdigest(), got.hexdigest()
    print(json.dumps(out))
asyncio.run(main())
"""


def ws_talk(mesh: HostileMesh, service: str, path: str, count: int = 16,
            size: int = 65536) -> dict[str, Any]:
    url = f"http://{mesh.vip(service)}:80{path}"
    out = mesh.cluster.run_in_pod(ATTACKER, [sys.executable, "-c", WS_CLIENT, url,
                                             str(count), str(size)],
                                  check=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def node0_metric(mesh: HostileMesh, name: str, **labels: str) -> float:
    return metric_sum(mesh.cluster.metrics("node0"), name, **labels)


@pytest.mark.parametrize("pod", WS_SITES)
def test_websocket_upgrade_works_and_is_a_tcp_flow(mesh: HostileMesh, pod: str):
    labels = {"destination_service": fqdn(pod), "source_workload": ATTACKER,
              "reporter": "source", "connection_security_policy": "mutual_tls",
              "destination_workload": "allow-web"}
    opened = node0_metric(mesh, "istio_tcp_connections_opened_total", **labels)
    closed = node0_metric(mesh, "istio_tcp_connections_closed_total", **labels)
    sent = node0_metric(mesh, "istio_tcp_received_bytes_total", **labels)
    switched = node0_metric(mesh, "istio_requests_total", response_code="101", **labels)
    count, size = 16, 65536
    result = ws_talk(mesh, pod, "/public/ws", count, size)
    assert result["status"] == 101
    assert result["got"] == result["sent"]  # every byte echoed intact
    assert wait_for(lambda: node0_metric(mesh, "istio_tcp_connections_closed_total",
                                         **labels) == closed + 1), \
        [line for line in mesh.cluster.metrics("node0").splitlines() if "istio_tcp" in line
         and pod in line]
    assert node0_metric(mesh, "istio_tcp_connections_opened_total", **labels) == opened + 1
    # The client's frames: the payloads plus WebSocket framing (masks, headers, close).
    moved = node0_metric(mesh, "istio_tcp_received_bytes_total", **labels) - sent
    assert count * size <= moved <= count * size + count * 16 + 64
    assert node0_metric(mesh, "istio_requests_total", response_code="101",
                        **labels) == switched + 1
    lines = [e for e in access_log_entries(mesh.cluster.dir)
             if e["destination_service"] == fqdn(pod) and e["path"] == "/public/ws"]
    assert any(e["protocol"] == "websocket" and e["bytes_received"] >= count * size
               for e in lines), lines
    assert [e for e in ws_log(mesh, pod) if not e["path"].startswith("/public/")] == []


@pytest.mark.parametrize("pod", WS_SITES)
def test_denied_websocket_never_reaches_the_backend(mesh: HostileMesh, pod: str):
    result = ws_talk(mesh, pod, "/admin/ws", 1, 16)
    assert result["status"] == 403
    assert [e for e in ws_log(mesh, pod) if e["path"].startswith("/admin")] == []


def ws_frame(payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked binary client frame (payload under 126 bytes)."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + mask + masked


WS_HANDSHAKE = (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("pod", WS_SITES)
def test_early_bytes_are_relayed_after_a_real_101(mesh: HostileMesh, pod: str):
    payload = hashlib.sha256(pod.encode()).digest()  # 32 bytes to find in the echo
    result = mesh.raw(mesh.vip(pod), [upgrade_request(extra=WS_HANDSHAKE) + ws_frame(payload)],
                      read_seconds=2.0)
    received = result["received"]
    assert responses(received) == [101]
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"upgrade: websocket" in head.lower()
    assert rest.startswith(bytes([0x82, len(payload)]) + payload)  # the echo, unmasked


@pytest.mark.parametrize("pod", WS_SITES)
def test_smuggled_request_behind_a_real_upgrade_goes_to_the_upgraded_protocol(
        mesh: HostileMesh, pod: str):
    """A real WebSocket server gets the bytes as WebSocket data (it closes the connection
    on the bad frame); never as an HTTP request."""
    result = mesh.raw(mesh.vip(pod), [upgrade_request(extra=WS_HANDSHAKE) + SMUGGLED])
    assert responses(result["received"]) == [101]
    assert [e for e in ws_log(mesh, pod) if e["path"].startswith("/admin")] == []


@pytest.mark.parametrize("pod", WS_SITES)
def test_101_to_a_request_without_upgrade_is_a_502(mesh: HostileMesh, pod: str):
    # Counted by the node that sees the 101: across nodes the destination, which judges
    # the stream's requests itself (nodeproxy/listeners/inbound_hbone_l7.py).
    node = WS_SITES[pod]
    before = metric_sum(mesh.cluster.metrics(node), "nodeproxy_http_upgrade_refusals_total",
                        reason="unexpected_101")
    result = mesh.raw(mesh.vip(pod),
                      [b"GET /public/switch/websocket HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED])
    assert responses(result["received"]) == [502]
    assert b"switched:" not in result["received"]
    assert [e for e in ws_log(mesh, pod) if e["path"].startswith("/admin")] == []
    assert metric_sum(mesh.cluster.metrics(node), "nodeproxy_http_upgrade_refusals_total",
                      reason="unexpected_101") == before + 1


@pytest.mark.parametrize("pod", WS_SITES)
def test_101_naming_another_protocol_is_a_502(mesh: HostileMesh, pod: str):
    result = mesh.raw(mesh.vip(pod), [upgrade_request("/public/switch/h2c") + SMUGGLED])
    assert responses(result["received"]) == [502]
    assert b"switched:" not in result["received"]
    assert [e for e in ws_log(mesh, pod) if e["path"].startswith("/admin")] == []


@pytest.mark.parametrize("pod", WS_SITES)
def test_101_naming_the_offer_is_relayed(mesh: HostileMesh, pod: str):
    result = mesh.raw(mesh.vip(pod), [upgrade_request("/public/switch/websocket")],
                      read_seconds=3.0)
    assert responses(result["received"]) == [101]
    assert result["received"].endswith(b"\r\n\r\nswitched:websocket\n")


def h2_connect(mesh: HostileMesh, service: str, extended: bool) -> dict[str, Any]:
    out = mesh.cluster.run_in_pod(
        ATTACKER, [sys.executable, "-c", H2_CLIENT, mesh.vip(service), "80",
                   "1" if extended else "0"], check=True, timeout=30).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_each_refusal_is_counted_once(mesh: HostileMesh):
    t = target(mesh, "deny-near")
    vip = mesh.vip(t.h1_service)
    sends = {
        "not_allowed": upgrade_request(token="x-tunnel"),
        "several_tokens": upgrade_request(token="websocket, x-tunnel"),
        "h2c_stripped": upgrade_request(token="h2c"),
        "connect": b"CONNECT %s:80 HTTP/1.1\r\nHost: x\r\n\r\n" % vip.encode(),
        "with_body": upgrade_request(extra=b"Content-Length: 3\r\n") + b"abc",
        "not_switched": upgrade_request(),
    }

    def counts() -> dict[tuple[str, str], float]:
        exposition = mesh.cluster.metrics("node0")
        return {(p, r): metric_sum(exposition, "nodeproxy_http_upgrade_refusals_total",
                                   protocol=p, reason=r)
                for p in ("http/1.1", "http/2")
                for r in (*sends, "connect", "extended_connect")}

    before = counts()
    for data in sends.values():
        mesh.raw(vip, [data])
    assert h2_connect(mesh, t.h2_service, False)["status"] == "403"
    assert h2_connect(mesh, t.h2_service, True)["status"] == "403"
    after = counts()
    expected = {key: 1.0 if key in {("http/1.1", r) for r in sends} | {
        ("http/2", "connect"), ("http/2", "extended_connect")} else 0.0 for key in before}
    assert {k: after[k] - before[k] for k in before} == expected
    assert violations(t) == []

"""Attacks from an enrolled pod that the proxy already stopped before issue 13, kept as
regression tests: request smuggling through Content-Length / Transfer-Encoding
disagreements, oversized heads, a CONTINUATION flood, plaintext and certificate-less TLS
on the HBONE port, and the node's admin port.

Each test judges by what the guarded nginx acted on (tests/integration/hostile.py): a
smuggled ``/admin`` request must never appear in its access log, whatever the proxy
answered.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator

import pytest

from nodeproxy.ports import HBONE_PORT
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration import hostile
from tests.integration.hostile import ATTACKER, HostileMesh, Target, backend_log, violations

pytestmark = pytest.mark.privileged

SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"

# Each: a request whose framing a lenient parser could read two ways, carrying SMUGGLED.
# Every one of them must be refused whole (400/501) or framed so that SMUGGLED is either
# the body of the first request or a request of its own that policy judges.
FRAMING_ATTACKS: dict[str, bytes] = {
    "cl-te": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 46\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-cl": b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
             b"Content-Length: 4\r\n\r\n2e\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "te-identity-then-chunked": b"POST /public/x HTTP/1.1\r\nHost: a\r\n"
                                b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked"
                                b"\r\nContent-Length: 46\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-space-before-colon": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 46\r\n"
                             b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-obs-fold": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 46\r\n"
                   b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-xchunked": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 46\r\n"
                   b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-chunked-identity-list": b"POST /public/x HTTP/1.1\r\nHost: a\r\n"
                                b"Transfer-Encoding: chunked, identity\r\n"
                                b"Content-Length: 46\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "two-content-lengths": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n"
                           b"Content-Length: 46\r\n\r\n" + SMUGGLED,
    "content-length-plus": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n"
                           + SMUGGLED,
    "content-length-list": b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 46\r\n"
                           b"\r\n" + SMUGGLED,
    "bare-lf": b"POST /public/x HTTP/1.1\nHost: a\nContent-Length: 0\n"
               b"Transfer-Encoding: chunked\n\n0\n\n" + SMUGGLED,
    "chunk-size-overflow": b"POST /public/x HTTP/1.1\r\nHost: a\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n10000000000000002e\r\n"
                           + SMUGGLED + b"\r\n0\r\n\r\n",
    "chunk-ext-lf": b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                    b"\r\n0;ext\n\r\n" + SMUGGLED,
    "nul-in-header": b"POST /public/x HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n"
                     b"Content-Length: 0\r\n\r\n" + SMUGGLED,
    "space-in-target": b"GET /public/x /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    "http09": b"GET /admin\r\n\r\n",
}


OUTSIDER = "outsider"  # a pod on node0 outside the mesh: its connections are not captured


@pytest.fixture(scope="module")
def mesh() -> Iterator[HostileMesh]:
    with Cluster(2) as c:
        c.add_unenrolled_pod("node0", OUTSIDER)
        yield hostile.build(c)


def _deny_targets(mesh: HostileMesh) -> list[Target]:
    return [t for t in mesh.targets.values() if t.variant == "deny"]


@pytest.mark.parametrize("attack", sorted(FRAMING_ATTACKS))
def test_framing_disagreement_never_smuggles_a_denied_request(mesh: HostileMesh,
                                                              attack: str) -> None:
    for target in mesh.targets.values():
        before = len(backend_log(target.h1_dir))
        out = mesh.raw(mesh.vip(target.h1_service), [FRAMING_ATTACKS[attack]],
                       read_seconds=1.5)
        assert out["connect_error"] is None, out
        assert violations(target) == [], (attack, target.name, out["received"][:300])
        served = backend_log(target.h1_dir)[before:]
        assert not any("smuggled" in e["uri"] for e in served), (attack, target.name, served)


def test_oversized_head_is_refused_and_never_reaches_the_backend(mesh: HostileMesh) -> None:
    target = mesh.targets["allow-far"]
    before = len(backend_log(target.h1_dir))
    head = (b"GET /public/big HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80)) + b"\r\n")
    writes = [head[i:i + 30000] for i in range(0, len(head), 30000)]  # argv-sized pieces
    out = mesh.raw(mesh.vip(target.h1_service), writes)
    assert out["received"].startswith(b"HTTP/1.1 431 "), out["received"][:200]
    assert backend_log(target.h1_dir)[before:] == []


CONTINUATION_FLOOD = textwrap.dedent("""
    import json, socket, sys, time
    from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame
    import hpack
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + SettingsFrame(0).serialize())
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"),
                                    (":path", "/admin/continuation"), (":authority", "a")])
    s.sendall(HeadersFrame(1, data=block[:4]).serialize())
    junk = ContinuationFrame(1, data=b"x" * 16000).serialize()
    sent, closed, start = 0, False, time.monotonic()
    try:
        while sent < 2000 and time.monotonic() - start < 10:
            s.sendall(junk)
            sent += 1
    except OSError:
        closed = True
    s.settimeout(2)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except OSError:
        pass
    print(json.dumps({"frames": sent, "closed": closed, "goaway": b"\\x07" in data[:200]
                      or len(data) > 0, "seconds": time.monotonic() - start}))
""")


def test_continuation_flood_closes_the_connection_and_reaches_nothing(
        mesh: HostileMesh) -> None:
    for name in ("deny-near", "deny-far"):
        target = mesh.targets[name]
        before = len(backend_log(target.h2_dir))
        run = mesh.cluster.run_in_pod(ATTACKER, [
            sys.executable, "-c", CONTINUATION_FLOOD, mesh.vip(target.h2_service), "80"],
            timeout=60, check=True)
        out = json.loads(run.stdout.strip().splitlines()[-1])
        # The proxy refuses the header block long before 2000 x 16 kB arrive.
        assert out["closed"] and out["frames"] < 2000, out
        assert backend_log(target.h2_dir)[before:] == []


TLS_PROBE = textwrap.dedent("""
    import json, socket, ssl, sys
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = {"handshake": False, "received": ""}
    try:
        s = socket.create_connection((host, port), timeout=5)
        if mode == "plain":
            s.sendall(b"GET /admin HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
            s.settimeout(3)
            out["received"] = s.recv(4096).decode("latin-1")
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            t = ctx.wrap_socket(s, server_hostname="x")
            out["handshake"] = True
            t.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n")
            t.settimeout(3)
            out["received"] = t.recv(4096).decode("latin-1")
    except (OSError, ssl.SSLError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
""")


@pytest.mark.parametrize("source", [ATTACKER, OUTSIDER])
@pytest.mark.parametrize("mode", ["plain", "tls-without-certificate"])
def test_hbone_port_gives_a_pod_without_a_mesh_certificate_nothing(
        mesh: HostileMesh, mode: str, source: str) -> None:
    for name in ("deny-near", "deny-far"):
        target = mesh.targets[name]
        pod_ip = mesh.cluster.pods[target.pod].ip4
        before = len(backend_log(target.h1_dir))
        run = mesh.cluster.run_in_pod(source, [sys.executable, "-c", TLS_PROBE, pod_ip,
                                                 str(HBONE_PORT), mode], timeout=30, check=True)
        out = json.loads(run.stdout.strip().splitlines()[-1])
        # No HTTP answer ever comes back, and nothing reaches the application.
        assert "ADMIN" not in out["received"] and "HTTP/1.1 200" not in out["received"], out
        assert backend_log(target.h1_dir)[before:] == []


def test_admin_port_is_not_reachable_from_a_pod(mesh: HostileMesh) -> None:
    node = mesh.cluster.nodes["node0"]
    out = mesh.raw(node.gateway4, [b"GET /config_dump HTTP/1.1\r\nHost: a\r\n\r\n"],
                   port=node.admin_port(), read_seconds=1)
    assert out["connect_error"] is not None or out["received"] == b"", out


@pytest.mark.parametrize("source", [ATTACKER, OUTSIDER])
def test_pod_ip_instead_of_the_service_gets_no_denied_request_through(
        mesh: HostileMesh, source: str) -> None:
    """Dialling the pod's own address skips the service's L7 path; the destination's HTTP
    rules then apply to the whole connection (fail closed), for mesh and non-mesh
    clients alike."""
    for target in mesh.targets.values():
        pod_ip = mesh.cluster.pods[target.pod].ip4
        for path in (b"/admin", b"/public/../admin", b"/other"):
            mesh.raw(pod_ip, [b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"],
                     port=hostile.APP_H1, read_seconds=1, pod=source)
        assert violations(target) == [], (source, target.name)

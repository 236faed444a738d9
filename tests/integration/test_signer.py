"""The mesh signing service (`nodeproxy ca serve`) as a process, judged by what a node
daemon gets from it.

The Kubernetes API is the suite's stand-in speaking the documented protocol
(tests/integration/fake_kube_api.py: TokenReview, pods by name and by node).  Two node
daemons are represented by their projected ServiceAccount tokens, bound to their pods
on node-a and node-b; they ask through the real client (nodeproxy.signer.signing_client), which
makes the key and CSR in memory and checks the answer.  The leaves are verified against
the mesh root with OpenSSL (a TLS handshake between two of them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.identity import tls
from nodeproxy.identity.csr import make_csr
from nodeproxy.identity.mesh_ca import IssuedCert
from nodeproxy.signer.signing_client import SignerClient, SignerError
from nodeproxy_dev.testbed.signer_process import signer_argv, wait_listening
from tests.integration import fake_kube_api as kube

TD = "cluster.local"
AUDIENCE = "nodeproxy-ca"
AGENT_NS, AGENT_SA = "nodeproxy-system", "nodeproxy"
DNS = "signer.test"


class Signer:
    """`nodeproxy ca serve` as a child process; restartable on the same port."""

    def __init__(self, directory: Path, api_url: str):
        self.dir = directory
        self.api_url = api_url
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "signer.log"

    def argv(self, cert: str = "ca-cert.pem", key: str = "ca-key.pem") -> list[str]:
        return signer_argv(sys.executable, self.dir, trust_domain=TD,
                           listen=f"127.0.0.1:{self.port}", kube_api=self.api_url,
                           dns_name=DNS, audience=AUDIENCE, max_ttl_seconds=3600,
                           cert=cert, key=key)

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.log, offset)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def metrics(self) -> dict[str, float]:
        context = ssl.create_default_context(cafile=str(self.dir / "root-cert.pem"))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=DNS) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        body = data.partition(b"\r\n\r\n")[2].decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{label}}}"] = sample.value
        return out


class Node:
    """A node daemon as the signer sees it: its pod on a node and its token file."""

    def __init__(self, env: Env, name: str, node: str, audience: str = AUDIENCE,
                 sa: str = AGENT_SA, bound: bool = True):
        self.env, self.name, self.node = env, name, node
        uid = f"uid-{name}"
        env.api.do(env.api.api.put, "pods", kube.pod(name, AGENT_NS, node=node, sa=sa,
                                                     host_network=sa == AGENT_SA))
        token = env.api.do(env.api.api.issue_token, f"token-{name}-{audience}-{sa}",
                           namespace=AGENT_NS, service_account=sa,
                           pod_name=name if bound else None, pod_uid=uid if bound else None,
                           audiences=[audience])
        # kube.pod gives uid-<ns>-<name>; the token must name the same object.
        env.api.do(_set_uid, env.api.api, name, uid)
        self.token_file = env.dir / f"{name}-{audience}-{sa}.token"
        self.token_file.write_text(token)

    def sign(self, namespace: str, sa: str, *, server_name: str = DNS) -> IssuedCert:
        async def run() -> IssuedCert:
            client = SignerClient(self.env.signer.url,
                                  trust_bundle_pem=(self.env.dir / "root-cert.pem").read_bytes(),
                                  token_file=str(self.token_file), server_name=server_name,
                                  timeout=5)
            try:
                return await client.sign(f"spiffe://{TD}/ns/{namespace}/sa/{sa}", 3600)
            finally:
                await client.close()
        return asyncio.run(run())

    def refusal(self, namespace: str, sa: str) -> SignerError:
        with pytest.raises(SignerError) as info:
            self.sign(namespace, sa)
        return info.value


def _set_uid(api: kube.FakeKubeApi, name: str, uid: str) -> None:
    obj = api.objects["pods"][f"{AGENT_NS}/{name}"]
    obj["metadata"]["uid"] = uid
    api.put("pods", obj)


class Env:
    def __init__(self, directory: Path):
        self.dir = directory
        out = subprocess.run([sys.executable, "-m", "nodeproxy", "ca", "init",
                              "--trust-domain", TD, "--out", str(directory)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.api = kube.ApiThread()
        self.signer = Signer(directory, self.api.url)
        self.signer.start()

    def workload(self, name: str, namespace: str, sa: str, node: str) -> None:
        self.api.do(self.api.api.put, "pods", kube.pod(name, namespace, node=node, sa=sa))

    def close(self) -> None:
        self.signer.stop()
        self.api.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def refused(env: Env, reason: str) -> float:
    return env.signer.metrics().get(f"nodeproxy_ca_sign_refused_total{{reason={reason}}}", 0.0)


def _handshake(server: IssuedCert, client: IssuedCert, root: bytes) -> str:
    """A mutual TLS 1.3 handshake between two leaves, each side verifying the other against
    the mesh root: the peer's SPIFFE ID as the server saw it."""
    server_ctx = tls.build_context(server, root, server_side=True)
    client_ctx = tls.build_context(client, root, server_side=False)
    a, b = socket.socketpair()
    seen: list[str] = []

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as s:
            seen.append(str(tls.verify_peer(s, TD)))
            s.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b, server_hostname=None) as c:
        tls.verify_peer(c, TD)
        c.sendall(b"x")
    thread.join(10)
    return seen[0]


def test_a_node_gets_its_pods_identities_and_is_refused_others(env: Env) -> None:
    node_a = Node(env, "nodeproxy-a", "node-a")
    env.workload("api-1", "payments", "api", "node-a")
    env.workload("web-1", "shop", "web", "node-b")
    env.workload("pending-1", "shop", "batch", "node-a")
    env.api.do(_phase, env.api.api, "shop/pending-1", "Pending")

    leaf = node_a.sign("payments", "api")
    assert leaf.spiffe_id == f"spiffe://{TD}/ns/payments/sa/api"
    assert len(leaf.chain) == 1  # the intermediate follows the leaf; the root does not
    assert leaf.lifetime <= 3600 + 61
    root = (env.dir / "root-cert.pem").read_bytes()
    # A leaf the signer made verifies against the root with OpenSSL, in both roles.
    other = node_a.sign("payments", "api")
    assert _handshake(leaf, other, root) == leaf.spiffe_id

    before = refused(env, "no_such_pod_on_node")
    for namespace, sa in (("shop", "web"),          # a pod on another node
                          ("shop", "batch"),        # on this node, not running
                          ("payments", "admin"),    # nobody
                          (AGENT_NS, AGENT_SA)):    # the daemon's own identity: not a workload
        error = node_a.refusal(namespace, sa)
        assert error.reason == "no_such_pod_on_node", error
        assert "node-a" in str(error)
    assert refused(env, "no_such_pod_on_node") == before + 4
    log = env.signer.log.read_text()
    assert "signing refused (no_such_pod_on_node)" in log and "ns/shop/sa/web" in log


def _phase(api: kube.FakeKubeApi, key: str, phase: str) -> None:
    obj = api.objects["pods"][key]
    obj["status"]["phase"] = phase
    api.put("pods", obj)


def test_tokens_that_are_not_the_node_agents_own_are_refused(env: Env) -> None:
    env.workload("api-1", "payments", "api", "node-a")
    Node(env, "nodeproxy-a", "node-a")  # the legitimate daemon exists too
    stolen = Node(env, "nodeproxy-x", "node-a", audience="some-other-service")
    assert stolen.refusal("payments", "api").reason == "wrong_audience"
    # A workload's own token, minted for the signer's audience: not the node agent.
    workload = Node(env, "api-1-token", "node-a", sa="api")
    assert workload.refusal("payments", "api").reason == "not_node_agent"
    legacy = Node(env, "nodeproxy-legacy", "node-a", bound=False)
    assert legacy.refusal("payments", "api").reason == "no_bound_pod"
    gone = Node(env, "nodeproxy-gone", "node-a")
    env.api.do(env.api.api.delete, "pods", f"{AGENT_NS}/nodeproxy-gone")
    assert gone.refusal("payments", "api").reason == "caller_pod_gone"
    # Recreated under the same name (another uid): the old token does not carry over.
    env.api.do(env.api.api.put, "pods", kube.pod("nodeproxy-gone", AGENT_NS, node="node-a",
                                                 sa=AGENT_SA))
    assert gone.refusal("payments", "api").reason == "caller_pod_gone"
    forged = Node(env, "nodeproxy-f", "node-a")
    forged.token_file.write_text("not-a-token")
    assert forged.refusal("payments", "api").reason == "token_invalid"
    metrics = env.signer.metrics()
    for reason in ("wrong_audience", "not_node_agent", "no_bound_pod", "caller_pod_gone",
                   "token_invalid"):
        assert metrics.get(f"nodeproxy_ca_sign_refused_total{{reason={reason}}}", 0) >= 1, \
            reason
    assert metrics.get("nodeproxy_ca_signed_total{}", 0) == 0
    # Every review asked for the signer's audience, as the API must be asked.
    assert {tuple(r["audiences"]) for r in env.api.api.reviews} == {(AUDIENCE,)}


def test_a_pod_moving_between_nodes_moves_its_identity(env: Env) -> None:
    node_a = Node(env, "nodeproxy-a", "node-a")
    node_b = Node(env, "nodeproxy-b", "node-b")
    env.workload("api-1", "payments", "api", "node-a")
    assert node_a.sign("payments", "api").spiffe_id.endswith("/ns/payments/sa/api")
    assert node_b.refusal("payments", "api").reason == "no_such_pod_on_node"
    # Rescheduled: the old pod is gone, a new one runs on node-b.
    env.api.do(env.api.api.delete, "pods", "payments/api-1")
    env.workload("api-2", "payments", "api", "node-b")
    assert node_b.sign("payments", "api").spiffe_id.endswith("/ns/payments/sa/api")
    assert node_a.refusal("payments", "api").reason == "no_such_pod_on_node"


def test_bad_csrs_are_refused_with_their_reason(env: Env) -> None:
    Node(env, "nodeproxy-a", "node-a")
    env.workload("api-1", "payments", "api", "node-a")
    token = (env.dir / f"nodeproxy-a-{AUDIENCE}-{AGENT_SA}.token").read_text()
    other_domain, _ = make_csr("spiffe://evil.example/ns/payments/sa/api")
    not_workload, _ = make_csr("spiffe://cluster.local/admin")
    cases = {"bad_csr": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
             "wrong_trust_domain": other_domain, "not_spiffe": not_workload}
    for reason, csr in cases.items():
        status, answer = _post(env, token, {"csr": csr.decode(), "ttlSeconds": 60})
        assert (status, answer.get("reason")) == (403, reason), answer
    status, answer = _post(env, token, {"nope": 1})
    assert (status, answer.get("reason")) == (403, "bad_request")
    status, answer = _post(env, "", {"csr": cases["bad_csr"].decode()})
    assert status == 401


def _post(env: Env, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import json

    context = ssl.create_default_context(cafile=str(env.dir / "root-cert.pem"))
    payload = json.dumps(body).encode()
    head = (f"POST /v1/sign HTTP/1.1\r\nHost: {DNS}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n")
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    with socket.create_connection(("127.0.0.1", env.signer.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=DNS) as s:
        s.sendall(head.encode() + b"\r\n" + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(rest or b"{}")


def test_the_signer_restarts_and_the_client_sees_it_away(env: Env) -> None:
    node_a = Node(env, "nodeproxy-a", "node-a")
    env.workload("api-1", "payments", "api", "node-a")
    leaf = node_a.sign("payments", "api")
    env.signer.stop()
    error = node_a.refusal("payments", "api")
    assert error.reason == "unavailable"
    assert not leaf.expired(time.time())  # what the node holds is still good meanwhile
    env.signer.start()
    assert node_a.sign("payments", "api").serial != leaf.serial


def test_the_kube_api_failing_is_a_retryable_refusal(env: Env) -> None:
    node_a = Node(env, "nodeproxy-a", "node-a")
    env.workload("api-1", "payments", "api", "node-a")
    env.api.do(env.api.api.fail_next, 1, 500)
    assert node_a.refusal("payments", "api").reason == "unavailable"  # 503 to the node
    assert refused(env, "kube_api_error") == 1
    assert node_a.sign("payments", "api")


def test_serve_refuses_the_root_key(env: Env) -> None:
    out = subprocess.run(env.signer.argv("root-cert.pem", "root-key.pem"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "root key stays offline" in out.stderr
    assert os.stat(env.dir / "root-key.pem").st_mode & 0o077 == 0

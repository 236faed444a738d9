"""The signing service's decisions (nodeproxy.signer.node_authorizer) and CSR checks
(nodeproxy.identity.csr), as pure functions over what the Kubernetes API answers."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeproxy.identity.csr import make_csr, requested_identity
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.identity.spiffe import IdentityError, parse_spiffe_id
from nodeproxy.signer.node_authorizer import (
    POD_NAME,
    POD_UID,
    SigningRefused,
    caller_of,
    check_may_hold,
    node_of,
)

AGENT = "system:serviceaccount:nodeproxy-system:nodeproxy"


def review(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "authenticated": True, "audiences": ["nodeproxy-ca"],
        "user": {"username": AGENT, "extra": {POD_NAME: ["np-a"], POD_UID: ["u1"]}}}
    base.update(changes)
    return base


def pod(name: str, ns: str, sa: str, node: str, *, phase: str = "Running", uid: str = "u",
        host_network: bool = False, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node, "serviceAccountName": sa,
                                       "hostNetwork": host_network},
            "status": {"phase": phase}}


def reason(call: Any) -> str:
    with pytest.raises(SigningRefused) as info:
        call()
    return info.value.reason


def test_caller_from_a_token_review() -> None:
    caller = caller_of(review(), "nodeproxy-ca", AGENT)
    assert (caller.pod_namespace, caller.pod_name, caller.pod_uid) == \
        ("nodeproxy-system", "np-a", "u1")
    assert reason(lambda: caller_of({"authenticated": False, "error": "invalid bearer token"},
                                    "nodeproxy-ca", AGENT)) == "token_invalid"
    assert reason(lambda: caller_of({"authenticated": False, "error":
                                     "token audiences [x] is invalid for the target audiences"},
                                    "nodeproxy-ca", AGENT)) == "wrong_audience"
    # An API that authenticates but answers another audience: still refused.
    assert reason(lambda: caller_of(review(audiences=["other"]), "nodeproxy-ca",
                                    AGENT)) == "wrong_audience"
    other = review(user={"username": "system:serviceaccount:shop:web",
                         "extra": {POD_NAME: ["w"], POD_UID: ["u"]}})
    assert reason(lambda: caller_of(other, "nodeproxy-ca", AGENT)) == "not_node_agent"
    unbound = review(user={"username": AGENT, "extra": {}})
    assert reason(lambda: caller_of(unbound, "nodeproxy-ca", AGENT)) == "no_bound_pod"
    two = review(user={"username": AGENT, "extra": {POD_NAME: ["a", "b"], POD_UID: ["1", "2"]}})
    assert reason(lambda: caller_of(two, "nodeproxy-ca", AGENT)) == "no_bound_pod"


def test_node_of_the_bound_pod() -> None:
    caller = caller_of(review(), "nodeproxy-ca", AGENT)
    agent = pod("np-a", "nodeproxy-system", "nodeproxy", "node-a", uid="u1", host_network=True)
    assert node_of(caller, agent) == "node-a"
    assert reason(lambda: node_of(caller, None)) == "caller_pod_gone"
    assert reason(lambda: node_of(caller, {**agent, "metadata": {**agent["metadata"],
                                                                   "uid": "u2"}})) \
        == "caller_pod_gone"
    pending = pod("np-a", "nodeproxy-system", "nodeproxy", "node-a", uid="u1",
                  phase="Pending")
    assert reason(lambda: node_of(caller, pending)) == "caller_pod_not_running"
    leaving = pod("np-a", "nodeproxy-system", "nodeproxy", "node-a", uid="u1", deleting=True)
    assert reason(lambda: node_of(caller, leaving)) == "caller_pod_not_running"


def test_may_hold_only_running_meshable_pods_of_that_service_account_on_the_node() -> None:
    wanted = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/web")
    assert check_may_hold(wanted, "node-a", [pod("web-1", "shop", "web", "node-a")]) == "web-1"
    refusals = {
        "other node": [pod("web-1", "shop", "web", "node-b")],
        "other namespace": [pod("web-1", "payments", "web", "node-a")],
        "other account": [pod("web-1", "shop", "api", "node-a")],
        "not running": [pod("web-1", "shop", "web", "node-a", phase="Succeeded")],
        "terminating": [pod("web-1", "shop", "web", "node-a", deleting=True)],
        "host network": [pod("web-1", "shop", "web", "node-a", host_network=True)],
        "nothing": [],
    }
    for why, pods in refusals.items():
        assert reason(lambda pods=pods: check_may_hold(wanted, "node-a", pods)) == \
            "no_such_pod_on_node", why
    default_sa = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/default")
    unnamed = pod("job", "shop", "", "node-a")
    del unnamed["spec"]["serviceAccountName"]
    assert check_may_hold(default_sa, "node-a", [unnamed]) == "job"


def test_csr_round_trip_and_refusals() -> None:
    csr, key_pem = make_csr("spiffe://cluster.local/ns/shop/sa/web")
    identity, public_key = requested_identity(csr, "cluster.local")
    assert identity.uri == "spiffe://cluster.local/ns/shop/sa/web"
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert public_key.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    ca = MeshCA.generate("cluster.local")
    leaf = ca.sign_public_key(identity, public_key, 600)
    leaf.verify_directly_issued_by(ca.certificate)
    assert leaf.public_key().public_numbers() == public_key.public_numbers()  # type: ignore[union-attr]

    def refused(pem: bytes) -> str:
        with pytest.raises(IdentityError) as info:
            requested_identity(pem, "cluster.local")
        return info.value.reason

    assert refused(b"garbage") == "bad_csr"
    assert refused(make_csr("spiffe://other.example/ns/a/sa/b")[0]) == "wrong_trust_domain"
    assert refused(make_csr("spiffe://cluster.local/ns/a")[0]) == "not_spiffe"
    other = ec.generate_private_key(ec.SECP256R1())
    two_names = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                 .add_extension(x509.SubjectAlternativeName([
                     x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                     x509.DNSName("api.example")]), critical=True)
                 .sign(other, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert refused(two_names) == "bad_csr"
    no_san = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
              .sign(other, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert refused(no_san) == "bad_csr"
    small = ec.generate_private_key(ec.SECP192R1()) if hasattr(ec, "SECP192R1") else None
    if small is not None:
        try:
            weak = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                    .add_extension(x509.SubjectAlternativeName([
                        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]),
                        critical=True)
                    .sign(small, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        except Exception:  # noqa: BLE001 - the backend may refuse the curve itself
            weak = None
        if weak is not None:
            assert refused(weak) == "bad_csr"

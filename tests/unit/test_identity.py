"""Workload identity: SPIFFE IDs, the mesh CA, rotation, and real mutual TLS 1.3 handshakes.

Handshakes run over socket pairs with a thread for the server side and 2 s timeouts on
every socket, so a broken case fails quickly instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeproxy.cli import ca as ca_cli
from nodeproxy.identity import (
    CAError,
    CertificateManager,
    IdentityError,
    IssuedCert,
    MeshCA,
    SpiffeId,
    classify_handshake_error,
    client_context,
    parse_spiffe_id,
    server_context,
    spiffe_id,
    verify_peer,
)
from nodeproxy.identity import tls as tls_mod
from nodeproxy.identity.mesh_ca import _sign_leaf, create_root

TD = "cluster.local"
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.generate(TD)


@pytest.fixture()
def manager(ca: MeshCA) -> CertificateManager:
    return CertificateManager(ca, TD, ttl_seconds=3600)


# -- SPIFFE IDs -------------------------------------------------------------------------------

def test_spiffe_id_round_trip() -> None:
    uri = spiffe_id(TD, "default", "bookinfo-productpage")
    assert uri == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    parsed = parse_spiffe_id(uri)
    assert parsed == SpiffeId(TD, "default", "bookinfo-productpage")
    assert str(parsed) == parsed.uri == uri


@pytest.mark.parametrize(("uri", "why"), [
    ("https://cluster.local/ns/a/sa/b", "scheme 'https'"),
    ("cluster.local/ns/a/sa/b", "no scheme"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme 'SPIFFE'"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe://cluster.local", "no workload path"),
    ("spiffe://cluster.local/", "no workload path"),
    ("spiffe://cluster.local/ns/a", "exactly /ns/<namespace>/sa/<sa>"),
    ("spiffe://cluster.local/ns/a/sa", "exactly /ns/<namespace>/sa/<sa>"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "exactly /ns/<namespace>/sa/<sa>"),
    ("spiffe://cluster.local/ns/a/sa/b/", "exactly /ns/<namespace>/sa/<sa>"),
    ("spiffe://cluster.local/sa/b/ns/a", "exactly /ns/<namespace>/sa/<sa>"),
    ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
    ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
    ("spiffe://cluster.local/ns/../sa/b", "may not be '..'"),
    ("spiffe://cluster.local/ns/a b/sa/b", "may contain only"),
    ("spiffe://cluster.local/ns/a/sa/b%2F", "may contain only"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase"),
    ("spiffe://cluster.local:443/ns/a/sa/b", "has a port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "has userinfo"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "has a query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "has a fragment"),
    ("spiffe://cluster.local/ns/a/sa/" + "b" * 2100, "longer than 2048"),
])
def test_parse_spiffe_id_refuses(uri: str, why: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_spiffe_id(uri)
    assert info.value.reason == "not_spiffe"
    assert why in str(info.value)


def test_spiffe_id_refuses_bad_parts() -> None:
    for args in [("", "a", "b"), ("Bad", "a", "b"), (TD, "", "b"), (TD, "a", "b/c")]:
        with pytest.raises(IdentityError):
            spiffe_id(*args)


# -- the CA -----------------------------------------------------------------------------------

def _ext(cert: x509.Certificate, cls: type) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


def test_root_certificate_shape(ca: MeshCA) -> None:
    root = ca.certificate
    assert root.issuer == root.subject
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "nodeproxy"
    assert (root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            == "nodeproxy mesh root (cluster.local)")
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    bc = _ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = _ext(root, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    san = _ext(root, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]
    root.verify_directly_issued_by(root)


def test_issued_leaf_shape(ca: MeshCA) -> None:
    before = time.time()
    issued = ca.issue("spiffe://cluster.local/ns/shop/sa/cart", 3600)
    leaf = issued.certificate
    assert x509.load_pem_x509_certificate(issued.cert_pem) == leaf
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert "key_pem" not in repr(issued) and "PRIVATE" not in repr(issued)
    san = _ext(leaf, x509.SubjectAlternativeName)
    assert san.critical   # empty subject: the SAN carries the identity
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [issued.spiffe_id]
    assert len(list(san.value)) == 1
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(leaf, x509.BasicConstraints).value.ca is False
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    _ext(leaf, x509.SubjectKeyIdentifier)
    leaf.verify_directly_issued_by(ca.certificate)
    assert before - 61 <= issued.not_before <= time.time() - 59        # backdated 60 s
    assert issued.not_after - issued.not_before == pytest.approx(3660, abs=1)
    assert issued.serial == leaf.serial_number
    assert issued.chain == ()      # root-signed: nothing follows the leaf on the wire
    other = ca.issue("spiffe://cluster.local/ns/shop/sa/cart", 3600)
    assert other.serial != issued.serial


def test_issue_refuses_foreign_or_malformed_ids(ca: MeshCA) -> None:
    with pytest.raises(IdentityError) as info:
        ca.issue("spiffe://other.example/ns/a/sa/b", 60)
    assert info.value.reason == "wrong_trust_domain"
    with pytest.raises(IdentityError) as info:
        ca.issue("https://cluster.local/ns/a/sa/b", 60)
    assert info.value.reason == "not_spiffe"


def _write_pem(path: Path, *parts: bytes) -> Path:
    path.write_bytes(b"".join(parts))
    return path


def test_load_round_trip(tmp_path: Path, ca: MeshCA) -> None:
    cert = _write_pem(tmp_path / "c.pem", ca.certificate_pem())
    key = _write_pem(tmp_path / "k.pem", ca.private_key_pem())
    loaded = MeshCA.load(cert, key, TD)
    assert loaded.certificate == ca.certificate
    loaded.issue("spiffe://cluster.local/ns/a/sa/b", 60).certificate.verify_directly_issued_by(
        ca.certificate)


def test_load_rejects_non_ca(tmp_path: Path, ca: MeshCA) -> None:
    leaf = ca.issue("spiffe://cluster.local/ns/a/sa/b", 3600)
    cert = _write_pem(tmp_path / "leaf.pem", leaf.cert_pem)
    key = _write_pem(tmp_path / "leaf-key.pem", leaf.key_pem)
    with pytest.raises(CAError, match=rf"^{cert}: not a CA certificate"):
        MeshCA.load(cert, key, TD)


def test_load_rejects_mismatched_key(tmp_path: Path, ca: MeshCA) -> None:
    cert = _write_pem(tmp_path / "root.pem", ca.certificate_pem())
    key = _write_pem(tmp_path / "other-key.pem", MeshCA.generate(TD).private_key_pem())
    with pytest.raises(CAError, match=rf"^{key}: private key does not match .*{cert}"):
        MeshCA.load(cert, key, TD)


def test_load_rejects_malformed_pem(tmp_path: Path, ca: MeshCA) -> None:
    good_cert = _write_pem(tmp_path / "root.pem", ca.certificate_pem())
    good_key = _write_pem(tmp_path / "key.pem", ca.private_key_pem())
    garbage = _write_pem(tmp_path / "garbage.pem", b"hello, not a certificate\n")
    broken = _write_pem(tmp_path / "broken.pem",
                        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    broken_key = _write_pem(tmp_path / "broken-key.pem",
                            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError, match=rf"^{garbage}: no PEM certificate"):
        MeshCA.load(garbage, good_key, TD)
    with pytest.raises(CAError, match=rf"^{broken}: malformed PEM certificate"):
        MeshCA.load(broken, good_key, TD)
    with pytest.raises(CAError, match=rf"^{garbage}: no PEM private key"):
        MeshCA.load(good_cert, garbage, TD)
    with pytest.raises(CAError, match=rf"^{broken_key}: malformed PEM private key"):
        MeshCA.load(good_cert, broken_key, TD)
    missing = tmp_path / "missing.pem"
    with pytest.raises(CAError, match=rf"^{missing}: cannot read"):
        MeshCA.load(missing, good_key, TD)


def test_load_rejects_expired_unsupported_and_foreign(tmp_path: Path) -> None:
    old_cert, old_key = create_root(TD, days=1, now=time.time() - 3 * 86400)
    expired = MeshCA(old_cert, old_key, TD)
    cert = _write_pem(tmp_path / "old.pem", expired.certificate_pem())
    key = _write_pem(tmp_path / "old-key.pem", expired.private_key_pem())
    with pytest.raises(CAError, match=rf"^{cert}: CA certificate expired"):
        MeshCA.load(cert, key, TD)

    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed = _write_pem(tmp_path / "ed.pem", ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(CAError, match=rf"^{ed}: unsupported key type .* ECDSA or RSA"):
        MeshCA.load(cert, ed, TD)

    foreign = MeshCA.generate("other.example")
    fcert = _write_pem(tmp_path / "f.pem", foreign.certificate_pem())
    fkey = _write_pem(tmp_path / "fk.pem", foreign.private_key_pem())
    with pytest.raises(CAError, match=r"spiffe://other.example, not for trust domain"):
        MeshCA.load(fcert, fkey, TD)


def _intermediate(ca: MeshCA, *, with_key_usage: bool = True) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node intermediate")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=with_key_usage,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.certificate.public_key()), False)  # type: ignore[arg-type]
        .sign(ca._key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return inter.public_bytes(serialization.Encoding.PEM), key_pem


def test_load_intermediate_with_chain(tmp_path: Path, ca: MeshCA) -> None:
    inter_pem, key_pem = _intermediate(ca)
    alone = _write_pem(tmp_path / "inter-only.pem", inter_pem)
    kpath = _write_pem(tmp_path / "inter-key.pem", key_pem)
    with pytest.raises(CAError, match=rf"^{alone}: CA certificate is not self-signed"):
        MeshCA.load(alone, kpath, TD)
    chain = _write_pem(tmp_path / "chain.pem", inter_pem, ca.certificate_pem())
    sub = MeshCA.load(chain, kpath, TD)
    assert sub.trust_anchor_pem == ca.trust_anchor_pem
    # A leaf from the intermediate presents [leaf, intermediate] and verifies against the root.
    mgr_a = CertificateManager(sub, TD)
    mgr_b = CertificateManager(ca, TD)
    assert mgr_a.get("a", "sa").chain == (inter_pem,)
    result = _handshake(server_context(mgr_b, "b", "sb"), client_context(mgr_a, "a", "sa"))
    assert result.server_error is None, repr(result.server_error)
    assert result.server_peer == SpiffeId(TD, "a", "sa")
    assert result.client_peer == SpiffeId(TD, "b", "sb")

    bad_pem, bad_key = _intermediate(ca, with_key_usage=False)
    bad = _write_pem(tmp_path / "bad-chain.pem", bad_pem, ca.certificate_pem())
    with pytest.raises(CAError, match=rf"^{bad}: CA certificate's keyUsage does not include"):
        MeshCA.load(bad, _write_pem(tmp_path / "bad-key.pem", bad_key), TD)


# -- the CLI ----------------------------------------------------------------------------------

def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="nodeproxy ca")
    ca_cli.add_arguments(parser)
    return ca_cli.run(parser.parse_args(list(argv)))


def test_ca_init_writes_files_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ca"
    old_umask = os.umask(0o077)   # modes must not depend on the caller's umask
    try:
        assert _cli("init", "--trust-domain", "mesh.example", "--out", str(out),
                    "--days", "30") == 0
    finally:
        os.umask(old_umask)
    cert, key = out / "root-cert.pem", out / "root-key.pem"
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    printed = capsys.readouterr().out
    assert str(cert) in printed and str(key) in printed
    assert sorted(p.name for p in out.iterdir()) == ["ca-cert.pem", "ca-key.pem",
                                                     "root-cert.pem", "root-key.pem"]
    loaded = MeshCA.load(cert, key, "mesh.example")
    assert loaded.not_after - time.time() == pytest.approx(30 * 86400, abs=120)
    # The intermediate the signing service holds: signed by that root, no longer-lived.
    intermediate = MeshCA.load(out / "ca-cert.pem", out / "ca-key.pem", "mesh.example")
    assert intermediate.root == loaded.certificate
    assert intermediate.certificate != loaded.certificate
    assert intermediate.not_after <= loaded.not_after
    assert stat.S_IMODE((out / "ca-key.pem").stat().st_mode) == 0o600
    assert _cli("check", "--cert", str(cert), "--key", str(key),
                "--trust-domain", "mesh.example") == 0

    before = (cert.read_bytes(), key.read_bytes())
    assert _cli("init", "--trust-domain", "mesh.example", "--out", str(out)) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (cert.read_bytes(), key.read_bytes()) == before

    assert _cli("init", "--trust-domain", "mesh.example", "--out", str(out), "--force") == 0
    assert key.read_bytes() != before[1]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # A new intermediate under the existing root (rotation): the root files stay as they are.
    root_before = (cert.read_bytes(), key.read_bytes())
    old_intermediate = (out / "ca-cert.pem").read_bytes()
    assert _cli("init", "--trust-domain", "mesh.example", "--out", str(out), "--force",
                "--root-cert", str(cert), "--root-key", str(key)) == 0
    assert (cert.read_bytes(), key.read_bytes()) == root_before
    assert (out / "ca-cert.pem").read_bytes() != old_intermediate
    assert MeshCA.load(out / "ca-cert.pem", out / "ca-key.pem", "mesh.example").root == \
        MeshCA.load(cert, key, "mesh.example").certificate

    assert _cli("init", "--trust-domain", "Not Valid", "--out", str(tmp_path / "x")) == 2
    assert _cli("check", "--cert", str(key), "--key", str(key),
                "--trust-domain", "mesh.example") == 1
    assert "no PEM certificate" in capsys.readouterr().err


# -- handshakes -------------------------------------------------------------------------------

@dataclass
class Handshake:
    server_peer: SpiffeId | None = None
    client_peer: SpiffeId | None = None
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    alpn: str | None = None
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext | None,
    *,
    raw_client_bytes: bytes | None = None,
    trust_domain: str = TD,
) -> Handshake:
    """Server: handshake, verify the client's ID, send b"ok". Client: same, then read it.

    In TLS 1.3 the client finishes its handshake before the server has checked the client
    certificate, so a refused client learns it on its first read.
    """
    result = Handshake()
    srv_sock, cli_sock = socket.socketpair()
    srv_sock.settimeout(TIMEOUT)
    cli_sock.settimeout(TIMEOUT)

    def server() -> None:
        conn: socket.socket = srv_sock
        try:
            # wrap_socket detaches srv_sock: from here on `conn` owns the descriptor.
            conn = server_ctx.wrap_socket(srv_sock, server_side=True)
            result.alpn, result.version = conn.selected_alpn_protocol(), conn.version()
            result.server_peer = verify_peer(conn, trust_domain)
            conn.sendall(b"ok")
        except Exception as e:
            result.server_error = e
        finally:
            conn.close()

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    conn: socket.socket = cli_sock
    try:
        if raw_client_bytes is not None:
            cli_sock.sendall(raw_client_bytes)
            result.extra["raw_reply"] = cli_sock.recv(100)
        else:
            assert client_ctx is not None
            conn = client_ctx.wrap_socket(cli_sock, server_hostname=None)
            result.client_peer = verify_peer(conn, trust_domain)
            if conn.recv(2) != b"ok":
                raise ConnectionError("server closed without answering")
    except Exception as e:
        result.client_error = e
    finally:
        conn.close()
        thread.join(TIMEOUT * 2)
    assert not thread.is_alive(), "server side hung"
    return result


def test_mutual_handshake_verifies_both_identities(manager: CertificateManager) -> None:
    result = _handshake(server_context(manager, "shop", "cart"),
                        client_context(manager, "web", "frontend"))
    assert result.server_error is None and result.client_error is None
    assert result.server_peer == SpiffeId(TD, "web", "frontend")
    assert result.client_peer == SpiffeId(TD, "shop", "cart")
    assert result.alpn == "h2"
    assert result.version == "TLSv1.3"


def test_contexts_are_cached_per_identity_and_serial(manager: CertificateManager) -> None:
    ctx = server_context(manager, "shop", "cart")
    assert server_context(manager, "shop", "cart") is ctx
    assert client_context(manager, "shop", "cart") is not ctx
    assert server_context(manager, "shop", "other") is not ctx
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def test_contexts_load_keys_from_memory_only(
    manager: CertificateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths: list[str] = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, keyfile: str | None = None,
            password: Any = None) -> None:
        paths.extend([certfile, keyfile or ""])
        real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    client_context(manager, "mem", "check")
    assert len(paths) == 2
    assert all(p.startswith("/proc/self/fd/") for p in paths)
    assert not any(os.path.exists(p) for p in paths)     # closed once loaded


def test_refuses_client_from_another_ca(ca: MeshCA, manager: CertificateManager) -> None:
    # Same trust domain, same root subject name, different key: only the signature differs.
    stranger = MeshCA.generate(TD).issue("spiffe://cluster.local/ns/web/sa/frontend", 600)
    client = tls_mod.build_context(stranger, ca.trust_anchor_pem, server_side=False)
    result = _handshake(server_context(manager, "shop", "cart"), client)
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert classify_handshake_error(result.server_error) == "untrusted_ca"
    assert classify_handshake_error(result.client_error) == "peer_rejected"
    assert result.server_peer is None


def test_client_refuses_server_from_another_ca(manager: CertificateManager) -> None:
    stranger = CertificateManager(MeshCA.generate(TD), TD)
    result = _handshake(server_context(stranger, "shop", "cart"),
                        client_context(manager, "web", "frontend"))
    assert classify_handshake_error(result.client_error) == "untrusted_ca"
    assert result.client_peer is None


@pytest.mark.parametrize(("offset", "reason"), [(-7200, "expired"), (7200, "not_yet_valid")])
def test_refuses_client_cert_outside_validity(
    ca: MeshCA, manager: CertificateManager, offset: int, reason: str
) -> None:
    issued = ca.issue("spiffe://cluster.local/ns/web/sa/frontend", 600,
                      now=time.time() + offset)
    client = tls_mod.build_context(issued, ca.trust_anchor_pem, server_side=False)
    result = _handshake(server_context(manager, "shop", "cart"), client)
    assert classify_handshake_error(result.server_error) == reason
    assert classify_handshake_error(result.client_error) == "peer_rejected"
    # verify_peer applies the same rule to a certificate it is shown directly.
    with pytest.raises(IdentityError) as info:
        verify_peer(_FakePeer(issued.certificate.public_bytes(serialization.Encoding.DER)), TD)
    assert info.value.reason == reason


def test_client_refuses_expired_server(ca: MeshCA, manager: CertificateManager) -> None:
    issued = ca.issue("spiffe://cluster.local/ns/shop/sa/cart", 600, now=time.time() - 7200)
    server = tls_mod.build_context(issued, ca.trust_anchor_pem, server_side=True)
    result = _handshake(server, client_context(manager, "web", "frontend"))
    assert classify_handshake_error(result.client_error) == "expired"


def _context_with_sans(ca: MeshCA, sans: list[str], server_side: bool) -> ssl.SSLContext:
    now = time.time()
    cert, key = _sign_leaf(ca.certificate, ca._key, sans, now - 60, now + 600)
    issued = IssuedCert(
        spiffe_id=sans[0] if sans else "", certificate=cert, chain=(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        not_before=now - 60, not_after=now + 600, serial=cert.serial_number,
    )
    return tls_mod.build_context(issued, ca.trust_anchor_pem, server_side=server_side)


@pytest.mark.parametrize(("sans", "reason"), [
    (["spiffe://other.example/ns/web/sa/frontend"], "wrong_trust_domain"),
    (["https://web.example/frontend"], "not_spiffe"),
    (["spiffe://cluster.local/web/frontend"], "not_spiffe"),
    (["spiffe://cluster.local/ns/web/sa/a", "spiffe://cluster.local/ns/web/sa/b"], "not_spiffe"),
])
def test_chain_ok_but_identity_refused(
    ca: MeshCA, manager: CertificateManager, sans: list[str], reason: str
) -> None:
    # Signed by the mesh root, so the TLS layer accepts it; the SPIFFE check must not.
    result = _handshake(server_context(manager, "shop", "cart"),
                        _context_with_sans(ca, sans, server_side=False))
    assert isinstance(result.server_error, IdentityError)
    assert result.server_error.reason == reason
    assert classify_handshake_error(result.server_error) == reason
    result = _handshake(_context_with_sans(ca, sans, server_side=True),
                        client_context(manager, "web", "frontend"))
    assert isinstance(result.client_error, IdentityError)
    assert result.client_error.reason == reason


def test_refuses_client_without_certificate(ca: MeshCA, manager: CertificateManager) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.trust_anchor_pem.decode())
    bare.set_alpn_protocols(["h2"])
    result = _handshake(server_context(manager, "shop", "cart"), bare)
    assert classify_handshake_error(result.server_error) == "no_certificate"
    assert classify_handshake_error(result.client_error) == "peer_rejected"


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n",
    bytes(range(256)),
    b"\x16\x03\x01\x00\x05hello" * 3,
])
def test_garbage_instead_of_client_hello(manager: CertificateManager, garbage: bytes) -> None:
    started = time.monotonic()
    result = _handshake(server_context(manager, "shop", "cart"), None, raw_client_bytes=garbage)
    assert isinstance(result.server_error, ssl.SSLError)
    assert classify_handshake_error(result.server_error) == "protocol_error"
    assert result.server_peer is None
    assert time.monotonic() - started < TIMEOUT


def test_refuses_tls12_client(manager: CertificateManager) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = _handshake(server_context(manager, "shop", "cart"), old)
    assert classify_handshake_error(result.server_error) == "protocol_error"


@dataclass
class _FakePeer:
    der: bytes | None
    alpn: str | None = "h2"

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self.der

    def selected_alpn_protocol(self) -> str | None:
        return self.alpn


def test_verify_peer_checks(ca: MeshCA) -> None:
    issued = ca.issue("spiffe://cluster.local/ns/web/sa/frontend", 600)
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    assert verify_peer(_FakePeer(der), TD) == SpiffeId(TD, "web", "frontend")
    assert verify_peer(_FakePeer(der), TD, expected=issued.spiffe_id).namespace == "web"
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: verify_peer(_FakePeer(None), TD), "no_certificate"),
        (lambda: verify_peer(_FakePeer(der, alpn=None), TD), "no_alpn"),
        (lambda: verify_peer(_FakePeer(der), "other.example"), "wrong_trust_domain"),
        (lambda: verify_peer(_FakePeer(der), TD, expected="spiffe://cluster.local/ns/x/sa/y"),
         "unexpected_identity"),
        (lambda: verify_peer(_FakePeer(der), TD, now=issued.not_after), "expired"),
        (lambda: verify_peer(_FakePeer(b"\x30\x03junk"), TD), "not_spiffe"),
    ]
    for call, reason in cases:
        with pytest.raises(IdentityError) as info:
            call()
        assert info.value.reason == reason, reason
    assert verify_peer(_FakePeer(der, alpn=None), TD, alpn=None).service_account == "frontend"


def test_classify_other_errors() -> None:
    assert classify_handshake_error(TimeoutError()) == "timeout"
    assert classify_handshake_error(
        ConnectionAbortedError("SSL handshake is taking longer than 1 seconds")) == "timeout"
    assert classify_handshake_error(ConnectionResetError()) == "connection_closed"
    assert classify_handshake_error(ssl.SSLEOFError()) == "connection_closed"
    assert classify_handshake_error(IdentityError("ca_invalid", "x")) == "handshake_failed"
    assert classify_handshake_error(RuntimeError("?")) == "handshake_failed"
    assert set(tls_mod.PEER_REASONS) <= set(tls_mod.HANDSHAKE_REASONS)


# -- rotation ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_rotation_reissues_past_half_life_and_old_context_keeps_working(ca: MeshCA) -> None:
    clock = FakeClock()
    clock.now -= 1900       # end at the real time: OpenSSL checks validity on the real clock
    mgr = CertificateManager(ca, TD, ttl_seconds=3600, rotate_fraction=0.5, clock=clock)
    seen: list[tuple[str, int]] = []
    mgr.on_rotate.append(lambda sid, cert: seen.append((sid, cert.serial)))

    first = mgr.get("shop", "cart")
    assert mgr.get("shop", "cart") is first          # cached
    old_server = server_context(mgr, "shop", "cart")
    sid = "spiffe://cluster.local/ns/shop/sa/cart"
    assert mgr.expiry_timestamps() == {sid: first.not_after}

    clock.now += 1700                                # 1760 s of 3660: not yet half
    assert mgr.rotate_due() == []
    assert mgr.rotations == 0

    clock.now += 200                                 # past half-life
    assert mgr.rotate_due() == [sid]
    second = mgr.get("shop", "cart")
    assert second.serial != first.serial
    assert second.not_after > first.not_after
    assert mgr.rotations == 1 and seen == [(sid, second.serial)]
    assert mgr.expiry_timestamps() == {sid: second.not_after}
    assert mgr.rotate_due() == []                    # the new cert is fresh

    new_server = server_context(mgr, "shop", "cart")
    assert new_server is not old_server              # rebuilt for the new serial
    client = client_context(mgr, "web", "frontend")
    # The old context still presents the old (unexpired) cert and still completes handshakes.
    for server in (old_server, new_server):
        result = _handshake(server, client)
        assert result.server_error is None and result.client_error is None
        assert result.client_peer == SpiffeId(TD, "shop", "cart")
        assert result.server_peer == SpiffeId(TD, "web", "frontend")


def test_get_renews_expired_cert_without_rotation_task(ca: MeshCA) -> None:
    clock = FakeClock()
    mgr = CertificateManager(ca, TD, ttl_seconds=60, clock=clock)
    first = mgr.get("a", "b")
    clock.now += 3600
    assert mgr.get("a", "b").serial != first.serial
    assert mgr.rotations == 1 and mgr.issued == 2
    mgr.discard("a", "b")
    assert mgr.expiry_timestamps() == {}


def test_run_rotation_task(ca: MeshCA) -> None:
    clock = FakeClock()
    mgr = CertificateManager(ca, TD, ttl_seconds=100, clock=clock)
    first = mgr.get("a", "b")
    clock.now += 80

    async def main() -> None:
        task = asyncio.create_task(mgr.run_rotation(interval=0.01))
        for _ in range(200):
            if mgr.rotations:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert mgr.rotations == 1
    assert mgr.get("a", "b").serial != first.serial


def test_manager_refuses_other_trust_domain(ca: MeshCA) -> None:
    with pytest.raises(ValueError, match="differs"):
        CertificateManager(ca, "other.example")


# -- asyncio / uvloop wiring (how the HBONE code uses it) -------------------------------------

@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_asyncio_wiring(manager: CertificateManager, loop_kind: str) -> None:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        seen: dict[str, Any] = {"server_errors": []}
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]

        async def serve_one(conn: socket.socket) -> None:
            try:
                stream = await tls_mod.accept_tls(conn, server_context(manager, "shop", "cart"),
                                                  TD, handshake_timeout=0.5)
            except Exception as e:
                seen["server_errors"].append(classify_handshake_error(e))
                return
            seen["server_peer"] = stream.peer
            stream.writer.write(b"ok")
            await stream.writer.drain()
            stream.writer.close()

        async def accept_loop() -> None:
            tasks = set()
            while True:
                conn, _ = await loop.sock_accept(listener)
                task = asyncio.create_task(serve_one(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = asyncio.create_task(accept_loop())
        # The proxy dials from a socket it made itself (inside the pod's netns).
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        stream = await tls_mod.connect_tls(
            sock, client_context(manager, "web", "frontend"), TD,
            expected="spiffe://cluster.local/ns/shop/sa/cart", handshake_timeout=TIMEOUT)
        seen["client_peer"] = stream.peer
        seen["reply"] = await asyncio.wait_for(stream.reader.read(2), TIMEOUT)
        stream.writer.close()

        # Garbage, and a stalled ClientHello: classified server-side, nothing hangs.
        for data in (b"GET / HTTP/1.1\r\n\r\n", b"\x16"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            await writer.drain()
            # The server drops the connection: at once for garbage, after its handshake
            # timeout for a ClientHello that never completes.
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
        for _ in range(200):
            if len(seen["server_errors"]) >= 2:
                break
            await asyncio.sleep(0.01)
        errors = list(seen["server_errors"])

        # The wrong expected identity is refused after the handshake.
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with pytest.raises(IdentityError) as info:
            await tls_mod.connect_tls(sock, client_context(manager, "web", "frontend"), TD,
                                      expected="spiffe://cluster.local/ns/shop/sa/other")
        seen["unexpected"] = info.value.reason
        seen["early_errors"] = errors
        acceptor.cancel()
        listener.close()
        return seen

    runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
    seen = runner(main())
    assert seen["client_peer"] == SpiffeId(TD, "shop", "cart")
    assert seen["server_peer"] == SpiffeId(TD, "web", "frontend")
    assert seen["reply"] == b"ok"
    assert seen["unexpected"] == "unexpected_identity"
    assert sorted(seen["early_errors"]) == ["protocol_error", "timeout"]

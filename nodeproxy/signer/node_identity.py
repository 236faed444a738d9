"""The node's certificate source for its identity settings: a `CertificateManager` signing
with the CA key it was given, or `RemoteCertificates` asking the mesh signing service.

The daemon makes it once, at start-up, and only when identity is configured (mTLS on);
this module imports what either needs (cryptography, through the CA and the signing
client) inside `node_certificates`, so a node without mTLS never loads cryptography
(about 7 MiB of the daemon's resident set: docs/benchmarks.md, "Daemon start-up memory"),
and one with mTLS loads it here, before any handshake needs it.  The signing client
(and with it aiohttp's client, about 11 MiB: "Idle memory, eighth round") only for a
node that has a signer, never for one signing with its own CA key.
"""

from __future__ import annotations

from pathlib import Path

from nodeproxy.config.model import IdentitySettings
from nodeproxy.identity.certificates import CertificateManager


def node_certificates(identity: IdentitySettings, trust_domain: str) -> CertificateManager:
    """The node's certificate manager for its identity settings: signing locally with
    caKey, or through the mesh signing service (identity.signer) with no key here."""
    from nodeproxy.identity.mesh_ca import CAError, MeshCA

    if identity.signer is None:
        assert identity.ca_cert and identity.ca_key
        ca = MeshCA.load(identity.ca_cert, identity.ca_key, trust_domain)
        return CertificateManager(ca, trust_domain, ttl_seconds=identity.cert_ttl_seconds,
                                  rotate_fraction=identity.rotate_at_fraction)
    # The signing client's HTTP client (aiohttp) only with a signer: see below.
    from nodeproxy.signer.remote_certificates import RemoteCertificates
    from nodeproxy.signer.signing_client import SignerClient

    assert identity.ca_cert
    signer = identity.signer
    try:
        bundle = Path(identity.ca_cert).read_bytes()
    except OSError as e:
        raise CAError(f"{identity.ca_cert}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in bundle:
        raise CAError(f"{identity.ca_cert}: no PEM certificate found")
    host = signer.address.removeprefix("https://").rsplit(":", 1)[0].strip("[]")
    client = SignerClient(signer.address, trust_bundle_pem=bundle,
                          token_file=signer.token_path,
                          server_name=signer.server_name or host,
                          timeout=signer.timeout_seconds)
    return RemoteCertificates(client, bundle, trust_domain,
                              ttl_seconds=identity.cert_ttl_seconds,
                              rotate_fraction=identity.rotate_at_fraction,
                              retry_seconds=signer.retry_seconds)

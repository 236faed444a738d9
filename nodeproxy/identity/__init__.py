"""Workload identity: the mesh CA, SPIFFE X.509 certificates, rotation.

- `spiffe`: SPIFFE IDs (`spiffe://<td>/ns/<ns>/sa/<sa>`) and `IdentityError`.
- `ca`: `MeshCA` loads (or makes) the mesh root or an intermediate and signs short-lived
  workload leaves (for a key it makes, or for a CSR's key).
- `csr`: certificate signing requests for one workload identity (nodeproxy/signer/ uses
  them: the node makes the key, the signing service signs).
- `certificates`: `CertificateManager` keeps one leaf per (namespace, service account) on
  this node and rotates it before expiry; private keys stay in memory.
- `tls`: mutual TLS 1.3 `ssl.SSLContext`s for HBONE and `verify_peer` for the peer's ID.
- `tls_transport`: the TLS transport HBONE runs on (MemoryBIO records over plain TCP).
"""

from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import CAError, IssuedCert, MeshCA
from nodeproxy.identity.spiffe import IdentityError, SpiffeId, parse_spiffe_id, spiffe_id
from nodeproxy.identity.tls import (
    classify_handshake_error,
    client_context,
    server_context,
    verify_peer,
)

__all__ = [
    "CAError",
    "CertificateManager",
    "IdentityError",
    "IssuedCert",
    "MeshCA",
    "SpiffeId",
    "classify_handshake_error",
    "client_context",
    "parse_spiffe_id",
    "server_context",
    "spiffe_id",
    "verify_peer",
]

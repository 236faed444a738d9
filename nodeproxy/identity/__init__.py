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

from __future__ import annotations

import importlib
from typing import Any

# The names this package offers, by the module that defines them.  Imported when first
# asked for (PEP 562), not with the package: `nodeproxy.identity.spiffe` is imported by
# most of the daemon, and the CA's module would bring cryptography (about 7 MiB) into a
# node that has no mTLS.
_EXPORTS = {
    "CertificateManager": "certificates",
    "CAError": "mesh_ca",
    "IssuedCert": "mesh_ca",
    "MeshCA": "mesh_ca",
    "IdentityError": "spiffe",
    "SpiffeId": "spiffe",
    "parse_spiffe_id": "spiffe",
    "spiffe_id": "spiffe",
    "classify_handshake_error": "tls",
    "client_context": "tls",
    "server_context": "tls",
    "verify_peer": "tls",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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

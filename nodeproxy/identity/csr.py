"""Certificate signing requests for workload identities (PKCS#10, PEM).

A node makes the key pair of each workload identity itself and sends only the CSR to
the signing service (`nodeproxy ca serve`); the private key never leaves the node's
memory.  The service reads the one identity a CSR asks for with `requested_identity`,
which refuses (IdentityError, reason "bad_csr", or "not_spiffe"/"wrong_trust_domain")
anything else: not PEM, a broken self-signature, no or several SANs, a SAN that is not a
workload SPIFFE ID, a key that is not ECDSA P-256/P-384 or RSA >= 2048.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nodeproxy.identity.mesh_ca import MIN_RSA_BITS, LeafPublicKey
from nodeproxy.identity.spiffe import IdentityError, SpiffeId, parse_spiffe_id

MAX_CSR_BYTES = 16 * 1024


def make_csr(identity: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a CSR for `identity` (a SPIFFE ID URI): (csr, key) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def requested_identity(csr_pem: bytes, trust_domain: str) -> tuple[SpiffeId, LeafPublicKey]:
    """The identity a CSR asks for and its public key; IdentityError if it is not exactly
    one workload SPIFFE ID of `trust_domain` on an acceptable, self-signed key."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise IdentityError("bad_csr", f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise IdentityError("bad_csr", f"not a PEM certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise IdentityError("bad_csr", "the CSR's signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise IdentityError("bad_csr", f"ECDSA curve {key.curve.name} is not accepted")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise IdentityError("bad_csr", f"RSA key of {key.key_size} bits is too small")
    else:
        raise IdentityError("bad_csr", f"key type {type(key).__name__} is not accepted")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("bad_csr", "the CSR has no subjectAltName") from None
    except ValueError as e:
        raise IdentityError("bad_csr", f"the CSR's extensions are malformed: {e}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        raise IdentityError("bad_csr", "the CSR must name exactly one SPIFFE ID and nothing "
                                       f"else (it names {len(list(san))} names)")
    identity = parse_spiffe_id(uris[0])
    if identity.trust_domain != trust_domain:
        raise IdentityError("wrong_trust_domain",
                            f"{identity.uri} is not in trust domain {trust_domain!r}")
    return identity, key

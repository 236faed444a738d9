"""The mesh certificate authority: a root (or an intermediate with its chain) that signs leaves.

The CA key signs short-lived SPIFFE leaf certificates for the workloads on this node. A leaf's
own private key is made here, returned as PEM in memory and never written anywhere.

`MeshCA.load` reads the CA from PEM files (a Kubernetes Secret mounted as files, or what
`nodeproxy ca init` wrote) and refuses, naming the file and the problem, anything that cannot
sign: not a CA, a key that does not match, expired, an unsupported key type, a broken chain.
The certificate file holds the signing CA certificate, optionally followed by its issuers up to
a self-signed root; the root is the trust anchor every peer is verified against.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeproxy.identity.spiffe import (
    IdentityError,
    SpiffeId,
    parse_spiffe_id,
    validate_trust_domain,
)

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], float]

CLOCK_SKEW_SECONDS = 60          # leaves are valid from 60 s before issuance
DEFAULT_ROOT_DAYS = 3650
DEFAULT_INTERMEDIATE_DAYS = 365
MIN_RSA_BITS = 2048
_SUPPORTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class CAError(IdentityError):
    """The CA files cannot be used; the message names the file and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__("ca_invalid", message)


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and its private key, both PEM, held in memory only.

    `chain` is the PEM of the certificates that follow the leaf in a TLS Certificate message
    (intermediates; empty when the root signs leaves directly). Times are epoch seconds.
    """

    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    chain: tuple[bytes, ...]
    not_before: float
    not_after: float
    serial: int
    certificate: x509.Certificate = field(repr=False, compare=False)

    @property
    def chain_pem(self) -> bytes:
        """Leaf followed by its intermediates: what a TLS endpoint presents."""
        return self.cert_pem + b"".join(self.chain)

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def expired(self, now: float) -> bool:
        return now >= self.not_after


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hash_for(key: CAPrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def create_root(
    trust_domain: str, *, days: int = DEFAULT_ROOT_DAYS, now: float | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 mesh root for `trust_domain`."""
    validate_trust_domain(trust_domain)
    if days < 1:
        raise ValueError("a root must be valid for at least one day")
    now = time.time() if now is None else now
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodeproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"nodeproxy mesh root ({trust_domain})"),
    ])
    cert = _ca_certificate(trust_domain, name, key, issuer=name, issuer_key=key,
                           not_before=now - CLOCK_SKEW_SECONDS, not_after=now + days * 86400,
                           path_length=None, authority=None)
    return cert, key


def create_intermediate(
    trust_domain: str, root_cert: x509.Certificate, root_key: CAPrivateKey, *,
    days: int = DEFAULT_INTERMEDIATE_DAYS, now: float | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 intermediate CA signed by the root, for the signing service: it may
    sign leaves only (pathLength 0), and never outlives the root."""
    validate_trust_domain(trust_domain)
    if days < 1:
        raise ValueError("an intermediate must be valid for at least one day")
    now = time.time() if now is None else now
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + days * 86400, root_cert.not_valid_after_utc.timestamp())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodeproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"nodeproxy mesh intermediate ({trust_domain})"),
    ])
    cert = _ca_certificate(trust_domain, name, key, issuer=root_cert.subject,
                           issuer_key=root_key, not_before=now - CLOCK_SKEW_SECONDS,
                           not_after=not_after, path_length=0, authority=_ski(root_cert))
    return cert, key


def _certificate_builder(subject: x509.Name, issuer: x509.Name, public_key: LeafPublicKey,
                         not_before: float, not_after: float, *, ca: bool,
                         path_length: int | None) -> x509.CertificateBuilder:
    """What a CA certificate and a leaf share: names, key, serial, validity, basic
    constraints, key usage (a CA signs certificates and CRLs, a leaf signs handshakes)
    and its subject key identifier."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_certificate(
    trust_domain: str, subject: x509.Name, key: ec.EllipticCurvePrivateKey, *,
    issuer: x509.Name, issuer_key: CAPrivateKey, not_before: float, not_after: float,
    path_length: int | None, authority: x509.SubjectKeyIdentifier | None,
) -> x509.Certificate:
    """A CA certificate of the trust domain (the root signs itself; an intermediate is
    signed by the root and names it as its authority)."""
    builder = _certificate_builder(
        subject, issuer, key.public_key(), not_before, not_after, ca=True,
        path_length=path_length)
    if authority is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority),
            critical=False)
    return builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
        critical=False,
    ).sign(issuer_key, _hash_for(issuer_key))


LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: CAPrivateKey,
    uris: Sequence[str],
    not_before: float,
    not_after: float,
    public_key: LeafPublicKey | None = None,
    dns_names: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None]:
    """Sign a leaf with the given URI SANs (no checks: `MeshCA.issue` does those) for
    `public_key` (a CSR's: the private key stays with the requester), or for a new key
    returned with it.  `dns_names`: a server certificate (the signing service's own)."""
    key = None
    if public_key is None:
        key = ec.generate_private_key(ec.SECP256R1())
        public_key = key.public_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    # Empty subject, identity in a critical SAN (RFC 5280 4.2.1.6), as SPIFFE and Istio do.
    cert = (
        _certificate_builder(x509.Name([]), ca_cert.subject, public_key, not_before,
                             not_after, ca=False, path_length=None)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca_cert)),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert, key


class MeshCA:
    """Signs workload leaves for one trust domain. Build with `load` or `generate`."""

    def __init__(
        self,
        certificate: x509.Certificate,
        key: CAPrivateKey,
        trust_domain: str,
        *,
        issuers: Sequence[x509.Certificate] = (),
        clock: Clock = time.time,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self.certificate = certificate
        self._key = key
        self._issuers = tuple(issuers)   # above `certificate`, ending with the root
        # What follows a leaf on the wire: the signing CA and intermediates, never the root.
        self._chain_pems = (
            tuple(_pem(c) for c in (certificate, *self._issuers[:-1])) if self._issuers else ()
        )
        self._clock = clock

    # -- construction --------------------------------------------------------------------

    @classmethod
    def generate(
        cls, trust_domain: str, *, days: int = DEFAULT_ROOT_DAYS, clock: Clock = time.time
    ) -> MeshCA:
        """A fresh in-memory root CA (what `nodeproxy ca init` writes; tests and demos)."""
        cert, key = create_root(trust_domain, days=days, now=clock())
        return cls(cert, key, trust_domain, clock=clock)

    @classmethod
    def load(
        cls,
        cert_path: str | Path,
        key_path: str | Path,
        trust_domain: str,
        *,
        clock: Clock = time.time,
    ) -> MeshCA:
        """Load and check the CA; raise CAError naming the file and the problem."""
        validate_trust_domain(trust_domain)
        cert_path, key_path = Path(cert_path), Path(key_path)
        certs = _read_certificates(cert_path)
        key = _read_key(key_path)
        ca_cert = certs[0]
        if _public_der(ca_cert.public_key()) != _public_der(key.public_key()):
            raise CAError(f"{key_path}: private key does not match the certificate in {cert_path}")
        now = clock()
        for index, cert in enumerate(certs):
            what = cert_path if index == 0 else f"{cert_path} (certificate #{index + 1})"
            _check_ca_certificate(cert, what, now)
        _check_chain(certs, cert_path)
        for uri in uri_sans(certs[-1]) + uri_sans(ca_cert):
            if uri.startswith("spiffe://") and uri.rstrip("/") != f"spiffe://{trust_domain}":
                raise CAError(
                    f"{cert_path}: CA is for {uri}, not for trust domain {trust_domain!r}"
                )
        return cls(ca_cert, key, trust_domain, issuers=certs[1:], clock=clock)

    # -- what the CA hands out -----------------------------------------------------------

    @property
    def root(self) -> x509.Certificate:
        return self._issuers[-1] if self._issuers else self.certificate

    @property
    def trust_anchor_pem(self) -> bytes:
        """The root certificate, PEM: peers' chains are verified against it."""
        return _pem(self.root)

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    def certificate_pem(self) -> bytes:
        """The CA certificate followed by its issuers (what `load` reads back)."""
        return b"".join(_pem(c) for c in (self.certificate, *self._issuers))

    @property
    def signing_key(self) -> CAPrivateKey:
        """The CA's private key (`nodeproxy ca init` signs an intermediate with a root's)."""
        return self._key

    def private_key_pem(self) -> bytes:
        """The CA key, unencrypted PKCS#8 PEM (only `nodeproxy ca init` writes it out)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def issue(
        self, identity: str | SpiffeId, ttl_seconds: float, *, now: float | None = None
    ) -> IssuedCert:
        """Sign a fresh ECDSA P-256 leaf for `identity`, valid `ttl_seconds` from now.

        Valid from 60 s before `now` (clock skew between nodes); never past the CA's own
        expiry. Refuses (IdentityError) an ID that is not a workload SPIFFE ID of this CA's
        trust domain.
        """
        parsed = identity if isinstance(identity, SpiffeId) else parse_spiffe_id(identity)
        not_before, not_after = self._leaf_validity(parsed, ttl_seconds, now)
        cert, key = _sign_leaf(self.certificate, self._key, [parsed.uri], not_before, not_after)
        assert key is not None
        return IssuedCert(
            spiffe_id=parsed.uri,
            cert_pem=_pem(cert),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            chain=self._chain_pems,
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            serial=cert.serial_number,
            certificate=cert,
        )


    def sign_public_key(
        self, identity: SpiffeId, public_key: LeafPublicKey, ttl_seconds: float, *,
        now: float | None = None,
    ) -> x509.Certificate:
        """Sign a leaf for `identity` over a requester's public key (a CSR's), valid as
        `issue`'s leaves are.  The caller has decided the requester may hold `identity`."""
        not_before, not_after = self._leaf_validity(identity, ttl_seconds, now)
        cert, _ = _sign_leaf(self.certificate, self._key, [identity.uri], not_before,
                             not_after, public_key)
        return cert

    def _leaf_validity(self, identity: SpiffeId, ttl_seconds: float,
                       now: float | None) -> tuple[float, float]:
        """A leaf's (not_before, not_after) for `identity`: from CLOCK_SKEW_SECONDS before
        `now`, never past the CA's own expiry.  Refuses an identity of another trust
        domain (IdentityError), a TTL that is not positive, an expired CA (CAError)."""
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(
                "wrong_trust_domain",
                f"cannot issue {identity.uri}: this CA signs for {self.trust_domain!r}",
            )
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive (got {ttl_seconds})")
        now = self._clock() if now is None else now
        not_after = min(now + ttl_seconds, self.not_after)
        if not_after <= now:
            raise CAError(f"the mesh CA certificate expired at {_utc(self.not_after)}")
        return now - CLOCK_SKEW_SECONDS, not_after

    def server_certificate(self, dns_names: Sequence[str], ttl_seconds: float
                           ) -> tuple[bytes, bytes]:
        """A TLS server certificate for the signing service itself (DNS SANs), chain and
        key PEM: nodes verify it against the mesh root they already trust."""
        now = self._clock()
        cert, key = _sign_leaf(self.certificate, self._key, [], now - CLOCK_SKEW_SECONDS,
                               min(now + ttl_seconds, self.not_after), dns_names=dns_names)
        assert key is not None
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return _pem(cert) + b"".join(self._chain_pems), key_pem

    @property
    def chain_pems(self) -> tuple[bytes, ...]:
        """What follows a leaf on the wire (the signing CA and intermediates, not the root)."""
        return self._chain_pems


# -- loading and checking -------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_certificates(path: Path) -> list[x509.Certificate]:
    data = _read_bytes(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CAError(f"{path}: no PEM certificate found (want -----BEGIN CERTIFICATE-----)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAError(f"{path}: malformed PEM certificate: {e}") from None
    if not certs:
        raise CAError(f"{path}: no PEM certificate found")
    return certs


def _read_key(path: Path) -> CAPrivateKey:
    data = _read_bytes(path)
    if b"PRIVATE KEY-----" not in data:
        raise CAError(f"{path}: no PEM private key found (want -----BEGIN PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{path}: private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CAError(f"{path}: malformed PEM private key: {e}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _SUPPORTED_CURVES):
            raise CAError(f"{path}: ECDSA curve {key.curve.name} is not supported "
                          "(use P-256, P-384 or P-521)")
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CAError(f"{path}: RSA key of {key.key_size} bits is too small "
                          f"(at least {MIN_RSA_BITS})")
        return key
    raise CAError(f"{path}: unsupported key type {type(key).__name__}: "
                  "the mesh CA key must be ECDSA or RSA")


def _check_ca_certificate(cert: x509.Certificate, what: object, now: float) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAError(f"{what}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    # RFC 5280 makes keyUsage mandatory in CA certificates, and peers verify strictly.
    if ku is None or not ku.key_cert_sign:
        raise CAError(f"{what}: CA certificate's keyUsage does not include keyCertSign")
    if now >= cert.not_valid_after_utc.timestamp():
        raise CAError(f"{what}: CA certificate expired at {cert.not_valid_after_utc}")
    if now < cert.not_valid_before_utc.timestamp():
        raise CAError(f"{what}: CA certificate is not valid until {cert.not_valid_before_utc}")


def _check_chain(certs: list[x509.Certificate], path: Path) -> None:
    for index, (child, parent) in enumerate(zip(certs, certs[1:], strict=False)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CAError(
                f"{path}: certificate #{index + 2} did not issue certificate #{index + 1}; "
                "order is the CA certificate first, then its issuers up to the root"
            ) from None
    root = certs[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        if len(certs) == 1:
            raise CAError(
                f"{path}: CA certificate is not self-signed and no chain follows it; "
                "append its issuers up to the root in the same file"
            ) from None
        raise CAError(f"{path}: last certificate is not a self-signed root") from None

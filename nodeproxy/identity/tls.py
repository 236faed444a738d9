"""TLS for the HBONE tunnel: mutual TLS 1.3 with SPIFFE X.509 identities.

`server_context` / `client_context` give an `ssl.SSLContext` presenting a workload's current
certificate: TLS 1.3 only, ALPN "h2", the peer's certificate required and its chain verified
against the mesh root, hostname checking off (the peer's SPIFFE ID is checked instead, with
`verify_peer`, once the handshake is done). Contexts are cached per identity and certificate
serial: after a rotation the next call builds a new context, while contexts already handed
out keep presenting the old certificate, which stays valid until it expires.

Keys never touch a filesystem: `ssl` can only load a certificate and key from a path, so
they are written to anonymous memory files (`os.memfd_create`) and loaded through
`/proc/self/fd/N`; the memory file is closed as soon as OpenSSL has read it. Where memfd is
unavailable, a 0600 file in /dev/shm (tmpfs) is used and unlinked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.spiffe import IdentityError, SpiffeId, parse_spiffe_id

if TYPE_CHECKING:
    from nodeproxy.identity.mesh_ca import IssuedCert

ALPN_PROTOCOLS = ["h2"]
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# What `verify_peer` and `classify_handshake_error` return / put in IdentityError.reason.
PEER_REASONS = (
    "no_alpn", "no_certificate", "not_spiffe", "wrong_trust_domain", "unexpected_identity",
    "expired", "not_yet_valid", "untrusted_ca",
)
HANDSHAKE_REASONS = PEER_REASONS + (
    "peer_rejected",    # the peer refused our certificate (it sent a certificate alert)
    "protocol_error",   # not TLS, or not TLS 1.3 (garbage, plaintext HTTP, old client)
    "timeout",          # the handshake did not finish in time
    "connection_closed",  # EOF or reset during the handshake
    "handshake_failed",   # anything else
)

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h).
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10


class _TlsObject(Protocol):
    """What `verify_peer` needs: `ssl.SSLSocket` and `ssl.SSLObject` both have it."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...

    def selected_alpn_protocol(self) -> str | None: ...


# -- contexts ---------------------------------------------------------------------------------

def build_context(issued: IssuedCert, trust_bundle_pem: bytes, *, server_side: bool
                  ) -> ssl.SSLContext:
    """An uncached mTLS context presenting `issued` and trusting `trust_bundle_pem`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False             # identity = SPIFFE ID, checked by verify_peer
    ctx.verify_mode = ssl.CERT_REQUIRED    # on a server: a client certificate is mandatory
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    if server_side:
        ctx.num_tickets = 0                # no resumption: every connection shows its cert
    ctx.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    with _memory_file(issued.chain_pem) as certfile, _memory_file(issued.key_pem) as keyfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class _ContextCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[bool, str, str], tuple[int, ssl.SSLContext]] = {}


_CACHES: weakref.WeakKeyDictionary[CertificateManager, _ContextCache] = (
    weakref.WeakKeyDictionary()
)


def _context(manager: CertificateManager, namespace: str, service_account: str,
             server_side: bool) -> ssl.SSLContext:
    issued = manager.get(namespace, service_account)
    cache = _CACHES.setdefault(manager, _ContextCache())
    key = (server_side, namespace, service_account)
    cached = cache.entries.get(key)
    if cached is not None and cached[0] == issued.serial:
        return cached[1]
    ctx = build_context(issued, manager.trust_bundle_pem, server_side=server_side)
    cache.entries[key] = (issued.serial, ctx)
    return ctx


def server_context(manager: CertificateManager, namespace: str, service_account: str
                   ) -> ssl.SSLContext:
    """Context for accepting HBONE as (namespace, service_account); cached per cert serial."""
    return _context(manager, namespace, service_account, server_side=True)


def client_context(manager: CertificateManager, namespace: str, service_account: str
                   ) -> ssl.SSLContext:
    """Context for dialling HBONE as (namespace, service_account); cached per cert serial."""
    return _context(manager, namespace, service_account, server_side=False)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that reads `data` from memory, valid inside the `with`."""
    try:
        fd = os.memfd_create("nodeproxy-tls", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="nodeproxy-tls-", dir=shm)   # mode 0600
    try:
        os.write(fd, data)
        yield path
    finally:
        os.close(fd)
        os.unlink(path)


# -- asyncio (uvloop) helpers -----------------------------------------------------------------

@dataclass
class TlsStream:
    """An established, identity-checked mTLS connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: SpiffeId


async def accept_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    trust_domain: str,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> TlsStream:
    """Server side: TLS handshake on an accepted socket, then `verify_peer`.

    Use on sockets from `loop.sock_accept` (not `asyncio.start_server(ssl=...)`, which drops
    handshake failures silently, nor `StreamWriter.start_tls`, which loses a ClientHello that
    arrived early under uvloop). Raises the handshake's exception or IdentityError, the
    socket closed: label it with `classify_handshake_error`.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    sock.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=context, ssl_handshake_timeout=handshake_timeout
    )
    return _checked(transport, protocol, reader, loop, trust_domain, None)


async def connect_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    trust_domain: str,
    *,
    expected: SpiffeId | str | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> TlsStream:
    """Client side: TLS handshake on a connected socket, then `verify_peer(expected=...)`.

    No SNI is sent (`server_hostname=""`); the server's SPIFFE ID is what is checked. In
    TLS 1.3 the client finishes before the server has judged the client's certificate: a
    refusal shows up as an SSLError on the first read (`classify_handshake_error` ->
    "peer_rejected").
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    sock.setblocking(False)
    transport, _ = await loop.create_connection(
        lambda: protocol, sock=sock, ssl=context, server_hostname="",
        ssl_handshake_timeout=handshake_timeout,
    )
    return _checked(transport, protocol, reader, loop, trust_domain, expected)


def _checked(
    transport: asyncio.BaseTransport,
    protocol: asyncio.StreamReaderProtocol,
    reader: asyncio.StreamReader,
    loop: asyncio.AbstractEventLoop,
    trust_domain: str,
    expected: SpiffeId | str | None,
) -> TlsStream:
    try:
        peer = verify_peer(transport.get_extra_info("ssl_object"), trust_domain,
                           expected=expected)
    except BaseException:
        transport.abort()  # type: ignore[attr-defined]
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return TlsStream(reader, writer, peer)


# -- after the handshake --------------------------------------------------------------------

def verify_peer(
    ssl_object: _TlsObject,
    trust_domain: str,
    *,
    expected: SpiffeId | str | None = None,
    alpn: str | None = ALPN_PROTOCOLS[0],
    now: float | None = None,
) -> SpiffeId:
    """The peer's SPIFFE ID, from a completed handshake made with one of our contexts.

    `ssl_object` is an `ssl.SSLSocket`/`ssl.SSLObject` (asyncio:
    `transport.get_extra_info("ssl_object")`). The chain was verified against the mesh root
    during the handshake; this checks the identity: exactly one URI SAN, a workload SPIFFE
    ID, in `trust_domain` (and equal to `expected` if given), and the validity period again.
    It also checks that `alpn` ("h2") was negotiated: a TLS server whose client offers no
    common protocol completes the handshake without ALPN rather than failing it.
    Raises IdentityError with reason in PEER_REASONS.
    """
    if alpn is not None and ssl_object.selected_alpn_protocol() != alpn:
        raise IdentityError(
            "no_alpn",
            f"peer negotiated ALPN {ssl_object.selected_alpn_protocol()!r}, want {alpn!r}",
        )
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("no_certificate", "the peer presented no certificate")
    if not isinstance(der, bytes):
        raise TypeError("getpeercert(binary_form=True) did not return bytes")
    # Imported here, not with the module: a node without mTLS never loads cryptography
    # (about 7 MiB).  With mTLS its certificate source (mesh_ca, signing_client) loaded
    # it at start-up, so this is a lookup in sys.modules, not an import, per handshake.
    from cryptography import x509

    from nodeproxy.identity.mesh_ca import uri_sans

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise IdentityError("not_spiffe", f"peer certificate cannot be parsed: {e}") from None
    now = time.time() if now is None else now
    if now >= cert.not_valid_after_utc.timestamp():
        raise IdentityError("expired", f"peer certificate expired at {cert.not_valid_after_utc}")
    if now < cert.not_valid_before_utc.timestamp():
        raise IdentityError(
            "not_yet_valid", f"peer certificate is not valid until {cert.not_valid_before_utc}"
        )
    try:
        uris = uri_sans(cert)
    except ValueError as e:
        raise IdentityError("not_spiffe", f"peer certificate SAN is malformed: {e}") from None
    if len(uris) != 1:
        raise IdentityError(
            "not_spiffe", f"peer certificate has {len(uris)} URI SANs, want exactly one SPIFFE ID"
        )
    peer = parse_spiffe_id(uris[0])     # IdentityError("not_spiffe", ...) if not a workload ID
    if peer.trust_domain != trust_domain:
        raise IdentityError(
            "wrong_trust_domain",
            f"peer {peer.uri} is not in trust domain {trust_domain!r}",
        )
    if expected is not None and peer.uri != str(expected):
        raise IdentityError("unexpected_identity", f"peer is {peer.uri}, expected {expected}")
    return peer


_PEER_REJECTED_ALERTS = (
    "ALERT_BAD_CERTIFICATE", "ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_UNKNOWN", "ALERT_CERTIFICATE_REVOKED", "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED", "ALERT_ACCESS_DENIED", "ALERT_DECRYPT_ERROR",
)
_PROTOCOL_ERRORS = (
    "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNSUPPORTED_PROTOCOL",
    "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH", "RECORD_LAYER_FAILURE",
    "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE", "WRONG_SSL_VERSION",
    "NO_SHARED_CIPHER", "TLSV1_ALERT_DECODE_ERROR", "DECODE_ERROR", "UNEXPECTED_MESSAGE",
    "TLSV1_ALERT_UNEXPECTED_MESSAGE", "BAD_PACKET_LENGTH",
    "LENGTH_MISMATCH", "BAD_RECORD_TYPE", "UNEXPECTED_RECORD",
)


def classify_handshake_error(exc: BaseException) -> str:
    """A short label (one of HANDSHAKE_REASONS) for a failed handshake, for metrics and logs."""
    if isinstance(exc, IdentityError):
        return exc.reason if exc.reason in HANDSHAKE_REASONS else "handshake_failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _X509_V_ERR_CERT_HAS_EXPIRED:
            return "expired"
        if exc.verify_code == _X509_V_ERR_CERT_NOT_YET_VALID:
            return "not_yet_valid"
        return "untrusted_ca"
    if isinstance(exc, TimeoutError):   # asyncio.TimeoutError and socket.timeout alike
        return "timeout"
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return "timeout"                # asyncio's and uvloop's ssl_handshake_timeout
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return "connection_closed"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "no_certificate"
        if "NO_APPLICATION_PROTOCOL" in reason:
            return "no_alpn"
        if any(alert in reason for alert in _PEER_REJECTED_ALERTS):
            return "peer_rejected"
        if "UNEXPECTED_EOF" in reason:
            return "connection_closed"
        if any(name in reason for name in _PROTOCOL_ERRORS):
            return "protocol_error"
    return "handshake_failed"

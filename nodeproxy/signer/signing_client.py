"""The node side of the signing service: a key and CSR made in memory, the node daemon's
projected ServiceAccount token (audience-bound, re-read for every call: the kubelet
rotates it), HTTPS to the service verified against the mesh root, and the signed chain
checked before use (the leaf names exactly the identity asked for, over our key).

`SignerError.reason` is the service's refusal reason (nodeproxy.signer.node_authorizer.REASONS) or
"unavailable" (no answer, a 5xx, not the API's JSON).
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodeproxy.identity.csr import make_csr
from nodeproxy.identity.mesh_ca import IssuedCert, uri_sans

DEFAULT_TIMEOUT = 10.0


class SignerError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SignerClient:
    def __init__(self, url: str, *, trust_bundle_pem: bytes, token_file: str,
                 server_name: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.url = url.rstrip("/")
        self._token_file = token_file
        self._server_name = server_name
        self._context = ssl.create_default_context(cadata=trust_bundle_pem.decode("ascii"))
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def sign(self, identity: str, ttl_seconds: float) -> IssuedCert:
        """A leaf for `identity` (a SPIFFE ID URI); SignerError if refused or unreachable."""
        csr, key_pem = make_csr(identity)
        try:
            token = Path(self._token_file).read_text().strip()
        except OSError as e:
            raise SignerError("unavailable", f"cannot read {self._token_file}: {e}") from None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                    f"{self.url}/v1/sign", json={"csr": csr.decode(), "ttlSeconds": ttl_seconds},
                    headers={"Authorization": f"Bearer {token}"}, ssl=self._context,
                    server_hostname=self._server_name) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise SignerError("unavailable", f"{self.url}: {e or type(e).__name__}") from None
        if status != 200:
            reason = answer.get("reason") if isinstance(answer, dict) else None
            if status >= 500 or not isinstance(reason, str):
                raise SignerError("unavailable", f"{self.url}: HTTP {status}: {answer}")
            raise SignerError(reason, str(answer.get("message", reason)))
        return _issued(identity, key_pem, answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _issued(identity: str, key_pem: bytes, answer: object) -> IssuedCert:
    try:
        assert isinstance(answer, dict)
        pems = [p.encode("ascii") for p in answer["certificateChain"]]
        leaf = x509.load_pem_x509_certificate(pems[0])
    except (AssertionError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise SignerError("unavailable", f"malformed answer from the signer: {e}") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    if uri_sans(leaf) != [identity]:
        raise SignerError("unavailable", f"the signer returned {uri_sans(leaf)}, "
                                         f"not {identity}")
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise SignerError("unavailable", "the signer's leaf is not over our key")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= time.time():
        raise SignerError("unavailable", "the signer returned an expired leaf")
    return IssuedCert(spiffe_id=identity, cert_pem=pems[0], key_pem=key_pem,
                      chain=tuple(pems[1:]), not_before=leaf.not_valid_before_utc.timestamp(),
                      not_after=not_after, serial=leaf.serial_number, certificate=leaf)

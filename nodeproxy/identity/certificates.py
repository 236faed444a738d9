"""The node's workload certificates: one per (namespace, service account), kept fresh.

A certificate is issued the first time an identity is needed and re-issued once it is past
`rotate_fraction` of its life (by `rotate_due`, run periodically by `run_rotation`, and also
by `get` itself if the rotation task has fallen behind). A re-issued certificate replaces the
old one for new handshakes only: nothing is revoked, so TLS contexts and connections built on
the old certificate keep working until it expires. Private keys live in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodeproxy.identity.spiffe import spiffe_id

if TYPE_CHECKING:  # cryptography: only where a CA or a signer client is made
    from nodeproxy.identity.mesh_ca import Clock, IssuedCert, MeshCA

log = logging.getLogger(__name__)

RotateCallback = Callable[[str, "IssuedCert"], None]
"""Called as `callback(spiffe_id, new_cert)` after every issuance that replaced a cert."""


def check_rotation(ttl_seconds: float, rotate_fraction: float) -> None:
    """A leaf lifetime and the fraction of it after which the leaf is renewed, or
    ValueError (shared by every certificate source)."""
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive (got {ttl_seconds})")
    if not 0 < rotate_fraction < 1:
        raise ValueError(f"rotate_fraction must be between 0 and 1 (got {rotate_fraction})")


class CertificateManager:
    """Issues, caches and rotates the leaf certificates of the workloads on this node."""

    def __init__(
        self,
        ca: MeshCA,
        trust_domain: str,
        ttl_seconds: float = 86400,
        rotate_fraction: float = 0.5,
        clock: Clock = time.time,
    ) -> None:
        if trust_domain != ca.trust_domain:
            raise ValueError(
                f"trust domain {trust_domain!r} differs from the CA's {ca.trust_domain!r}"
            )
        check_rotation(ttl_seconds, rotate_fraction)
        self.ca = ca
        self.trust_domain = trust_domain
        self.ttl_seconds = ttl_seconds
        self.rotate_fraction = rotate_fraction
        self.clock = clock
        self.rotations = 0          # certificates replaced (rotation or expiry)
        self.issued = 0             # certificates signed, first issuances included
        self.on_rotate: list[RotateCallback] = []
        self._certs: dict[tuple[str, str], IssuedCert] = {}

    @property
    def trust_bundle_pem(self) -> bytes:
        """PEM of the root(s) peers are verified against."""
        return self.ca.trust_anchor_pem

    def signer_status(self) -> str | None:
        """What /ready says about the mesh signing service: nothing here (this node signs
        with its own CA key); RemoteCertificates says whether the signer answers."""
        return None

    def get(self, namespace: str, service_account: str) -> IssuedCert:
        """The current certificate of an identity, issuing or renewing it when needed."""
        key = (namespace, service_account)
        cert = self._certs.get(key)
        if cert is not None and not self._due(cert, self.clock()):
            return cert
        return self._issue(key, cert)

    def rotate_due(self) -> list[str]:
        """Re-issue every certificate past `rotate_fraction` of its life; return their IDs."""
        now = self.clock()
        rotated = []
        for key, cert in list(self._certs.items()):
            if self._due(cert, now):
                rotated.append(self._issue(key, cert).spiffe_id)
        return rotated

    def discard(self, namespace: str, service_account: str) -> None:
        """Forget an identity no pod on this node uses any more (its cert simply expires)."""
        self._certs.pop((namespace, service_account), None)

    def expiry_timestamps(self) -> dict[str, float]:
        """SPIFFE ID -> epoch seconds its current certificate expires (for metrics)."""
        return {cert.spiffe_id: cert.not_after for cert in self._certs.values()}

    def next_rotation(self) -> float | None:
        """Epoch seconds of the earliest pending rotation, or None with no certificates."""
        return min((self._rotate_at(c) for c in self._certs.values()), default=None)

    async def run_rotation(self, interval: float = 60.0) -> None:
        """Call `rotate_due` every `interval` seconds until cancelled.

        An error (say, the CA expired) is logged and retried next round: certificates
        already issued stay in use until they expire.
        """
        while True:
            try:
                self.rotate_due()
            except Exception:
                log.exception("certificate rotation failed; retrying in %.0f s", interval)
            await asyncio.sleep(interval)

    def _rotate_at(self, cert: IssuedCert) -> float:
        return cert.not_before + cert.lifetime * self.rotate_fraction

    def _due(self, cert: IssuedCert, now: float) -> bool:
        # Past the rotation point, and a new cert would outlive the old one (near the CA's
        # own expiry leaves are capped, and re-issuing on every call would gain nothing).
        return now >= self._rotate_at(cert) and (
            cert.expired(now) or min(now + self.ttl_seconds, self.ca.not_after) > cert.not_after
        )

    def _issue(self, key: tuple[str, str], old: IssuedCert | None) -> IssuedCert:
        identity = spiffe_id(self.trust_domain, *key)
        cert = self.ca.issue(identity, self.ttl_seconds, now=self.clock())
        self._certs[key] = cert
        self.issued += 1
        if old is not None:
            self.rotations += 1
            log.info("rotated certificate of %s (serial %x -> %x, expires %s)",
                     identity, old.serial, cert.serial, time.ctime(cert.not_after))
            for callback in list(self.on_rotate):
                try:
                    callback(identity, cert)
                except Exception:
                    log.exception("on_rotate callback %r failed", callback)
        return cert

"""Workload certificates from the mesh signing service, for a node that holds no CA key.

`RemoteCertificates` is a `CertificateManager` whose leaves come from `nodeproxy ca
serve` (nodeproxy.signer.signing_client): the key of each identity is made here, in memory, and
only its CSR leaves the node.  Signing is a network call, so it never happens on the
path of a handshake:

- `get` answers from memory only.  An identity it has no valid leaf for is queued for
  signing and refused for now (IdentityError "no_certificate"); a leaf past its rotation
  point is still served (it is valid until it expires).
- `prepare` (awaited when a pod is enrolled) signs the identity's first leaf.
- `run_rotation` renews every leaf at `rotate_fraction` of its life (half-life by
  default) and signs queued identities; after a failure it retries every
  `retry_seconds`.  While the signer is away the node keeps serving on its current
  leaves; `signer_status` says so (`/ready`'s detail, `nodeproxy_identity_signer_up`,
  `nodeproxy_identity_signer_failures_total{reason}`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nodeproxy.identity.certificates import CertificateManager, check_rotation
from nodeproxy.identity.mesh_ca import Clock, IssuedCert
from nodeproxy.identity.spiffe import IdentityError, spiffe_id
from nodeproxy.signer.signing_client import SignerClient, SignerError

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0


class RemoteCertificates(CertificateManager):
    def __init__(self, client: SignerClient, trust_bundle_pem: bytes, trust_domain: str,
                 ttl_seconds: float = 86400, rotate_fraction: float = 0.5,
                 clock: Clock = time.time, retry_seconds: float = RETRY_SECONDS) -> None:
        check_rotation(ttl_seconds, rotate_fraction)
        self.client = client
        self._trust_bundle = trust_bundle_pem
        self.trust_domain = trust_domain
        self.ttl_seconds = ttl_seconds
        self.rotate_fraction = rotate_fraction
        self.clock = clock
        self.retry_seconds = retry_seconds
        self.rotations = 0
        self.issued = 0
        self.on_rotate = []
        self._certs: dict[tuple[str, str], IssuedCert] = {}
        self._wanted: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # What /ready and the metrics say about the signer.
        self.signer_up = True
        self.signer_error = ""
        self.signer_down_since: float | None = None
        self.failures: dict[str, int] = {}

    @property
    def trust_bundle_pem(self) -> bytes:
        return self._trust_bundle

    def get(self, namespace: str, service_account: str) -> IssuedCert:
        key = (namespace, service_account)
        cert = self._certs.get(key)
        if cert is not None and not cert.expired(self.clock()):
            return cert
        self._want(key)
        raise IdentityError("no_certificate",
                            f"no certificate for {spiffe_id(self.trust_domain, *key)} yet "
                            f"(signer: {self.signer_status()})")

    def discard(self, namespace: str, service_account: str) -> None:
        super().discard(namespace, service_account)
        self._wanted.discard((namespace, service_account))

    def rotate_due(self) -> list[str]:
        """Nothing is signed synchronously here: `run_rotation` does it."""
        return []

    async def prepare(self, namespace: str, service_account: str) -> bool:
        """Sign the identity's first leaf now unless one is held; False (logged, retried
        by `run_rotation`) if the signer refused or is away (then without waiting for
        it: enrolment goes on, the identity's handshakes wait for the leaf)."""
        key = (namespace, service_account)
        self._wanted.add(key)
        cert = self._certs.get(key)
        if cert is not None and not cert.expired(self.clock()):
            return True
        if not self.signer_up:
            self._wake.set()
            return False
        return await self._renew(key)

    async def run_rotation(self, interval: float = 60.0) -> None:
        while True:
            now = self.clock()
            failed = False
            for key in sorted(self._wanted):
                cert = self._certs.get(key)
                if cert is None or now >= self._rotate_at(cert):
                    failed |= not await self._renew(key)
            self._wake.clear()
            delay = self.retry_seconds if failed else self._sleep_for(interval)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def signer_status(self) -> str:
        if self.signer_up:
            return "available"
        since = self.signer_down_since or self.clock()
        return (f"unavailable for {self.clock() - since:.0f} s ({self.signer_error}); "
                "serving current certificates")

    def _sleep_for(self, interval: float) -> float:
        due = self.next_rotation()
        if due is None:
            return interval
        return max(min(0.5, interval), min(interval, due - self.clock()))

    def _want(self, key: tuple[str, str]) -> None:
        if key not in self._wanted:
            self._wanted.add(key)
        self._wake.set()

    async def _renew(self, key: tuple[str, str]) -> bool:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            old = self._certs.get(key)
            if old is not None and self.clock() < self._rotate_at(old):
                return True  # renewed meanwhile
            identity = spiffe_id(self.trust_domain, *key)
            try:
                cert = await self.client.sign(identity, self.ttl_seconds)
            except SignerError as e:
                self.failures[e.reason] = self.failures.get(e.reason, 0) + 1
                if e.reason == "unavailable":
                    if self.signer_up:
                        self.signer_down_since = self.clock()
                        log.warning("mesh signer unavailable (%s): serving current "
                                    "certificates, retrying every %.0f s", e,
                                    self.retry_seconds)
                    self.signer_up = False
                    self.signer_error = str(e)
                else:
                    log.warning("mesh signer refused %s (%s): %s", identity, e.reason, e)
                return False
            if not self.signer_up:
                log.info("mesh signer available again")
            self.signer_up, self.signer_error, self.signer_down_since = True, "", None
            self._certs[key] = cert
            self.issued += 1
            if old is not None:
                self.rotations += 1
                log.info("renewed certificate of %s (serial %x -> %x, expires %s)", identity,
                         old.serial, cert.serial, time.ctime(cert.not_after))
                for callback in list(self.on_rotate):
                    try:
                        callback(identity, cert)
                    except Exception:
                        log.exception("on_rotate callback %r failed", callback)
            return True

"""RemoteCertificates' timing, on a controlled clock: a leaf is signed when its pod is
prepared, renewed at half-life, and kept in service while the signer is away.  The
signer here is a real MeshCA behind the client's interface (the network side is
tests/integration/test_signer*.py)."""

from __future__ import annotations

import asyncio

import pytest

from nodeproxy.identity.mesh_ca import IssuedCert, MeshCA
from nodeproxy.identity.spiffe import IdentityError
from nodeproxy.signer.remote_certificates import RemoteCertificates
from nodeproxy.signer.signing_client import SignerError


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class CaBehindAClient:
    """The SignerClient interface over an in-memory CA; `away` makes it unreachable."""

    def __init__(self, clock: Clock) -> None:
        self.ca = MeshCA.generate("cluster.local", clock=clock)
        self.away = False
        self.refuse: str | None = None
        self.calls = 0

    async def sign(self, identity: str, ttl_seconds: float) -> IssuedCert:
        self.calls += 1
        if self.away:
            raise SignerError("unavailable", "connection refused")
        if self.refuse:
            raise SignerError(self.refuse, "no pod")
        return self.ca.issue(identity, ttl_seconds)


def manager(clock: Clock) -> tuple[RemoteCertificates, CaBehindAClient]:
    client = CaBehindAClient(clock)
    certs = RemoteCertificates(client, client.ca.trust_anchor_pem, "cluster.local",  # type: ignore[arg-type]
                               ttl_seconds=3600, clock=clock, retry_seconds=0.01)
    return certs, client


def test_leaves_are_signed_ahead_renewed_at_half_life_and_kept_while_the_signer_is_away(
) -> None:
    async def run() -> None:
        clock = Clock()
        certs, client = manager(clock)
        with pytest.raises(IdentityError) as info:
            certs.get("shop", "web")  # nothing yet: refused, and queued
        assert info.value.reason == "no_certificate"
        assert await certs.prepare("shop", "web")
        first = certs.get("shop", "web")
        assert first.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
        rotation = asyncio.create_task(certs.run_rotation(interval=0.05))
        try:
            await asyncio.sleep(0.1)
            assert certs.get("shop", "web") is first  # not due yet
            client.away = True
            clock.now = first.not_before + first.lifetime * 0.6  # past half-life
            await asyncio.sleep(0.1)
            assert certs.get("shop", "web") is first  # still served while away
            assert not certs.signer_up
            assert certs.signer_status().startswith("unavailable for")
            assert certs.failures["unavailable"] >= 1
            client.away = False
            await asyncio.sleep(0.1)
            renewed = certs.get("shop", "web")
            assert renewed.serial != first.serial and certs.signer_up
            assert certs.rotations == 1
            clock.now = renewed.not_after + 1  # expired with the signer refusing: no leaf
            client.refuse = "no_such_pod_on_node"
            with pytest.raises(IdentityError):
                certs.get("shop", "web")
            await asyncio.sleep(0.1)
            assert certs.failures["no_such_pod_on_node"] >= 1
        finally:
            rotation.cancel()

    asyncio.run(run())


def test_prepare_does_not_wait_on_a_signer_known_to_be_away() -> None:
    async def run() -> None:
        clock = Clock()
        certs, client = manager(clock)
        client.away = True
        assert not await certs.prepare("shop", "web")
        calls = client.calls
        assert not await certs.prepare("shop", "api")  # known away: no second wait
        assert client.calls == calls

    asyncio.run(run())

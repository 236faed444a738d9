"""The HBONE L7-authorized marker: HbonePool.open(l7_checked=True) sends it on that stream
only, and the server passes it to admission only when tunnel.trustSourceL7Authorization
says to believe it (by default a marked stream is judged as an unmarked one).  Real
HTTP/2 sessions over a socketpair; TLS and the pool's dialling are left out (the marker
is per stream, not per connection)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.config.model import TunnelSettings
from nodeproxy.listeners.inbound_hbone import HboneServer
from nodeproxy.policy.admission import Admission
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.tunnel.client import HbonePool, PoolKey, TunnelError
from nodeproxy.tunnel.metrics import TunnelMetrics
from nodeproxy.tunnel.session import H2Session

POD_IP = ipaddress.ip_address("10.244.2.20")
SOURCE_IP = ipaddress.ip_address("10.244.1.10")
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"


@dataclass
class FakeWorkload:
    namespace: str = "shop"
    service_account: str = "web"


@dataclass
class FakePod:
    workload: FakeWorkload


class RecordingAdmitter:
    """Refuses everything (so the server never dials) and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def admit(self, dest: Any, principal: str | None, source_ip: Any, port: int,
              **options: Any) -> Admission:
        self.calls.append({"principal": principal, "source_ip": source_ip, "port": port,
                           **options})
        return Admission(False, "shop/d", "recorded")


async def _marker_round_trip(trusted: bool) -> tuple[list[dict[str, Any]], list[str]]:
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()
    tunnel_metrics = TunnelMetrics(registry)
    admitter = RecordingAdmitter()
    # Fakes (duck-typed) for what a refused stream never reaches: certificates, dialling.
    server = HboneServer(
        certificates=None, trust_domain="cluster.local", port=15008,
        announcer=None, handshake_timeout=1, connect_timeout=1,
        local_pod=lambda ip: FakePod(FakeWorkload()) if ip == POD_IP else None,
        state=SimpleNamespace(current=SimpleNamespace(
            admitter=admitter, table=None,
            config=SimpleNamespace(tunnel=TunnelSettings.model_validate(
                {"trustSourceL7Authorization": trusted})))),
        tracker=ConnectionTracker(), metrics=ProxyMetrics(registry),
        tunnel_metrics=tunnel_metrics)

    def server_ready(session: H2Session) -> bool:
        session.peer_identity = PEER  # what mTLS verification would have set
        session.local_identity = "spiffe://cluster.local/ns/shop/sa/web"
        return True

    client_sock, server_sock = socket.socketpair()
    server_session = H2Session(client_side=False, on_request=server._on_request,
                               on_ready=server_ready)
    client_session = H2Session(client_side=True)
    await loop.connect_accepted_socket(lambda: server_session, server_sock)
    await loop.create_connection(lambda: client_session, sock=client_sock)

    pool = HbonePool(certificates=None, trust_domain="cluster.local",
                     port=15008, settings=TunnelSettings(), metrics=tunnel_metrics,
                     connect_timeout=1)

    # The socketpair session pooled for the key instead of a dialled TLS one (the
    # compiled HbonePool is a native class: its methods cannot be replaced).
    pool._pools[PoolKey("spiffe://cluster.local/ns/shop/sa/frontend",
                        "spiffe://cluster.local/ns/shop/sa/web", "node-b")] = [client_session]
    results: list[str] = []
    for l7_checked in (True, False, True):
        options = {"l7_checked": True} if l7_checked else {}
        with pytest.raises(TunnelError) as info:
            await pool.open(source_namespace="shop", source_sa="frontend",
                            destination="spiffe://cluster.local/ns/shop/sa/web", node="node-b",
                            ip=POD_IP, port=8080, source_ip=SOURCE_IP, **options)
        results.append(info.value.result)
    client_session.close()
    server_session.close()
    return admitter.calls, results


def test_l7_marker_is_per_stream_and_reaches_admission_when_trusted() -> None:
    calls, results = asyncio.run(_marker_round_trip(trusted=True))
    assert results == ["status_403"] * 3  # all refused by the recording admitter
    assert [c["l7_checked"] for c in calls] == [True, False, True]  # one connection, 3 streams
    assert {(c["principal"], c["source_ip"], c["port"]) for c in calls} == {
        (PEER, SOURCE_IP, 8080)}


def test_l7_marker_is_ignored_by_default() -> None:
    """A source node's marker alone never relaxes the destination's decision."""
    calls, results = asyncio.run(_marker_round_trip(trusted=False))
    assert results == ["status_403"] * 3
    assert [c["l7_checked"] for c in calls] == [False, False, False]

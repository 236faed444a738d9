"""Fair share of the node proxy, the pure parts: per-source accounting and its token bucket,
the descriptor budget's arithmetic, the open-file limit, the config's validation; and the
request-header timeout of both codecs over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

import h2.config
import h2.connection
import h2.events
import pytest
from pydantic import ValidationError

from nodeproxy.codec.h1 import H1Exchange, H1Server
from nodeproxy.codec.message import ResponseHead
from nodeproxy.config.changes import restart_only_changes
from nodeproxy.config.model import LimitSettings, NodeConfig
from nodeproxy.http.client_connections import ClientH2Server as _ClientH2Server
from nodeproxy.tcp import descriptors
from nodeproxy.tcp.descriptors import DescriptorBudget, OverBudget, raise_open_file_limit
from nodeproxy.tcp.fairshare import (
    CONNECTION_LIMIT,
    CONNECTION_RATE,
    Lease,
    RefusalLog,
    ShareLimits,
    SourceShares,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- per-source accounting ---------------------------------------------------------------


def test_connections_past_the_cap_are_refused_and_other_sources_are_not():
    shares = SourceShares(ShareLimits(max_connections=3))
    leases = [shares.admit_connection("ns/attacker") for _ in range(3)]
    assert all(isinstance(lease, Lease) for lease in leases)
    assert shares.admit_connection("ns/attacker") == CONNECTION_LIMIT
    assert shares.admit_connection("ns/attacker") == CONNECTION_LIMIT
    assert isinstance(shares.admit_connection("ns/neighbour"), Lease)
    assert shares.connections("ns/attacker") == 3
    leases[0].release()
    assert shares.connections("ns/attacker") == 2
    assert isinstance(shares.admit_connection("ns/attacker"), Lease)


def test_a_lease_is_released_once_however_often_it_is_released():
    shares = SourceShares(ShareLimits(max_connections=2))
    first = shares.admit_connection("p")
    second = shares.admit_connection("p")
    assert isinstance(first, Lease) and isinstance(second, Lease)
    for _ in range(5):
        first.release()
    assert shares.connections("p") == 1  # the second still holds its place
    second.release()
    assert shares.connections("p") == 0
    assert len(shares) == 0  # nothing held, no bucket: the entry is gone


def test_connection_rate_is_a_token_bucket_per_source():
    clock = Clock()
    shares = SourceShares(ShareLimits(max_connections=None, connections_per_second=10,
                                      connection_burst=5), clock)
    admitted = [shares.admit_connection("a") for _ in range(8)]
    assert sum(isinstance(x, Lease) for x in admitted) == 5  # the burst
    assert admitted[5:] == [CONNECTION_RATE] * 3
    assert isinstance(shares.admit_connection("b"), Lease)  # another source has its own
    clock.now += 0.35  # 3.5 tokens back
    again = [shares.admit_connection("a") for _ in range(5)]
    assert sum(isinstance(x, Lease) for x in again) == 3
    # Over any T seconds at most burst + rate * T pass.
    total = 5 + 3
    for _ in range(100):
        clock.now += 0.01
        if isinstance(shares.admit_connection("a"), Lease):
            total += 1
    assert total <= 5 + 10 * (0.35 + 1.0) + 1


def test_default_burst_is_two_seconds_of_the_rate():
    assert ShareLimits(None, connections_per_second=1000).burst == 2000
    assert ShareLimits(None, connections_per_second=0.2).burst == 1
    assert ShareLimits(None, connections_per_second=10, connection_burst=3).burst == 3


def test_requests_in_flight_are_capped_per_source():
    shares = SourceShares(ShareLimits(max_connections=None, max_requests=2))
    assert shares.begin_request("a") and shares.begin_request("a")
    assert not shares.begin_request("a")
    assert shares.begin_request("b")
    shares.end_request("a")
    assert shares.begin_request("a")
    assert shares.requests("a") == 2


def test_an_update_applies_new_caps_and_keeps_what_is_held():
    clock = Clock()
    shares = SourceShares(ShareLimits(4, connections_per_second=100, connection_burst=100),
                          clock)
    held = [shares.admit_connection("a") for _ in range(4)]
    shares.update(ShareLimits(2, connections_per_second=100, connection_burst=100))
    assert shares.connections("a") == 4
    assert shares.admit_connection("a") == CONNECTION_LIMIT
    for lease in held[:3]:
        assert isinstance(lease, Lease)
        lease.release()
    assert isinstance(shares.admit_connection("a"), Lease)


def test_idle_sources_do_not_pile_up():
    """Inbound keys are client addresses: an entry must go once it holds nothing."""
    clock = Clock()
    shares = SourceShares(ShareLimits(10, connections_per_second=100, connection_burst=10),
                          clock)
    for i in range(5000):
        lease = shares.admit_connection(f"10.0.{i // 256}.{i % 256}")
        assert isinstance(lease, Lease)
        lease.release()
    clock.now += 1.0  # every bucket full again
    shares.admit_connection("last")
    shares.update(shares.limits)
    assert len(shares) <= 2


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("test.refusals"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        logged = [refusals.refused("ns/a", "pod_connection_limit", "outbound connection")
                  for _ in range(1000)]
        clock.now += 10.0
        refusals.refused("ns/a", "pod_connection_limit", "outbound connection")
    assert sum(logged) == 1
    assert len(caplog.records) == 2
    assert "999 more" in caplog.records[1].getMessage()


# --- descriptors -------------------------------------------------------------------------


def test_descriptor_budget_arithmetic():
    budget = DescriptorBudget(limit=1000, reserved=100)
    assert budget.ceiling == 900
    assert budget.admits(899) and not budget.admits(900)
    assert budget.admits(898, headroom=1) and not budget.admits(899, headroom=1)
    with pytest.raises(ValueError):
        budget.configure(100, 100)


def test_a_socket_in_the_reserve_is_closed_and_refused(monkeypatch: pytest.MonkeyPatch):
    """Three sockets; the budget's ceiling is the highest one's number, so the two below
    it are admitted and the one at it is closed and refused.  (Built from the numbers the
    sockets got, not from the lowest free one: another thread of the test process, grpc's
    among them, may take descriptors at any moment.)"""
    sockets = sorted((socket.socket() for _ in range(3)), key=lambda s: s.fileno())
    top = sockets[-1]
    monkeypatch.setattr(descriptors, "BUDGET", DescriptorBudget(top.fileno() + 2, 2))
    try:
        for sock in sockets[:2]:
            descriptors.check_socket(sock)
            assert sock.fileno() >= 0
        with pytest.raises(OverBudget, match=f"descriptor {top.fileno()} is in the reserve"):
            descriptors.check_socket(top)
        assert top.fileno() == -1  # closed by the check
    finally:
        for sock in sockets:
            sock.close()


def test_open_file_limit_is_set_and_reported():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        wanted = min(hard, 4096)
        result = raise_open_file_limit(wanted)
        assert result.soft == wanted
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == wanted
        assert result.soft_before == soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- config ------------------------------------------------------------------------------


def _config(**limits: object) -> NodeConfig:
    return NodeConfig.model_validate({
        "apiVersion": "nodeproxy.io/v1alpha1", "kind": "NodeProxyConfig",
        "node": {"name": "n"}, "limits": limits})


def test_limit_defaults_and_camel_case():
    limits = LimitSettings()
    assert limits.open_files is None and limits.reserved_files == 1024
    assert limits.per_pod.max_connections == 4096
    assert limits.per_pod.connections_per_second == 250
    assert limits.per_pod.max_requests == 1024
    config = _config(openFiles=2048, reservedFiles=128,
                     perPod={"maxConnections": 8, "connectionsPerSecond": 5,
                             "connectionBurst": 2, "maxRequests": 3},
                     inbound={"maxStreamsPerNode": 9, "maxPlaintextPerSource": 7})
    assert config.limits.per_pod.connection_burst == 2
    assert config.limits.inbound.max_plaintext_per_source == 7


@pytest.mark.parametrize("limits, field", [
    ({"reservedFiles": 600, "openFiles": 1000}, "reservedFiles"),
    ({"openFiles": 10}, "openFiles"),
    ({"perPod": {"maxConnections": 0}}, "maxConnections"),
    ({"perPod": {"connectionsPerSecond": 0}}, "connectionsPerSecond"),
    ({"perPod": {"maxConnection": 5}}, "maxConnection"),
    ({"inbound": {"maxStreamsPerNode": -1}}, "maxStreamsPerNode"),
])
def test_bad_limits_are_refused(limits: dict[str, object], field: str):
    with pytest.raises(ValidationError) as e:
        _config(**limits)
    assert field in str(e.value)


def test_descriptor_settings_take_a_restart_and_caps_do_not():
    old = _config()
    assert restart_only_changes(old, _config(openFiles=5000)) == ["limits.openFiles"]
    assert restart_only_changes(old, _config(reservedFiles=64)) == ["limits.reservedFiles"]
    assert restart_only_changes(old, _config(perPod={"maxConnections": 5})) == []


def test_http_timeouts_have_defaults():
    http = _config().http
    assert http.request_headers_timeout_seconds == 10
    assert http.request_timeout_seconds == 300


# --- request-header timeout over real sockets --------------------------------------------


async def _ok(exchange: H1Exchange) -> None:
    await exchange.respond(ResponseHead(200, [("content-length", "2")]))
    await exchange.send(b"ok")
    await exchange.finish()


async def _h1_server(timeouts: list[str], header_timeout: float = 0.3) -> tuple[asyncio.Server,
                                                                                 int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: H1Server(_ok, max_header_bytes=8192, idle_timeout=30,
                         request_headers_timeout=header_timeout,
                         on_timeout=timeouts.append), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    start = time.monotonic()
    data = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), limit)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def test_h1_slowloris_gets_408_and_the_connection_closes():
    async def main() -> None:
        timeouts: list[str] = []
        server, port = await _h1_server(timeouts)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ")

        async def dribble() -> None:
            for _ in range(20):
                await asyncio.sleep(0.05)
                if writer.is_closing():
                    return
                writer.write(b"a")

        task = asyncio.create_task(dribble())
        data, seconds = await _read_until_closed(reader, 3.0)
        task.cancel()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in data
        assert 0.25 < seconds < 1.0  # bytes kept arriving; the head's clock did not reset
        assert timeouts == ["request_headers"]
        writer.close()
        server.close()
    asyncio.run(main())


def test_h1_silent_connection_is_closed_without_a_response():
    async def main() -> None:
        timeouts: list[str] = []
        server, port = await _h1_server(timeouts)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data, seconds = await _read_until_closed(reader, 3.0)
        assert data == b"" and seconds < 1.0
        assert timeouts == ["request_headers"]
        writer.close()
        server.close()
    asyncio.run(main())


def test_h1_keep_alive_between_requests_is_not_a_header_timeout():
    async def main() -> None:
        timeouts: list[str] = []
        server, port = await _h1_server(timeouts, header_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 2)
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(0.5)  # idle longer than the header timeout: allowed
        assert timeouts == []
        writer.close()
        server.close()
    asyncio.run(main())


def _h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


async def _h2_server(timeouts: list[str], header_timeout: float = 0.3
                     ) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()

    def make() -> _ClientH2Server:
        server = _ClientH2Server(_ok)  # type: ignore[arg-type]
        server.watch_heads(header_timeout, None, timeouts.append)
        return server

    server = await loop.create_server(make, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_h2_unfinished_header_block_closes_the_connection():
    """HEADERS without END_HEADERS and no CONTINUATION: GOAWAY ENHANCE_YOUR_CALM."""
    async def main() -> None:
        timeouts: list[str] = []
        server, port = await _h2_server(timeouts)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = _h2_client()
        client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                (":authority", "a")], end_stream=True)
        writer.write(client.data_to_send())  # a first request, answered
        answered = False
        while not answered:
            for event in client.receive_data(await asyncio.wait_for(reader.read(65536), 2)):
                answered |= isinstance(event, h2.events.StreamEnded)
        # A HEADERS frame for stream 3 without END_HEADERS, then nothing.
        writer.write(bytes([0, 0, 1, 0x1, 0x1, 0, 0, 0, 3]) + b"\x82")
        data, seconds = await _read_until_closed(reader, 3.0)
        events = client.receive_data(data) if data else []
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert seconds < 1.5
        assert timeouts == ["request_headers"]
        writer.close()
        server.close()
    asyncio.run(main())


def test_h2_connection_without_a_request_is_closed():
    async def main() -> None:
        timeouts: list[str] = []
        server, port = await _h2_server(timeouts)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_h2_client().data_to_send())  # preface and SETTINGS, no stream
        _, seconds = await _read_until_closed(reader, 3.0)
        assert seconds < 1.5
        assert timeouts == ["request_headers"]
        writer.close()
        server.close()
    asyncio.run(main())


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NOFILE"), reason="no RLIMIT_NOFILE")
def test_open_file_limit_goes_to_nr_open_where_the_process_may():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        result = raise_open_file_limit(None)
        if result.nr_open is not None and not result.note:  # privileged: hard raised too
            assert result.soft == result.hard == result.nr_open
        else:
            assert result.soft == result.hard  # at least the hard limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the tracker gives leases back ---------------------------------------------------------


def test_tracker_releases_a_lease_whichever_way_a_connection_ends():
    from nodeproxy.tcp.relay import Side
    from nodeproxy.tcp.tracker import ConnectionTracker

    async def main() -> None:
        shares = SourceShares(ShareLimits(max_connections=1))
        tracker = ConnectionTracker()
        served: list[Side] = []

        async def serve(side: Side) -> None:
            served.append(side)  # set-up ends without a relay (refused, failed...)

        def gate(side: Side) -> Lease | None:
            lease = shares.admit_connection("p")
            if isinstance(lease, str):
                assert side.transport is not None
                side.transport.abort()
                return None
            return lease

        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: tracker.client_side(serve, gate),
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for _ in range(3):  # one place, three connections in turn: each gives it back
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if served and shares.connections("p") == 0:
                    break
                await asyncio.sleep(0.01)
            assert shares.connections("p") == 0
            served.clear()
            writer.close()
        server.close()
    asyncio.run(main())


def test_pod_share_gauges_show_what_each_pod_holds():
    from prometheus_client import CollectorRegistry, generate_latest

    from nodeproxy.telemetry.share_collector import PodShareCollector

    shares = SourceShares(ShareLimits(max_connections=10, max_requests=10))
    registry = CollectorRegistry()
    registry.register(PodShareCollector(shares))
    held = [shares.admit_connection("ns/a") for _ in range(3)]
    shares.begin_request("ns/a")
    shares.admit_connection("ns/b")
    text = generate_latest(registry).decode()
    assert 'nodeproxy_pod_connections{pod="a",pod_namespace="ns"} 3.0' in text
    assert 'nodeproxy_pod_requests_in_flight{pod="a",pod_namespace="ns"} 1.0' in text
    assert 'nodeproxy_pod_connections{pod="b",pod_namespace="ns"} 1.0' in text
    for lease in held:
        assert isinstance(lease, Lease)
        lease.release()
    shares.end_request("ns/a")
    assert 'pod="a"' not in generate_latest(registry).decode()


def test_idle_relays_are_closed_and_busy_ones_are_not():
    from nodeproxy.tcp.relay import Relay, Side
    from nodeproxy.tcp.tracker import ConnectionTracker

    class _Closing(Relay):  # a relay that notes its close instead of closing transports
        closed: list[bool]

        def close(self) -> None:
            self.closed.append(True)

    async def main() -> None:
        tracker = ConnectionTracker()
        relays = []
        for _ in range(2):
            closed: list[bool] = []
            relay = _Closing(Side("downstream"), Side("upstream"), lambda *_: None,
                             tracker.discard)
            relay.closed = closed
            tracker.add(relay, "p")
            relays.append((relay, closed))
        now = time.monotonic()
        relays[0][0].last_active = now - 10
        relays[1][0].account(relays[1][0].downstream, 5)  # just moved bytes
        assert tracker.close_idle(5.0, time.monotonic()) == 1
        assert relays[0][1] == [True] and relays[1][1] == []
    asyncio.run(main())

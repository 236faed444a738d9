"""Request mirroring: the -shadow authority, the percentage draw, the body tap, and what a
mirrored copy's fate does to the metrics (and nothing else), with a fake upstream."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import (
    Body,
    BodyError,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.config.loader import parse_config
from nodeproxy.config.model import HeaderModifier, HttpHeader, Timeouts
from nodeproxy.http.balancer import RoundRobin
from nodeproxy.http.body_tap import BodyTap
from nodeproxy.http.mirror import Mirrors, chosen, shadow_authority
from nodeproxy.http.pool import Endpoint
from nodeproxy.http.routes import CompiledRule, Mirror, Routes, WeightedBackend
from nodeproxy.mesh.destinations import Backend
from nodeproxy.mesh.upstream import Refused
from nodeproxy.telemetry.request_metrics import RequestMetrics
from tests.unit.test_config import HEAD
from tests.unit.tiny_chunks import feed_in_tiny_chunks

FQDN = "shadow.default.svc.cluster.local"


@pytest.mark.parametrize("authority,expected", [
    ("web.default.svc.cluster.local", "web.default.svc.cluster.local-shadow"),
    ("web:8080", "web-shadow:8080"),
    ("10.96.0.10", "10.96.0.10-shadow"),
    ("10.96.0.10:80", "10.96.0.10-shadow:80"),
    ("[fd00::10]:80", "[fd00::10]-shadow:80"),
    ("[fd00::10]", "[fd00::10]-shadow"),
    ("", "-shadow"),
])
def test_shadow_authority_puts_the_suffix_on_the_host_before_the_port(authority, expected):
    assert shadow_authority(authority) == expected


def test_each_mirror_draws_its_own_percentage():
    rng = random.Random(7)
    half, always = Mirror("default/a", None, 50.0), Mirror("default/b", None, 100.0)
    n = 10000
    picks = [chosen((half, always), rng) for _ in range(n)]
    assert all(always in p for p in picks)
    hits = sum(half in p for p in picks)
    assert abs(hits - n / 2) < 4 * math.sqrt(n * 0.25), hits


def test_routes_compile_mirrors_in_the_routes_namespace_and_drop_zero_percent():
    text = HEAD + """\
services:
  - {name: web, vips: [10.96.0.10], ports: [{port: 80}], selector: {app: web}}
  - {name: shadow, vips: [10.96.0.11], ports: [{port: 80}, {port: 81}],
     selector: {app: shadow}}
httpRoutes:
  - name: r
    service: web
    rules:
      - mirrors:
          - {backendRef: {name: shadow}, percentage: 25}
          - {backendRef: {name: shadow, port: 81}, percentage: 0}
      - matches: [{path: {value: /plain}}]
"""
    tables = Routes(parse_config(text, "node.yaml").config)
    table = tables.table("default/web", 80)
    mirrored = table.match(RequestHead("GET", "/x", "web"))
    plain = table.match(RequestHead("GET", "/plain", "web"))
    assert mirrored is not None and plain is not None
    assert mirrored.mirrors == (Mirror("default/shadow", None, 25.0),)
    assert plain.mirrors == ()
    # A service without routes: the default rule mirrors nothing.
    assert tables.table("default/shadow", 80).match(RequestHead("GET", "/", "s")).mirrors == ()


# --- the body tap ------------------------------------------------------------------------


async def read_all(body: Any) -> bytes:
    out = b""
    while data := await body.read():
        out += data
    return out


def test_the_tap_copies_a_body_within_the_limit_and_the_primary_reads_it_unchanged():
    async def main() -> None:
        source = Body()
        tap = BodyTap(source, limit=100, content_length=None)
        for part in (b"abc", b"defg"):
            source.feed(part)
        source.end([("x-trailer", "1")])
        assert await read_all(ReplayableBody(tap, 0).reader()) == b"abcdefg"  # type: ignore[arg-type]
        copy = await tap.copy()
        assert isinstance(copy, Body)
        assert await read_all(copy) == b"abcdefg" and copy.trailers == [("x-trailer", "1")]
    asyncio.run(main())


def test_the_tap_gives_up_past_the_limit_without_touching_the_primarys_bytes():
    async def main() -> None:
        source = Body()
        tap = BodyTap(source, limit=10, content_length=None)
        payload = bytes(range(200)) * 10
        for i in range(0, len(payload), 7):
            source.feed(payload[i:i + 7])
        source.end()
        assert await read_all(tap) == payload
        assert await tap.copy() == "body_too_large"
    asyncio.run(main())


def test_a_declared_length_above_the_limit_is_refused_at_once():
    async def main() -> None:
        tap = BodyTap(Body(), limit=10, content_length=11)
        assert await asyncio.wait_for(tap.copy(), 1) == "body_too_large"
    asyncio.run(main())


def test_an_empty_ended_body_is_complete_before_anyone_reads():
    async def main() -> None:
        tap = BodyTap(Body.empty(), limit=0, content_length=None)
        copy = await asyncio.wait_for(tap.copy(), 1)
        assert isinstance(copy, Body) and await read_all(copy) == b""
    asyncio.run(main())


def test_a_body_the_primary_never_finished_is_not_mirrored():
    async def main() -> None:
        source = Body()
        source.feed(b"part")
        tap = BodyTap(source, limit=100, content_length=None)
        assert await tap.read() == b"part"
        tap.primary_done()
        assert await tap.copy() == "body_incomplete"
        broken = Body()
        tap = BodyTap(broken, limit=100, content_length=None)
        broken.fail(ConnectionResetError("client reset"))
        with pytest.raises(BodyError):
            await tap.read()
        assert await tap.copy() == "body_incomplete"
    asyncio.run(main())


def test_a_body_in_tiny_chunks_costs_the_tap_what_it_counts():
    """review8: the tap kept the chunks as read; a client's body in 2-byte chunks (each
    HTTP/1.1 chunk, each HTTP/2 DATA frame, is fed alone) within the 64 KiB limit kept a
    bytes object and a list slot per chunk, ~21 bytes held per byte counted (1.4 MB per
    mirrored request, up to 100 of them per HTTP/2 connection; 1-byte chunks are
    CPython's shared bytes, 8 bytes each).  The copy is one buffer now, and the mirror
    gets the very bytes the primary read."""
    import hashlib

    limit, size = 64 * 1024, 60_000
    payload = bytes(random.Random(8).randrange(256) for _ in range(size))

    async def main() -> tuple[int, bytes, bytes]:
        source = Body()
        tap = BodyTap(source, limit=limit, content_length=None)
        held, primary = await feed_in_tiny_chunks(source, tap.read, payload)
        source.end()
        assert await tap.read() == b""
        copy = await tap.copy()
        assert isinstance(copy, Body)
        return held, primary, hashlib.sha256(await read_all(copy)).digest()

    held, primary, mirrored = asyncio.run(main())
    assert primary == mirrored == hashlib.sha256(payload).digest()
    assert held < 2 * size, held


# --- Mirrors with a fake upstream ----------------------------------------------------------


class FakeConnection:
    """Answers after `delay` with `status`, or raises `error`; records what it got."""

    def __init__(self, status: int = 200, delay: float = 0.0,
                 error: BaseException | None = None):
        self.status, self.delay, self.error = status, delay, error
        self.sent: list[tuple[RequestHead, bytes]] = []
        self.closed = False

    def can_take(self) -> bool:
        return True

    async def send(self, head: RequestHead, body: Any) -> UpstreamResponse:
        self.sent.append((head, await read_all(body)))
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return UpstreamResponse(ResponseHead(self.status), Body.of(b"shadow's answer"))

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, connection: FakeConnection, *, endpoints: int = 1, allowed: bool = True,
                 max_in_flight: int = 1024):
        self.registry = CollectorRegistry()
        backends = [Backend(ipaddress.ip_address(f"10.0.0.{i + 1}"), 8080, None)
                    for i in range(endpoints)]
        self.cluster = SimpleNamespace(entry=SimpleNamespace(fqdn=FQDN),
                                       endpoints=[Endpoint(b) for b in backends],
                                       balancer=RoundRobin(), outlier=None)
        self.connection = connection
        self.ctx = SimpleNamespace(entry=SimpleNamespace(port=80), version=4,
                                   http2_upstream=False)
        self.mirrors = Mirrors(RequestMetrics(self.registry), random.Random(1),
                               cluster=lambda service, port, version: self.cluster
                               if service == "default/shadow" else None,
                               hash_key=lambda cluster, ctx, head: None,
                               authorized=lambda ctx, backend, head: allowed,
                               connect=self._connect, max_in_flight=max_in_flight)

    async def _connect(self, ctx: Any, endpoint: Any, cluster: Any) -> FakeConnection:
        if isinstance(self.connection.error, Refused):
            raise self.connection.error
        return self.connection

    def count(self, result: str, reason: str, service: str = FQDN) -> float:
        return self.registry.get_sample_value(
            "nodeproxy_http_mirrored_requests_total",
            {"destination_service": service, "result": result, "reason": reason}) or 0.0

    async def settle(self) -> None:
        for _ in range(100):
            if not self.mirrors.in_flight:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"mirrors still in flight: {self.mirrors.in_flight}")


def rule(*mirrors: Mirror, timeout: float = 15.0, headers: HeaderModifier | None = None
         ) -> CompiledRule:
    from nodeproxy.config.model import RetryPolicy
    return CompiledRule("default/r", (WeightedBackend("default/web", None, 1),), headers, None,
                        Timeouts(request_seconds=timeout), RetryPolicy(), mirrors)


SHADOW = Mirror("default/shadow", None, 100.0)


def test_a_copy_carries_the_shadow_authority_route_headers_and_the_whole_body():
    async def main() -> None:
        h = Harness(FakeConnection())
        head = RequestHead("POST", "/echo?x=1", "web.default.svc.cluster.local",
                           [("content-length", "5"), ("x-request-id", "abc"),
                            ("expect", "100-continue")])
        body = Body()
        modifier = HeaderModifier(set=[HttpHeader(name="x-route", value="r")])
        tap = h.mirrors.start(h.ctx, head, body, rule(SHADOW, headers=modifier), 1024)
        assert tap is not None
        body.feed(b"hello")
        body.end()
        assert await read_all(tap) == b"hello"
        await h.settle()
        [(sent, data)] = h.connection.sent
        assert sent.authority == "web.default.svc.cluster.local-shadow"
        assert sent.method == "POST" and sent.path == "/echo?x=1" and data == b"hello"
        assert ("x-route", "r") in sent.headers and ("x-request-id", "abc") in sent.headers
        assert sent.header("expect") is None  # the body goes at once
        assert head.authority == "web.default.svc.cluster.local"  # the primary's is untouched
        assert ("x-route", "r") not in head.headers
        assert h.count("sent", "200") == 1
    asyncio.run(main())


@pytest.mark.parametrize("connection,reason", [
    (FakeConnection(error=Refused("refused", "connection refused")), "connect_failure"),
    (FakeConnection(error=UpstreamError("UC", "reset before headers")), "reset"),
    (FakeConnection(delay=5.0), "timeout"),
])
def test_a_failing_shadow_is_counted_with_its_reason(connection, reason):
    async def main() -> None:
        h = Harness(connection)
        h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                        rule(SHADOW, timeout=0.05), 1024)
        await h.settle()
        assert h.count("failed", reason) == 1
        assert h.count("sent", "200") == 0
    asyncio.run(main())


def test_a_shadow_answering_503_still_got_the_request():
    async def main() -> None:
        h = Harness(FakeConnection(status=503))
        h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(), rule(SHADOW), 1024)
        await h.settle()
        assert h.count("sent", "503") == 1
    asyncio.run(main())


def test_copies_past_the_in_flight_cap_are_skipped_not_queued():
    async def main() -> None:
        h = Harness(FakeConnection(delay=10.0), max_in_flight=3)
        for _ in range(5):
            h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                            rule(SHADOW), 1024)
        await asyncio.sleep(0.05)
        assert h.mirrors.in_flight[FQDN] == 3
        assert h.count("skipped", "overloaded") == 2
        h.mirrors.close()
        await asyncio.sleep(0.01)
        assert not h.mirrors.in_flight
    asyncio.run(main())


def test_no_endpoints_denied_and_unknown_port_skip_without_a_tap():
    async def main() -> None:
        empty = Harness(FakeConnection(), endpoints=0)
        assert empty.mirrors.start(empty.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                                   rule(SHADOW), 1024) is None
        assert empty.count("skipped", "no_endpoints") == 1
        denied = Harness(FakeConnection(), allowed=False)
        assert denied.mirrors.start(denied.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                                    rule(SHADOW), 1024) is None
        assert denied.count("skipped", "denied") == 1 and not denied.connection.sent
        other = Harness(FakeConnection())
        assert other.mirrors.start(other.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                                   rule(Mirror("default/gone", 81, 100.0)), 1024) is None
        assert other.count("skipped", "unknown_port", service="default/gone") == 1
    asyncio.run(main())


def test_a_body_over_the_limit_is_skipped_and_the_primary_still_reads_it_all():
    async def main() -> None:
        h = Harness(FakeConnection())
        body = Body()
        tap = h.mirrors.start(h.ctx, RequestHead("PUT", "/", "web"), body, rule(SHADOW), 8)
        assert tap is not None
        body.feed(b"0123456789")
        body.end()
        assert await read_all(tap) == b"0123456789"
        await h.settle()
        assert h.count("skipped", "body_too_large") == 1 and not h.connection.sent
    asyncio.run(main())


def test_copies_avoid_ejected_endpoints_and_skip_on_a_breaker_overflow():
    from nodeproxy.config.model import OutlierDetection
    from nodeproxy.http.circuit_breaker import PENDING, Overflow
    from nodeproxy.http.outlier import OutlierDetector

    async def main() -> None:
        h = Harness(FakeConnection(), endpoints=2)
        detector = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1,
                                                    max_ejection_percent=100,
                                                    allow_last_healthy_ejection=True),
                                   service=FQDN)
        detector.attach(h.cluster.endpoints)
        h.cluster.outlier = detector
        detector.record("10.0.0.1:8080", 503)
        picked: list[str] = []
        connect = h.mirrors._connect

        async def recording(ctx: Any, endpoint: Any, cluster: Any) -> FakeConnection:
            picked.append(endpoint.key)
            return await connect(ctx, endpoint, cluster)

        h.mirrors._connect = recording  # type: ignore[method-assign]
        for _ in range(3):
            h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(),
                            rule(SHADOW), 1024)
            await h.settle()
        assert picked == ["10.0.0.2:8080"] * 3
        detector.record("10.0.0.2:8080", 503)  # all ejected: nothing to copy to
        h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(), rule(SHADOW), 1024)
        assert h.count("skipped", "no_endpoints") == 1
        detector.close()
        h.cluster.outlier = None

        async def overflowing(ctx: Any, endpoint: Any, cluster: Any) -> FakeConnection:
            raise Overflow(PENDING)

        h.mirrors._connect = overflowing  # type: ignore[method-assign]
        h.mirrors.start(h.ctx, RequestHead("GET", "/", "web"), Body.empty(), rule(SHADOW), 1024)
        await h.settle()
        assert h.count("skipped", "overloaded") == 1 and h.count("failed", "error") == 0
    asyncio.run(main())

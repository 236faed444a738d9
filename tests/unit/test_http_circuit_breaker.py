"""Circuit breaking (nodeproxy/http/circuit_breaker.py, resilience.Slots and the pool's
pending queue): limits refuse exactly past the configured count, counts return to zero,
and a pending request gets the connection that frees up (a real HTTP/1.1 server on
127.0.0.1 whose answers the test releases)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from nodeproxy.codec.h1 import H1Server
from nodeproxy.codec.message import Body, ReplayableBody, RequestHead, ResponseHead
from nodeproxy.config.model import ConnectionPool, OutlierDetection, TrafficPolicy
from nodeproxy.http.circuit_breaker import (
    CONNECTIONS,
    PENDING,
    REQUESTS,
    RETRIES,
    CircuitBreaker,
    Overflow,
)
from nodeproxy.http.pool import Endpoint, EndpointPool
from nodeproxy.http.resilience import Resilience, Slots
from nodeproxy.mesh.destinations import Backend


def breaker(**limits: int) -> tuple[CircuitBreaker, list[str]]:
    seen: list[str] = []
    return CircuitBreaker(ConnectionPool.model_validate(limits), on_overflow=seen.append), seen


def test_defaults_are_envoys() -> None:
    cfg = ConnectionPool()
    assert (cfg.max_connections, cfg.max_pending_requests, cfg.max_requests,
            cfg.max_retries) == (1024, 1024, 1024, 3)


def test_requests_past_the_limit_overflow_and_free_slots_return() -> None:
    b, seen = breaker(maxRequests=3)
    for _ in range(3):
        b.begin_request()
    with pytest.raises(Overflow) as info:
        b.begin_request()
    assert info.value.limit == REQUESTS and seen == [REQUESTS]
    b.end_request()
    b.begin_request()
    assert b.requests == 3 and b.overflows[REQUESTS] == 1


def test_retries_past_the_limit_are_refused() -> None:
    b, seen = breaker(maxRetries=2)
    assert b.begin_retry() and b.begin_retry()
    assert not b.begin_retry()
    b.end_retry()
    assert b.begin_retry()
    assert seen == [RETRIES] and b.retries == 2


def test_zero_retries_allows_none() -> None:
    b, _ = breaker(maxRetries=0)
    assert not b.begin_retry()


def test_slots_hold_one_request_slot_per_request_and_release_everything() -> None:
    b, _ = breaker(maxRequests=1, maxRetries=1)
    other, _ = breaker()
    slots = Slots()
    slots.request(b)
    slots.request(b)  # a retry of the same request takes no second slot
    assert b.requests == 1
    assert slots.retry(b) and b.retries == 1
    slots.attempt_done()
    assert b.retries == 0
    slots.request(other)  # a retry that went to another service moves the slot
    assert (b.requests, other.requests) == (0, 1)
    assert slots.retry(other)
    slots.release()
    assert (other.requests, other.retries) == (0, 0)


class Gate:
    """An HTTP/1.1 server on 127.0.0.1 that answers each request when released."""

    def __init__(self) -> None:
        self.waiting: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        async def answer(exchange):  # type: ignore[no-untyped-def]
            release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self.waiting.put(release)
            await release
            await exchange.respond(ResponseHead(200, [("content-length", "2")]), end=False)
            await exchange.send(b"ok")
            await exchange.finish()

        def factory() -> H1Server:
            self.connections += 1
            return H1Server(answer, max_header_bytes=8192, idle_timeout=5)

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def release_one(self) -> None:
        (await asyncio.wait_for(self.waiting.get(), 5)).set_result(None)

    def pool(self, b: CircuitBreaker) -> EndpointPool:
        async def connect(protocol):  # type: ignore[no-untyped-def]
            await asyncio.get_running_loop().create_connection(
                lambda: protocol, "127.0.0.1", self.port)
            return protocol

        return EndpointPool(connect, http2=False, idle_timeout=60, breaker=b)


async def request(pool: EndpointPool) -> int:
    connection = await pool.acquire()
    body = ReplayableBody(Body.of(b""), 0)
    response = await connection.send(RequestHead("GET", "/", "a", []), body.reader())
    while await response.body.read():
        pass
    return response.head.status


def test_pending_requests_wait_for_the_connection_and_overflow_past_the_limit() -> None:
    async def main() -> None:
        gate = Gate()
        await gate.start()
        b, seen = breaker(maxConnections=1, maxPendingRequests=1)
        pool = gate.pool(b)
        first = asyncio.create_task(request(pool))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(request(pool))  # waits: the one connection is busy
        await asyncio.sleep(0.05)
        assert (b.connections, b.pending) == (1, 1)
        with pytest.raises(Overflow) as info:
            await request(pool)  # a second waiter is past maxPendingRequests
        assert info.value.limit == PENDING and seen == [PENDING]
        await gate.release_one()
        assert await asyncio.wait_for(first, 5) == 200
        await gate.release_one()  # the second request went out on the freed connection
        assert await asyncio.wait_for(second, 5) == 200
        assert (gate.connections, b.connections, b.pending) == (1, 1, 0)
        pool.close()
        assert b.connections == 0
        assert gate.server is not None
        gate.server.close()

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        gate = Gate()
        await gate.start()
        b, _ = breaker(maxConnections=1, maxPendingRequests=1)
        pool = gate.pool(b)
        first = asyncio.create_task(request(pool))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(request(pool), 0.05)  # the request timeout
        assert b.pending == 0
        second = asyncio.create_task(request(pool))  # the queue has room again
        await asyncio.sleep(0.05)
        assert b.pending == 1
        await gate.release_one()
        await gate.release_one()
        assert await asyncio.wait_for(first, 5) == 200
        assert await asyncio.wait_for(second, 5) == 200
        pool.close()
        assert gate.server is not None
        gate.server.close()

    asyncio.run(main())


def test_a_pool_without_connections_may_always_open_one() -> None:
    async def main() -> None:
        gate = Gate()
        await gate.start()
        b, seen = breaker(maxConnections=1, maxPendingRequests=0)
        one, two = gate.pool(b), gate.pool(b)
        first = asyncio.create_task(request(one))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(request(two))  # another endpoint: opens past the limit
        await asyncio.sleep(0.05)
        assert b.connections == 2 and seen == [CONNECTIONS]
        with pytest.raises(Overflow):
            await request(one)  # no pending allowed
        await gate.release_one()
        await gate.release_one()
        assert await asyncio.wait_for(first, 5) == 200
        assert await asyncio.wait_for(second, 5) == 200
        one.close()
        two.close()
        assert b.connections == 0
        assert gate.server is not None
        gate.server.close()

    asyncio.run(main())


def test_a_connection_closing_wakes_a_waiter_of_another_pool() -> None:
    async def main() -> None:
        gate = Gate()
        await gate.start()
        b, _ = breaker(maxConnections=2, maxPendingRequests=5)
        one, two = gate.pool(b), gate.pool(b)
        first = asyncio.create_task(request(one))
        await gate.release_one()
        assert await asyncio.wait_for(first, 5) == 200  # pool one: an idle connection
        second = asyncio.create_task(request(two))
        await asyncio.sleep(0.05)
        third = asyncio.create_task(request(two))  # at the limit, pool two busy: waits
        await asyncio.sleep(0.05)
        assert (b.connections, b.pending) == (2, 1)
        one.close()  # room: the waiter of pool two opens a connection
        await gate.release_one()
        await gate.release_one()
        assert await asyncio.wait_for(asyncio.gather(second, third), 5) == [200, 200]
        assert (gate.connections, b.connections, b.pending) == (3, 2, 0)
        two.close()
        assert gate.server is not None
        gate.server.close()

    asyncio.run(main())


def test_breakers_and_detectors_survive_a_reload_unless_their_policy_changes() -> None:
    async def main() -> None:
        detection = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100)
        policy = TrafficPolicy(connection_pool=ConnectionPool(max_requests=2),
                               outlier_detection=detection)
        resilience = Resilience(None)
        resilience.update({"ns/a": policy, "ns/b": TrafficPolicy()})
        breaker = resilience.breaker("ns/a", "a.ns.svc.cluster.local")
        breaker.begin_request()
        endpoints = [Endpoint(Backend(ipaddress.ip_address(f"10.0.0.{i}"), 80, None))
                     for i in (1, 2)]
        detector = resilience.detector(("ns/a", 80, 4), "a", endpoints)
        assert detector is not None
        assert resilience.detector(("ns/b", 80, 4), "b", endpoints) is None
        detector.record("10.0.0.1:80", 500)
        assert [e.key for e in detector.available] == ["10.0.0.2:80"]
        # A reload with new limits and the same detection: the counts and ejections stay.
        resilience.update({"ns/a": policy.model_copy(update={
            "connection_pool": ConnectionPool(max_requests=5)})})
        assert resilience.breaker("ns/a", "a") is breaker
        assert (breaker.requests, breaker.limits.max_requests) == (1, 5)
        same = resilience.detector(("ns/a", 80, 4), "a", endpoints)
        assert same is detector and [e.key for e in same.available] == ["10.0.0.2:80"]
        # Changed detection: a fresh detector, nothing ejected.
        resilience.update({"ns/a": policy.model_copy(update={
            "outlier_detection": detection.model_copy(update={"interval_seconds": 1})})})
        fresh = resilience.detector(("ns/a", 80, 4), "a", endpoints)
        assert fresh is not None and fresh is not detector and len(fresh.available) == 2
        resilience.update({})
        assert not resilience.breakers and not resilience.detectors
        resilience.close()

    asyncio.run(main())


def test_an_http2_request_waits_for_a_stream_to_end() -> None:
    """maxConnections 1 and a server allowing one stream at a time: the second request
    waits as pending and goes out on the same connection when the first stream ends."""
    from nodeproxy.codec.h2 import H2Server

    async def main() -> None:
        gate = Gate()
        opened = 0

        async def answer(exchange):  # type: ignore[no-untyped-def]
            release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await gate.waiting.put(release)
            await release
            await exchange.respond(ResponseHead(200, [("content-length", "2")]), end=False)
            await exchange.send(b"ok")
            await exchange.finish()

        def factory() -> H2Server:
            nonlocal opened
            opened += 1
            return H2Server(answer, max_concurrent_streams=1)

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def connect(protocol):  # type: ignore[no-untyped-def]
            await asyncio.get_running_loop().create_connection(lambda: protocol,
                                                               "127.0.0.1", port)
            await protocol.wait_ready(5)
            return protocol

        b, _ = breaker(maxConnections=1, maxPendingRequests=1)
        pool = EndpointPool(connect, http2=True, idle_timeout=60, breaker=b)
        first = asyncio.create_task(request(pool))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(request(pool))
        await asyncio.sleep(0.05)
        assert (b.connections, b.pending) == (1, 1)
        await gate.release_one()
        assert await asyncio.wait_for(first, 5) == 200
        await gate.release_one()
        assert await asyncio.wait_for(second, 5) == 200
        assert (opened, b.pending) == (1, 0)
        pool.close()
        assert b.connections == 0
        server.close()

    asyncio.run(main())


def test_a_wake_is_not_lost_on_a_cancelled_waiter() -> None:
    """A waiter cancelled before its task left the queue, and one woken and then
    cancelled before it resumed: in both cases the next waiter gets the wake."""
    async def main() -> None:
        b, _ = breaker()
        pool = object()
        gone = asyncio.create_task(b.wait(pool))
        woken_then_gone = asyncio.create_task(b.wait(pool))
        live = asyncio.create_task(b.wait(pool))
        await asyncio.sleep(0)
        gone.cancel()  # its future is cancelled; its entry is still queued
        b.idle(pool)  # must skip it and wake the next
        woken_then_gone.cancel()  # woken, cancelled before it resumed: passes the wake on
        await asyncio.wait_for(live, 1)
        assert gone.cancelled() and woken_then_gone.cancelled()

    asyncio.run(main())


class Stub:
    """A pooled connection's state as the pool reads it."""

    def __init__(self, *, closed: bool = False, busy: bool = False):
        self.closed, self.busy = closed, busy

    def can_take(self) -> bool:
        return not self.closed and not self.busy


def test_a_pool_takes_its_first_free_connection_and_drops_the_closed_ones_it_meets() -> None:
    async def never(_protocol):  # type: ignore[no-untyped-def]
        raise AssertionError("no connection is opened here")

    pool = EndpointPool(never, http2=False, idle_timeout=60)
    gone, busy, free, later_free = (Stub(closed=True), Stub(busy=True), Stub(), Stub())
    pool._connections = [gone, busy, free, later_free]  # type: ignore[list-item]
    pool._idle_since = {id(free): 1.0, id(later_free): 2.0}
    assert pool._take() is free
    assert pool._connections == [busy, free, later_free]
    assert pool._idle_since == {id(later_free): 2.0}  # taken: no longer idle
    # Nothing free: every closed connection is dropped, so what the circuit breaker is
    # asked about (the pool's size) counts only live ones.
    free.busy = later_free.busy = True
    later_free.closed = True
    assert pool._take() is None
    assert pool._connections == [busy, free]

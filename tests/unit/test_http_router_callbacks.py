"""The router's callback path (``Router.start``, issue 18 ninth round) against its task path
(``Router.forward``): the same scripted upstream, real HTTP/1.1 connections on loopback,
real retry budgets, circuit breakers and endpoint statistics.  Every script, hostile
upstream answers included, must end the same way on both paths: the client's status and
bytes, reset or not, the outcome (attempts, flags, status, bytes), the counters, and
what the upstream was sent."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.h1 import H1Client
from nodeproxy.codec.message import Body, RequestHead, ResponseHead
from nodeproxy.config import model
from nodeproxy.http.balancer import RoundRobin
from nodeproxy.http.circuit_breaker import CircuitBreaker
from nodeproxy.http.clusters import Cluster
from nodeproxy.http.context import Outcome
from nodeproxy.http.mirror import Mirrors
from nodeproxy.http.pool import Endpoint
from nodeproxy.http.retry import RetryBudget
from nodeproxy.http.router import Router
from nodeproxy.http.routes import CompiledRule, WeightedBackend
from nodeproxy.mesh.destinations import Backend
from nodeproxy.telemetry.request_metrics import RequestMetrics


def ok(body: bytes = b"hello", status: int = 200) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nx-up: 1\r\n\r\n%s" % (
        status, len(body), body)


HANG = b"<hang>"
CLOSE = b"<close>"
SLOW_BODY = b"<slow body>"  # the head, then the body in a later read

SCRIPTS: dict[str, list[bytes]] = {
    "200": [ok()],
    "204": [b"HTTP/1.1 204 No Content\r\nx-up: 1\r\n\r\n"],
    "grpc-status in head": [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ngrpc-status: 14\r\n\r\n"],
    "503 then 200": [ok(b"no", 503), ok(b"second")],
    "503 three times": [ok(b"a", 503), ok(b"b", 503), ok(b"c", 503)],
    "chunked with trailers": [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"],
    "body in a later read": [SLOW_BODY],
    "close before answering, then 200": [CLOSE, ok()],
    "CL and TE (smuggling), then 200": [
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", ok()],
    "two Content-Lengths, then 200": [
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc", ok()],
    "unasked 101, then 200": [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
        ok()],
    "header block over limit": [b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n"] * 3,
    "bad chunk after the head": [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\nzz\r\n"],
    "truncated body": [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc" + CLOSE],
    "hang (request timeout)": [HANG],
}


class Upstream:
    """Answers each request on any connection with the next entry of the script."""

    def __init__(self, script: list[bytes]):
        self.script = list(script)
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.script.pop(0) if self.script else ok()
                if answer == HANG:
                    await asyncio.sleep(5)
                    return
                if answer == CLOSE:
                    return
                if answer == SLOW_BODY:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"late")
                elif answer.endswith(CLOSE):
                    writer.write(answer[:-len(CLOSE)])
                    await writer.drain()
                    return
                else:
                    writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Pools:
    """clusters.Clusters' surface the router uses: one pool of real H1Clients."""

    def __init__(self, cluster: Cluster, port: int):
        self.cluster = cluster
        self.port = port
        self.free: list[H1Client] = []

    def get(self, service: str, port: int, version: int) -> Cluster:
        return self.cluster

    def pooled(self, ctx: Any, endpoint: Endpoint, cluster: Cluster) -> H1Client | None:
        while self.free:
            client = self.free.pop()
            if client.can_take():
                return client
        return None

    async def connect(self, ctx: Any, endpoint: Endpoint, cluster: Cluster) -> H1Client:
        client = H1Client(self.free.append, max_header_bytes=8192)
        await asyncio.get_running_loop().create_connection(lambda: client, "127.0.0.1",
                                                           self.port)
        return client


class Exchange:
    """The client's side (H1Exchange's surface): records what the proxy answered."""

    def __init__(self) -> None:
        self.request = RequestHead("GET", "/p", "web", [("x-a", "1")])
        self.body = Body.empty()
        self.responded = False
        self.finished = False
        self.client_gone = False
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.data = b""
        self.trailers: Any = None
        self.was_reset = False
        self.on_lost: Any = None

    def respond_whole(self, head: ResponseHead, data: bytes) -> bool:
        self.responded = self.finished = True
        self.status, self.headers, self.data = head.status, head.headers, data
        return True

    async def respond(self, head: ResponseHead, end: bool = False) -> None:
        self.responded = True
        self.status, self.headers = head.status, head.headers
        self.finished = end

    async def send(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    async def finish(self, trailers: Any = None) -> None:
        self.finished = True
        self.trailers = trailers

    def reset(self) -> None:
        self.was_reset = True


class Context:
    class entry:  # noqa: N801 - the shape of a ServicePortEntry the router reads
        port = 80
        fqdn = "web.default.svc.cluster.local"
    version = 4
    http2_upstream = False


async def run_path(callbacks: bool, script: list[bytes], *, timeout: float = 0.3,
                   policy_on: tuple[str, ...] = ("5xx", "reset")) -> dict[str, Any]:
    upstream = Upstream(script)
    port = await upstream.start()
    metrics = RequestMetrics(CollectorRegistry())
    backend = Backend(ipaddress.ip_address("127.0.0.1"), port, None)
    cluster = Cluster(
        entry=Context.entry, endpoints=[Endpoint(backend)],  # type: ignore[arg-type]
        balancer=RoundRobin(), budget=RetryBudget(model.RetryBudgetSettings()),
        hash_header=None, hash_source=False,
        breaker=CircuitBreaker(model.ConnectionPool()), outlier=None)
    pools = Pools(cluster, port)
    rng = random.Random(3)
    mirrors = Mirrors(metrics, rng, cluster=pools.get, hash_key=lambda *_: None,
                      authorized=lambda *_: True, connect=pools.connect)  # type: ignore
    router = Router(clusters=pools, authorizer=_Allow(), mirrors=mirrors,  # type: ignore
                    metrics=metrics, rng=rng)
    policy = model.RetryPolicy(retry_on=list(policy_on), attempts=2,
                               backoff=model.RetryBackoff(base_seconds=0.001,
                                                          max_seconds=0.002))
    rule = CompiledRule("", (WeightedBackend("default/web", None, 1),), None, None,
                        model.Timeouts(request_seconds=timeout), policy)
    # One idle connection in the pool, so the callback path can start.
    pools.free.append(await pools.connect(Context, cluster.endpoints[0], cluster))
    exchange, outcome = Exchange(), Outcome()
    if callbacks:
        ended = asyncio.get_running_loop().create_future()

        def done(rest: Any) -> None:
            ended.set_result(rest)
        router.start(Context, exchange, rule, outcome, done)  # type: ignore[arg-type]
        rest = await asyncio.wait_for(ended, 5)
        if rest is not None:
            await rest
    else:
        await router.forward(Context, exchange, rule, outcome)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    stats = cluster.endpoints[0].stats
    result = {
        "status": exchange.status, "data": exchange.data, "reset": exchange.was_reset,
        "finished": exchange.finished, "trailers": exchange.trailers,
        "headers": exchange.headers,
        "attempts": outcome.attempts, "flags": outcome.flags,
        "outcome status": outcome.status, "bytes": outcome.bytes_sent,
        "grpc": outcome.grpc_status,
        "stats": (stats.requests, stats.failures, stats.active),
        "breaker": (cluster.breaker.requests, cluster.breaker.retries),
        "budget": (cluster.budget.requests_in_window, cluster.budget.retries_in_window),
        "sent": [r.split(b"\r\n")[0] for r in upstream.requests],
        "attempt counts": [b"x-envoy-attempt-count" in r for r in upstream.requests],
        "on_lost left": exchange.on_lost is not None,
    }
    for client in pools.free:
        client.close()
    assert upstream.server is not None
    upstream.server.close()
    return result


class _Allow:
    def allows(self, ctx: Any, backend: Any, head: Any) -> bool:
        return True


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_the_callback_path_ends_every_script_as_the_task_path_does(name: str):
    async def main() -> None:
        task = await run_path(False, SCRIPTS[name])
        callbacks = await run_path(True, SCRIPTS[name])
        assert callbacks == task
        assert not callbacks["on_lost left"]
        assert callbacks["breaker"] == (0, 0)  # every slot given back
        assert callbacks["stats"][2] == 0  # nothing left active
    asyncio.run(main())


def test_the_expected_outcomes_of_a_few_scripts():
    """The equivalence above is not vacuous: what the scripts are meant to produce."""
    async def main() -> None:
        r = await run_path(True, SCRIPTS["200"])
        assert (r["status"], r["data"], r["flags"], r["attempts"]) == (200, b"hello", [], 1)
        r = await run_path(True, SCRIPTS["503 then 200"])
        assert (r["status"], r["data"], r["attempts"]) == (200, b"second", 2)
        assert r["attempt counts"] == [False, True]
        r = await run_path(True, SCRIPTS["CL and TE (smuggling), then 200"])
        assert (r["status"], r["data"], r["attempts"]) == (200, b"hello", 2)
        r = await run_path(True, SCRIPTS["header block over limit"])
        assert r["status"] == 503 and "UC" in r["flags"] and r["data"] != b""
        r = await run_path(True, SCRIPTS["truncated body"])
        assert r["reset"] and "UC" in r["flags"]
        r = await run_path(True, SCRIPTS["hang (request timeout)"])
        assert r["status"] == 504 and r["flags"] == ["UT"]
        r = await run_path(True, SCRIPTS["grpc-status in head"])
        assert r["grpc"] == "14"
    asyncio.run(main())

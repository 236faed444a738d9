"""nodeproxy.admin.server.FaceCollector: what the daemon's own HTTP faces refused, by
reason, equals what a client did to them, and the connections open are counted."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from nodeproxy.admin.http_server import MAX_PER_SOURCE, HttpServer, PathTable, Request, Response
from nodeproxy.admin.server import FaceCollector


async def ok(_request: Request) -> Response:
    return Response.text("ok")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_refusals_by_reason_and_open_connections_are_exported() -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        routes = PathTable()
        routes.add_get("/healthz/ready", ok)
        server = HttpServer(routes, "readiness")
        servers = [server]
        registry.register(FaceCollector(servers))
        await server.start_tcp("127.0.0.1", 0)
        try:
            # three garbage requests: three 400 refusals
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"\x16\x03\x01garbage\r\n\r\n")
                assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
                writer.close()
            # one address holding every connection it may, then five more tries
            held = [await asyncio.open_connection("127.0.0.1", server.port)
                    for _ in range(MAX_PER_SOURCE)]
            extra = [await asyncio.open_connection("127.0.0.1", server.port)
                     for _ in range(5)]
            for reader, _ in extra:  # each is closed by the server without an answer
                assert await asyncio.wait_for(reader.read(), 5) == b""
            await asyncio.sleep(0.1)
            assert sample(registry, "nodeproxy_admin_connections", face="readiness") \
                == MAX_PER_SOURCE
            assert sample(registry, "nodeproxy_admin_refusals_total", face="readiness",
                          reason="refused_400") == 3
            assert sample(registry, "nodeproxy_admin_refusals_total", face="readiness",
                          reason="per_source") == 5
            assert sample(registry, "nodeproxy_admin_refusals_total", face="readiness",
                          reason="full") is None
            for _, writer in held + extra:
                writer.close()
            for _ in range(50):
                await asyncio.sleep(0.05)
                if not server.connections:
                    break
            assert sample(registry, "nodeproxy_admin_connections", face="readiness") == 0
            # a well-formed request is not a refusal
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            await server.stop()

    asyncio.run(main())
    text = generate_latest(registry).decode()
    assert 'nodeproxy_admin_refusals_total{face="readiness",reason="refused_400"} 3.0' in text
    assert "# TYPE nodeproxy_admin_refusals_total counter" in text


def pipelined(port: int, count: int) -> tuple[list[int], float]:
    """``count`` pipelined GETs on one connection: the statuses, and the seconds taken."""
    async def main() -> tuple[list[int], float]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = loop.time()
        writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        data = b""
        while data.count(b"HTTP/1.1 ") < count:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        writer.close()
        statuses = [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]
        return statuses, loop.time() - start
    return asyncio.run(main())


def throttled_server(node_sources: frozenset[str], rate: float = 50.0,
                     ) -> tuple[HttpServer, CollectorRegistry]:
    routes = PathTable()
    routes.add_get("/healthz/ready", ok)
    server = HttpServer(routes, "readiness", throttle=True, rate=rate, burst=5,
                        node_sources=node_sources)
    registry = CollectorRegistry()
    registry.register(FaceCollector([server]))
    return server, registry


def serve_in_thread(server: HttpServer, test: Any) -> Any:
    result: list[Any] = []

    async def main() -> None:
        await server.start_tcp("127.0.0.1", 0)
        try:
            result.append(await asyncio.to_thread(test, server.port))
        finally:
            await server.stop()
    asyncio.run(main())
    return result[0]


def test_a_pod_over_its_rate_waits_for_its_answers_and_every_wait_is_counted() -> None:
    # 5 a second: the burst's five answers may take up to 200 ms on a loaded machine
    # before a token comes back, so every later answer waits and is counted (at 50 a
    # second, 20 ms of a cold first request was enough to spare one wait)
    server, registry = throttled_server(frozenset(), rate=5.0)  # 127.0.0.1 is a pod here
    statuses, seconds = serve_in_thread(server, lambda port: pipelined(port, 12))
    assert statuses == [200] * 12  # nothing refused: answers wait
    assert seconds >= (12 - 5) / 5 * 0.9  # the burst at once, then 5 a second
    assert sample(registry, "nodeproxy_admin_refusals_total", face="readiness",
                  reason="throttled") == 7


def test_the_node_itself_is_never_throttled() -> None:
    server, registry = throttled_server(frozenset({"127.0.0.1"}))
    statuses, _ = serve_in_thread(server, lambda port: pipelined(port, 60))
    assert statuses == [200] * 60
    assert sample(registry, "nodeproxy_admin_refusals_total", face="readiness",
                  reason="throttled") is None

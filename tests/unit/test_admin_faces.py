"""nodeproxy.admin.server.FaceCollector: what the daemon's own HTTP faces refused, by
reason, equals what a client did to them, and the connections open are counted."""

from __future__ import annotations

import asyncio

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

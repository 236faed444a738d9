"""Upgrades: which the proxy lets through (nodeproxy.codec.upgrade), how the HTTP/1.1 codec
holds a client's bytes after an upgrade request, and how the upstream side takes a 101.
Codec tests run over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from nodeproxy.codec.h1 import MAX_UPGRADE_EARLY_BYTES, H1Client, H1Exchange, H1Server
from nodeproxy.codec.message import Body, RequestHead, ResponseHead, UpstreamError
from nodeproxy.codec.upgrade import (
    CONNECT,
    EMPTY,
    EXTENDED_CONNECT,
    H2C_STRIPPED,
    NOT_ALLOWED,
    SEVERAL_TOKENS,
    UpgradeDecision,
    Verdict,
    completes,
    connect_refusal,
    decide_upgrade,
)
from nodeproxy.config.model import HttpSettings

ALLOWED = ["websocket"]


@pytest.mark.parametrize("offer,expected", [
    ("websocket", UpgradeDecision(Verdict.UPGRADE, token="websocket")),
    ("WebSocket", UpgradeDecision(Verdict.UPGRADE, token="WebSocket")),
    (" websocket ", UpgradeDecision(Verdict.UPGRADE, token="websocket")),
    ("h2c", UpgradeDecision(Verdict.PLAIN, reason=H2C_STRIPPED)),
    ("H2C", UpgradeDecision(Verdict.PLAIN, reason=H2C_STRIPPED)),
    ("h2c, h2c", UpgradeDecision(Verdict.PLAIN, reason=H2C_STRIPPED)),
    ("websocket, h2c", UpgradeDecision(Verdict.REFUSE, reason=SEVERAL_TOKENS)),
    ("websocket, websocket", UpgradeDecision(Verdict.REFUSE, reason=SEVERAL_TOKENS)),
    ("x-tunnel", UpgradeDecision(Verdict.REFUSE, reason=NOT_ALLOWED)),
    ("websocket/13", UpgradeDecision(Verdict.REFUSE, reason=NOT_ALLOWED)),
    ("TLS/1.2", UpgradeDecision(Verdict.REFUSE, reason=NOT_ALLOWED)),
    ("", UpgradeDecision(Verdict.REFUSE, reason=EMPTY)),
    (" , ", UpgradeDecision(Verdict.REFUSE, reason=EMPTY)),
    (None, UpgradeDecision(Verdict.REFUSE, reason=EMPTY)),
])
def test_which_upgrades_pass(offer: str | None, expected: UpgradeDecision):
    assert decide_upgrade(offer, ALLOWED) == expected


def test_configured_tokens_pass_and_h2c_never_does():
    assert decide_upgrade("foo/2", ["websocket", "FOO/2"]).verdict is Verdict.UPGRADE
    assert decide_upgrade("websocket", []).verdict is Verdict.REFUSE
    assert decide_upgrade("h2c", ["h2c"]).verdict is Verdict.PLAIN  # even if listed


@pytest.mark.parametrize("offered,answered,ok", [
    ("websocket", "websocket", True),
    ("websocket", "WebSocket", True),
    ("WebSocket", " websocket", True),
    ("websocket", "h2c", False),
    ("websocket", "websocket, h2c", False),
    ("websocket", "", False),
    ("websocket", None, False),
])
def test_a_101_completes_only_the_offer(offered: str, answered: str | None, ok: bool):
    assert completes(offered, answered) is ok


def test_connect_refusal_reasons():
    assert connect_refusal("", "2") == CONNECT
    assert connect_refusal("/chat", "2") == EXTENDED_CONNECT
    assert connect_refusal("a:443", "1.1") == CONNECT


def test_allowed_upgrades_setting():
    assert HttpSettings().allowed_upgrades == ["websocket"]
    assert HttpSettings.model_validate({"allowedUpgrades": ["websocket", "foo/1"]}) \
        .allowed_upgrades == ["websocket", "foo/1"]
    for bad in (["h2c"], ["H2C"], ["a b"], ["web socket"], [""], ["ws", "WS"]):
        with pytest.raises(ValidationError):
            HttpSettings.model_validate({"allowedUpgrades": bad})


# --- the HTTP/1.1 codec ------------------------------------------------------------------

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
           b"\r\n")
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"


async def serve(handler) -> tuple[asyncio.Server, int, list[str]]:
    seen: list[str] = []

    async def recording(exchange: H1Exchange) -> None:
        seen.append(exchange.request.path)
        await handler(exchange)

    server = await asyncio.get_running_loop().create_server(
        lambda: H1Server(recording, max_header_bytes=8192, idle_timeout=5), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[bytes, bool]:
    """Everything until the peer closes; and whether it reset."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        return data, True
    return data, False


def test_declined_upgrade_closes_and_never_parses_what_followed():
    async def main() -> None:
        async def decline(exchange: H1Exchange) -> None:
            assert exchange.upgrade
            await exchange.respond(ResponseHead(200, [("content-length", "2")]))
            await exchange.send(b"ok")
            await exchange.finish()

        server, port, seen = await serve(decline)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE + SMUGGLED)
        data, _ = await read_all(reader)
        writer.close()
        server.close()
        assert data.count(b"HTTP/1.1 ") == 1 and data.endswith(b"ok")
        assert b"connection: close" in data
        assert seen == ["/ws"]  # the smuggled request was never parsed

    asyncio.run(main())


def test_requests_before_an_upgrade_are_answered_and_kept_alive():
    async def main() -> None:
        async def answer(exchange: H1Exchange) -> None:
            await exchange.respond(ResponseHead(200, [("content-length", "1")]))
            await exchange.send(b"u" if exchange.upgrade else b"p")
            await exchange.finish()

        server, port, seen = await serve(answer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n" + UPGRADE + SMUGGLED)
        data, _ = await read_all(reader)
        writer.close()
        server.close()
        first, second = data.split(b"HTTP/1.1 ")[1:]
        assert b"connection: close" not in first and first.endswith(b"p")
        assert b"connection: close" in second and second.endswith(b"u")
        assert seen == ["/plain", "/ws"]

    asyncio.run(main())


def test_bytes_after_an_upgrade_are_held_for_the_taker():
    async def main() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def take(exchange: H1Exchange) -> None:
            await asyncio.sleep(0.2)  # more bytes arrive meanwhile: held, not parsed
            transport, rest = exchange.take_over()
            got.set_result(rest)
            transport.close()
            exchange.released()

        server, port, seen = await serve(take)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE + b"early-1 " + SMUGGLED)
        await asyncio.sleep(0.05)
        writer.write(b"early-2")
        rest = await asyncio.wait_for(got, 5)
        writer.close()
        server.close()
        assert rest.startswith(b"early-1 " + SMUGGLED)
        assert seen == ["/ws"]

    asyncio.run(main())


def test_too_many_early_bytes_reset_the_connection():
    async def main() -> None:
        async def wait(exchange: H1Exchange) -> None:
            await asyncio.Event().wait()  # an upstream that never answers

        server, port, _ = await serve(wait)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE + b"x" * (MAX_UPGRADE_EARLY_BYTES + 1))
        data, reset = await read_all(reader, timeout=2)
        writer.close()
        server.close()
        assert data == b""
        assert reset

    asyncio.run(main())


@pytest.mark.parametrize("extra,declares", [
    (b"", False), (b"Content-Length: 0\r\n", False), (b"Content-Length: 5\r\n", True),
    (b"Transfer-Encoding: chunked\r\n", True)])
def test_an_upgrade_request_declaring_a_body_is_marked(extra: bytes, declares: bool):
    async def main() -> None:
        marks: list[bool] = []

        async def note(exchange: H1Exchange) -> None:
            marks.append(exchange.declares_body)
            await exchange.respond(ResponseHead(400, []), end=True)

        server, port, _ = await serve(note)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE[:-2] + extra + b"\r\nhello")
        await read_all(reader)
        writer.close()
        server.close()
        assert marks == [declares]

    asyncio.run(main())


async def upstream(answer: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """A raw server: writes `answer` once the request head is in; records what it read."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


async def client_for(port: int) -> H1Client:
    client = H1Client()
    await asyncio.get_running_loop().create_connection(lambda: client, "127.0.0.1", port)
    return client


def test_upstream_101_to_an_offer_hands_over_what_follows():
    async def main() -> None:
        server, port, received = await upstream(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\n"
            b"Connection: upgrade\r\nX-A: 1\r\n\r\nframe-bytes")
        client = await client_for(port)
        response = await client.send(RequestHead("GET", "/ws", "a", []), Body.empty(),
                                     upgrade="websocket")
        await asyncio.sleep(0.1)
        assert response.head.status == 101
        assert response.head.headers == [("x-a", "1")]
        assert client.upgraded_to == "WebSocket"
        transport, rest = client.detach()
        assert rest == b"frame-bytes"
        assert b"upgrade: websocket\r\nconnection: upgrade\r\n" in received[0]
        assert not client.can_take()
        transport.close()
        server.close()

    asyncio.run(main())


def test_upstream_101_without_an_offer_is_a_protocol_error():
    async def main() -> None:
        server, port, received = await upstream(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
        client = await client_for(port)
        with pytest.raises(UpstreamError) as e:
            await client.send(RequestHead("GET", "/x", "a", []), Body.empty())
        assert e.value.flag == "UPE"
        assert client.closed
        assert b"upgrade" not in received[0].lower()  # the plain request offered none
        server.close()

    asyncio.run(main())

"""The HTTP/1.1 codec's callback path (issue 18, ninth round): ``H1Server``'s ``fast`` hook
(an exchange served from callbacks, no worker task), ``H1Client.send_now`` (a response
head handed to a callback once its read is parsed, no future) and ``Deadlines.alarm``.
The hostile inputs here are the ones the task path refuses: the callback path sees only
what the same parser passed, and a hostile upstream's answer reaches it as the same
errors."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server
from nodeproxy.codec.message import RequestHead, ResponseHead, UpstreamError, UpstreamResponse
from nodeproxy.http.deadlines import Deadlines


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# --- H1Client.send_now ----------------------------------------------------------------------


async def upstream(reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                   Awaitable[None]]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def client_to(port: int, on_idle: Callable[[H1Client], None] | None = None,
                    max_header_bytes: int = 8192) -> H1Client:
    loop = asyncio.get_running_loop()
    client = H1Client(on_idle, max_header_bytes=max_header_bytes)
    await loop.create_connection(lambda: client, "127.0.0.1", port)
    return client


class Landing:
    """send_now's callback: what it was told, and how often."""

    def __init__(self) -> None:
        self.calls: list[tuple[UpstreamResponse | None, UpstreamError | None]] = []
        self.event = asyncio.Event()

    def __call__(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        self.calls.append((response, error))
        self.event.set()

    async def wait(self) -> tuple[UpstreamResponse | None, UpstreamError | None]:
        await asyncio.wait_for(self.event.wait(), 5)
        await asyncio.sleep(0.05)  # a second call would come now
        assert len(self.calls) == 1
        return self.calls[0]


GET = RequestHead("GET", "/x", "a", [("x-n", "1")])


@pytest.mark.parametrize("split", [False, True])
def test_send_now_lands_a_whole_response_once_and_gives_the_connection_back(split: bool):
    """A response in one read lands whole (ended body, the bytes sent); one whose body
    comes in a later read lands with the head and the body follows; either way the
    callback is called once and the connection goes idle for the pool."""
    body = bytes(range(256)) * 40

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_head(reader)
        assert request.startswith(b"GET /x HTTP/1.1\r\nhost: a\r\nx-n: 1\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-up: 1\r\n\r\n" % len(body)
        if split:
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(body)
        else:
            writer.write(head + body)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, port = await upstream(reply)
        idle: list[H1Client] = []
        client = await client_to(port, idle.append)
        landing = Landing()
        client.send_now(GET, landing)
        assert not landing.calls  # never from inside send_now
        response, error = await landing.wait()
        assert error is None and response is not None
        assert response.head.status == 200 and ("x-up", "1") in response.head.headers
        if split:
            assert not response.body.ended
        data = b""
        while chunk := await response.body.read():
            data += chunk
        assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
        assert idle == [client] and client.can_take()
        client.close()
        server.close()
    run(main())


@pytest.mark.parametrize("answer,flag", [
    (b"", "UC"),  # the upstream closes without answering
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", "UC"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc", "UC"),
    (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "UC"),
    (b"HTTP/1.1 200 OK\r\nx: a\nb\r\n\r\n", "UC"),
    (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
     "UPE"),  # a 101 nobody asked for
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n", "UC"),  # head over limit
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 9000, "UC"),  # a field that never ends
    (b"HTTP/1.1 2000 OK\r\n\r\n", "UC"),
])
def test_send_now_tells_a_hostile_upstreams_answer_as_the_error_send_raises(
        answer: bytes, flag: str):
    """What makes ``send`` raise reaches send_now's callback as the same error, once,
    with no response; the connection is not given back to the pool."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await upstream(reply)
        idle: list[H1Client] = []
        client = await client_to(port, idle.append)
        landing = Landing()
        client.send_now(GET, landing)
        response, error = await landing.wait()
        assert response is None and error is not None and error.flag == flag
        assert idle == [] and not client.can_take()
        # The task path meets the same answer with the same error.
        server2, port2 = await upstream(reply)
        other = await client_to(port2)
        with pytest.raises(UpstreamError) as raised:
            await asyncio.wait_for(other.send(GET, _ended_reader()), 5)
        assert raised.value.flag == flag
        server.close()
        server2.close()
    run(main())


def test_send_now_a_body_that_breaks_off_after_the_head_fails_the_landed_body():
    """A head then a malformed chunk in the same read: the head lands (as send returns
    it), its body fails (the router's streaming path flags UC and resets)."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, port = await upstream(reply)
        client = await client_to(port)
        landing = Landing()
        client.send_now(GET, landing)
        response, error = await landing.wait()
        assert error is None and response is not None and not response.body.ended
        assert response.body.error is not None
        client.close()
        server.close()
    run(main())


def test_send_now_forgotten_is_never_called_back():
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def main() -> None:
        server, port = await upstream(reply)
        client = await client_to(port)
        landing = Landing()
        client.send_now(GET, landing)
        client.forget()
        await asyncio.sleep(0.3)  # the answer and then the close came and went
        assert landing.calls == []
        server.close()
    run(main())


def _ended_reader():  # type: ignore[no-untyped-def]
    from nodeproxy.codec.message import Body, ReplayableBody
    return ReplayableBody(Body.empty(), 0).reader()


# --- H1Server's fast hook ---------------------------------------------------------------------


async def fast_server(fast: Callable[[H1Exchange], bool],
                      handler: Callable[[H1Exchange], Awaitable[None]]
                      ) -> tuple[asyncio.Server, int, list[H1Server]]:
    loop = asyncio.get_running_loop()
    made: list[H1Server] = []

    def protocol() -> H1Server:
        made.append(H1Server(handler, max_header_bytes=8192, idle_timeout=5, fast=fast))
        return made[-1]

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], made


async def talk(port: int, data: bytes, count: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    while received.count(b"HTTP/1.1 ") < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        received += chunk
    writer.close()
    return received


def test_fast_and_worker_exchanges_interleave_in_order_on_one_connection():
    """Pipelined requests, some served from callbacks (answered later, from a timer, as
    an upstream's callback would) and some declined to the worker: answered in order,
    each exactly once; the worker runs only for the declined ones."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fast_paths: list[str] = []
        worker_paths: list[str] = []

        def fast(exchange: H1Exchange) -> bool:
            if "slow" in exchange.request.path:
                return False
            fast_paths.append(exchange.request.path)
            loop.call_later(0.01, exchange.respond_whole,
                            ResponseHead(200, [("x-path", exchange.request.path)]), b"f")
            return True

        async def handler(exchange: H1Exchange) -> None:
            worker_paths.append(exchange.request.path)
            await asyncio.sleep(0.01)
            exchange.respond_whole(ResponseHead(200, [("x-path", exchange.request.path)]),
                                   b"w")

        server, port, _made = await fast_server(fast, handler)
        paths = ["/f1", "/slow1", "/f2", "/f3", "/slow2", "/f4"]
        data = b"".join(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % p.encode() for p in paths)
        reply = await talk(port, data, len(paths))
        answered = [line[8:].decode() for line in reply.split(b"\r\n")
                    if line.startswith(b"x-path: ")]
        assert answered == paths
        assert sorted(fast_paths + worker_paths) == sorted(paths)
        assert set(worker_paths) >= {"/slow1", "/slow2"}
        server.close()
    run(main())


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n x-folded: yes\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
])
def test_the_fast_hook_never_sees_a_request_the_parser_refuses(data: bytes):
    """Smuggling and malformed heads get their 4xx/5xx from the codec and the connection
    closes; neither the callback path nor the worker is handed anything of them."""
    async def main() -> None:
        seen: list[str] = []

        def fast(exchange: H1Exchange) -> bool:
            seen.append(exchange.request.path)
            return False

        async def handler(exchange: H1Exchange) -> None:
            seen.append("worker " + exchange.request.path)
            exchange.respond_whole(ResponseHead(200, []), b"")

        server, port, _made = await fast_server(fast, handler)
        reply = await talk(port, data, 1)
        assert reply.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), reply
        assert b"smuggled" not in b"".join(s.encode() for s in seen)
        assert seen == [] or "smuggled" not in data.decode("latin-1")
        server.close()
    run(main())


def test_a_client_lost_mid_exchange_calls_on_lost_once_and_not_after_the_end():
    async def main() -> None:
        lost: list[str] = []
        taken: list[H1Exchange] = []

        def fast(exchange: H1Exchange) -> bool:
            exchange.on_lost = lambda: lost.append(exchange.request.path)
            taken.append(exchange)
            if exchange.request.path == "/answered":
                exchange.on_lost = None  # its end takes the hook back, as Router's does
                exchange.respond_whole(ResponseHead(200, []), b"ok")
            return True

        async def handler(exchange: H1Exchange) -> None:
            raise AssertionError("the worker is not used")

        server, port, made = await fast_server(fast, handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /answered HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        writer.write(b"GET /pending HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        for _ in range(100):
            if len(taken) == 2:
                break
            await asyncio.sleep(0.01)
        # A reset, not a half-close (a client that half-closes may still read its answer).
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        for _ in range(100):
            if made[0].lost:
                break
            await asyncio.sleep(0.01)
        assert lost == ["/pending"]
        assert taken[1].client_gone
        server.close()
    run(main())


# --- Deadlines.alarm -----------------------------------------------------------------------


def test_alarms_ring_on_time_unless_cancelled_beside_blocks_of_the_same_length():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines()
        rung: list[tuple[str, float]] = []
        start = loop.time()
        kept = deadlines.alarm(0.1, lambda: rung.append(("kept", loop.time() - start)))
        dropped = deadlines.alarm(0.1, lambda: rung.append(("dropped", 0.0)))
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.1):
                dropped.cancel()
                await asyncio.sleep(1)
        late = deadlines.alarm(0.1, lambda: rung.append(("late", loop.time() - start)))
        await asyncio.sleep(0.25)
        late.cancel()  # after it rang: nothing
        kept.cancel()
        assert [name for name, _ in rung] == ["kept", "late"]
        assert 0.09 <= rung[0][1] < 0.2 and 0.19 <= rung[1][1] < 0.35
        queue = deadlines._queues[0.1]
        assert queue.live == 0 and not queue.entries

        def broken() -> None:
            raise RuntimeError("a callback that fails")

        deadlines.alarm(0.01, broken)
        after = deadlines.alarm(0.01, lambda: rung.append(("after", 0.0)))
        await asyncio.sleep(0.05)
        assert rung[-1][0] == "after" and after.state != 0
    run(main())

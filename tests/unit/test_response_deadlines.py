"""The CONNECT response deadlines (tunnel/response_deadlines.py) and the pool's use of
them (HbonePool.open): a destination that never answers fails the open with the
"timeout" result, no sooner than the timeout and at most a tick later; one that answers
in time is forgotten; one timer serves every wait and stops when none is left."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import h2.config
import h2.connection
import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.config.model import TunnelSettings
from nodeproxy.tunnel.client import HbonePool, PoolKey, TunnelError
from nodeproxy.tunnel.metrics import TunnelMetrics
from nodeproxy.tunnel.response_deadlines import ResponseDeadlines
from nodeproxy.tunnel.session import H2Session
from tests.unit.test_tunnel_framing import on_uvloop

EPSILON = 1e-9  # floating-point rounding of loop.time() differences


@on_uvloop
async def test_a_due_response_fails_with_timeouterror_and_others_wait() -> None:
    loop = asyncio.get_running_loop()
    deadlines = ResponseDeadlines(0.3, tick=0.05)
    early, late, answered = loop.create_future(), loop.create_future(), loop.create_future()
    start = loop.time()
    deadlines.watch(early)
    deadlines.watch(answered)
    await asyncio.sleep(0.15)
    deadlines.watch(late)
    answered.set_result({":status": "200"})
    deadlines.done(answered)
    with pytest.raises(TimeoutError):
        await early
    waited = loop.time() - start
    # now >= start + 0.3 (the rule) does not make now - start >= 0.3 in floating point:
    # a CI run read 0.2999999999992724.  EPSILON is that rounding, not a tolerance.
    assert 0.3 - EPSILON <= waited <= 0.3 + 0.05 + 0.1, waited
    assert not late.done() and len(deadlines) == 1
    with pytest.raises(TimeoutError):
        await late
    assert loop.time() - start >= 0.45 - EPSILON
    assert answered.result() == {":status": "200"}
    await asyncio.sleep(0.1)
    assert len(deadlines) == 0 and deadlines._timer is None  # no timer left running


@on_uvloop
async def test_a_future_done_or_cancelled_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    deadlines = ResponseDeadlines(0.05, tick=0.02)
    cancelled, failed = loop.create_future(), loop.create_future()
    deadlines.watch(cancelled)
    deadlines.watch(failed)
    cancelled.cancel()
    failed.set_exception(ConnectionResetError("stream ended"))
    await asyncio.sleep(0.15)
    assert cancelled.cancelled()
    assert isinstance(failed.exception(), ConnectionResetError)
    assert len(deadlines) == 0
    deadlines.close()


class Silent:
    """A destination node that completes the HTTP/2 handshake and answers no CONNECT, or
    answers each after `delay` seconds."""

    def __init__(self, sock: socket.socket, delay: float | None):
        self.sock, self.delay = sock, delay
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn.initiate_connection()
        await loop.sock_sendall(self.sock, self.conn.data_to_send())
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                return
            for event in self.conn.receive_data(data):
                if type(event).__name__ == "RequestReceived" and self.delay is not None:
                    loop.call_later(self.delay, self._answer, event.stream_id)
            await loop.sock_sendall(self.sock, self.conn.data_to_send())

    def _answer(self, stream_id: int) -> None:
        self.conn.send_headers(stream_id, [(":status", "200")])
        self.sock.send(self.conn.data_to_send())


async def _open_with(delay: float | None, timeout: float) -> tuple[str, float]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    peer = Silent(theirs, delay)
    serving = loop.create_task(peer.run())
    session = H2Session(client_side=True)
    await loop.create_connection(lambda: session, sock=ours)
    pool = HbonePool(certificates=None, trust_domain="cluster.local", port=15008,
                     settings=TunnelSettings(handshake_timeout_seconds=timeout),
                     metrics=TunnelMetrics(CollectorRegistry()), connect_timeout=0.0)
    pool._deadlines.tick = 0.05

    # The socketpair session pooled for the key instead of a dialled TLS one (the
    # compiled HbonePool is a native class: its methods cannot be replaced).
    pool._pools[PoolKey("spiffe://cluster.local/ns/shop/sa/web",
                        "spiffe://cluster.local/ns/shop/sa/db", "node-b")] = [session]
    start = loop.time()
    try:
        stream = await pool.open(
            source_namespace="shop", source_sa="web",
            destination="spiffe://cluster.local/ns/shop/sa/db", node="node-b",
            ip=ipaddress.ip_address("10.0.0.7"), port=5432,
            source_ip=ipaddress.ip_address("10.0.0.9"))
        result = "ok" if not stream.is_closing() else "closing"
    except TunnelError as e:
        result = e.result
    took = loop.time() - start
    assert len(pool._deadlines) == 0
    pool.close()
    session.abort()
    theirs.close()
    serving.cancel()
    await asyncio.sleep(0)
    return result, took


@on_uvloop
async def test_a_destination_that_never_answers_times_the_open_out() -> None:
    result, took = await _open_with(None, 0.4)
    assert result == "timeout"
    assert 0.4 <= took <= 0.4 + 0.05 + 0.2, took


@on_uvloop
async def test_a_destination_that_answers_in_time_opens_the_stream() -> None:
    result, took = await _open_with(0.1, 0.6)
    assert result == "ok"
    assert took < 0.6

"""A hostile pod against a quiet relayed flow that sleeps (tcp/relay_sleep.py), at the
moments the first tests did not reach: a reset that lands after the sleep decision and
before uvloop read it, the idle timeout or drain landing while a wake is still making
the transports, urgent (MSG_OOB) data, and a FIN racing the sleep.

Each asserts what the two ends notice (bytes intact, a FIN or a reset) and that the
asleep gauge and the relay's nap end where they should.  The bugs they would catch: a
sleep that closes a transport with an unread reset or FIN and never hears of it again
(edge-triggered or wrong epoll events), a close during a wake that drops the bytes the
wake read or ends the relay twice, an urgent byte that ends the flow, or that wakes it
over and over (EPOLLPRI watched), a wake that needs a descriptor (fails at the limit)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.tcp import relay_sleep
from nodeproxy.tcp.dormancy import Dormancy
from nodeproxy.tcp.relay_sleep import RelayNaps, RelaySleepMetrics
from tests.unit.test_relay_sleep import Flow, read_exactly, until


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 0.05)


def _naps() -> tuple[RelayNaps, CollectorRegistry]:
    registry = CollectorRegistry()
    return RelayNaps(Dormancy(), RelaySleepMetrics(registry)), registry


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
        out += chunk
    return out


@pytest.mark.parametrize("how", ["reset", "fin"])
def test_a_reset_or_fin_unread_when_the_flow_falls_asleep_still_reaches_the_other_end(
        monkeypatch: pytest.MonkeyPatch, how: str):
    """The client's RST (or FIN) is in the kernel before the relay decides to sleep, and
    uvloop has not read it: the sleep closes the transports over it; the epoll must
    still report it, so the server gets a reset (or a FIN) and the relay ends."""
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 3600.0)  # it sleeps when told to

    async def main() -> None:
        naps, _ = _naps()
        flow = Flow()
        relay = await flow.start(naps)
        await asyncio.sleep(0.05)
        if how == "reset":
            _reset(flow.client)
        else:
            flow.client.shutdown(socket.SHUT_WR)
        # no await: the loop has not polled since
        assert relay.nap is not None and relay.nap.sleep() is True
        assert naps.asleep == 1
        loop = asyncio.get_running_loop()
        if how == "reset":
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(flow.server, 10), 5)
            await until(lambda: flow.ended)
        else:
            assert await asyncio.wait_for(loop.sock_recv(flow.server, 10), 5) == b""
            await loop.sock_sendall(flow.server, b"after the fin")  # the other way lives
            assert await read_exactly(flow.client, 13) == b"after the fin"
            flow.server.close()
            await until(lambda: flow.ended)
            flow.client.close()
        assert naps.asleep == 0 and relay.nap is None
        flow.server.close()
    uvloop.run(main())


@pytest.mark.parametrize("how_reset", [False, True], ids=["idle-timeout", "drain"])
def test_the_idle_timeout_or_drain_during_a_wake_loses_no_byte_the_wake_read(
        quick: None, how_reset: bool):
    """Bytes wake the flow; before its new transports exist the idle timeout closes it
    (a FIN each way after what was read), or drain aborts it (a reset each way)."""
    async def main() -> None:
        naps, _ = _naps()
        flow = Flow()
        relay = await flow.start(naps)
        await until(lambda: naps.asleep == 1)
        payload = b"w" * 50_000
        flow.client.sendall(payload)
        assert relay.nap is naps and relay.sleep_row >= 0  # a row of the table
        naps.wake(relay)  # as the epoll would, then at once:
        if how_reset:
            relay.abort()
        else:
            relay.close()
        loop = asyncio.get_running_loop()
        if how_reset:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(_recv_all(flow.server), 5)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(flow.client, 10), 5)
        else:
            assert await _recv_all(flow.server) == payload
            assert await asyncio.wait_for(loop.sock_recv(flow.client, 10), 5) == b""
            assert flow.counted == [len(payload), 0]
        await until(lambda: flow.ended)
        assert naps.asleep == 0 and relay.finished and relay.nap is None
        await asyncio.sleep(0.2)  # the wheel turns: nothing of it comes back
        assert naps.asleep == 0
        for sock in (flow.client, flow.server):
            sock.close()
    uvloop.run(main())


def test_urgent_data_neither_ends_a_sleeping_flow_nor_keeps_waking_it(quick: None):
    """MSG_OOB from the pod: the in-band bytes before the urgent byte arrive (as an awake
    relay, which never reads urgent data, passes them), the flow sleeps again and stays
    asleep with the urgent byte unread, and later bytes still arrive intact."""
    async def main() -> None:
        naps, registry = _naps()
        flow = Flow()
        relay = await flow.start(naps)
        await until(lambda: naps.asleep == 1)
        flow.client.send(b"in-band!", socket.MSG_OOB)  # "!" is the urgent byte
        assert await read_exactly(flow.server, 7) == b"in-band"
        await until(lambda: naps.asleep == 1)
        wakes = registry.get_sample_value("nodeproxy_relay_wakes_total")
        await asyncio.sleep(0.5)  # ten quiet waits
        assert registry.get_sample_value("nodeproxy_relay_wakes_total") == wakes
        assert naps.asleep == 1 and not relay.finished
        later = b"later" * 1000
        flow.client.sendall(later)
        assert await read_exactly(flow.server, len(later)) == later
        flow.server.sendall(b"back")
        assert await read_exactly(flow.client, 4) == b"back"
        relay.close()
        assert await _recv_all(flow.server) == b""
        for sock in (flow.client, flow.server):
            sock.close()
    uvloop.run(main())


def test_hundreds_of_flows_wake_at_once_with_no_descriptor_free(quick: None):
    """A wake takes no descriptor (each socket is adopted under its own number), so a
    daemon at its descriptor limit still wakes every sleeping flow it holds, more of
    them at once than one epoll read returns (256), each with its own bytes; none is
    lost and none gets another's.  Asleep again they cannot be (a sleep duplicates a
    descriptor): they stay awake and relay."""
    import resource

    count = 300

    async def main() -> None:
        naps, registry = _naps()
        flows = [Flow() for _ in range(count)]
        for flow in flows:
            await flow.start(naps)
        await until(lambda: naps.asleep == count, 20)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = socket.socket()
        highest = probe.fileno()
        probe.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest, hard))  # none free
        try:
            with pytest.raises(OSError):
                socket.socket()
            for i, flow in enumerate(flows):
                flow.client.send(b"%06d" % i)
            for i, flow in enumerate(flows):
                assert await read_exactly(flow.server, 6) == b"%06d" % i
            assert naps.asleep == 0
            assert registry.get_sample_value("nodeproxy_relay_wakes_total") == count
            await asyncio.sleep(0.3)  # quiet waits pass: a sleep is refused, no harm
            for i, flow in enumerate(flows):
                flow.server.send(b"%06d" % i)
            for i, flow in enumerate(flows):
                assert await read_exactly(flow.client, 6) == b"%06d" % i
            assert not any(flow.ended or flow.relay.finished for flow in flows)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for flow in flows:
            flow.relay.abort()
            flow.client.close()
            flow.server.close()
    uvloop.run(main())

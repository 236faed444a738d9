"""A quiet relayed flow sleeps (tcp/relay_sleep.py): how long it waits first, how a
restless peer makes it wait longer, and on real loopback sockets in uvloop: asleep it
holds no transport, bytes from both ends at once wake it and arrive intact and counted,
an abort resets both ends of an asleep relay, and a half-closed relay never sleeps."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.tcp import relay_sleep
from nodeproxy.tcp.dormancy import CROWDED_PARKED, Dormancy
from nodeproxy.tcp.relay import Relay, Side
from nodeproxy.tcp.relay_sleep import (
    CROWDED_QUIET_SECONDS,
    MAX_RESTLESS,
    QUIET_SECONDS,
    RelayNaps,
    RelaySleepMetrics,
    quiet_wait,
    restless_after_wake,
)


def test_the_quiet_wait_doubles_with_each_early_wake_up_to_the_ceiling():
    assert quiet_wait(0) == QUIET_SECONDS
    assert [quiet_wait(k) for k in range(4)] == [QUIET_SECONDS * 2 ** k for k in range(4)]
    assert quiet_wait(MAX_RESTLESS + 5) == quiet_wait(MAX_RESTLESS)


def test_a_peer_that_wakes_each_sleep_at_once_backs_the_sleeps_off_and_a_long_sleep_forgets():
    restless = 0
    for _ in range(MAX_RESTLESS + 3):  # woken right after falling asleep, every time
        restless = restless_after_wake(restless, 0.01)
    assert restless == MAX_RESTLESS
    # a sleep at least as long as the wait that preceded it paid for itself
    assert restless_after_wake(restless, quiet_wait(restless)) == 0
    assert restless_after_wake(2, quiet_wait(2) - 0.1) == 3


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    peer.setblocking(False)
    return peer, ours


class Flow:
    """client <-> [downstream side | relay | upstream side] <-> server, all loopback."""

    def __init__(self) -> None:
        self.counted = [0, 0]  # bytes from downstream, from upstream
        self.ended = False

    async def start(self, naps: RelayNaps) -> Relay:
        loop = asyncio.get_running_loop()
        self.client, down_sock = await tcp_pair()
        self.server, up_sock = await tcp_pair()
        down, up = Side("downstream"), Side("upstream")
        await loop.connect_accepted_socket(lambda: down, sock=down_sock)
        await loop.connect_accepted_socket(lambda: up, sock=up_sock)
        self.relay = Relay(down, up, self.count, self.end)
        self.relay.start()
        naps.offer(self.relay)
        return self.relay

    def count(self, from_downstream: bool, n: int) -> None:
        self.counted[0 if from_downstream else 1] += n

    def end(self, _relay: Relay) -> None:
        self.ended = True


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        assert chunk, len(out)
        out += chunk
    return out


async def until(predicate, seconds: float = 5.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 0.05)


def test_an_asleep_relay_wakes_on_bytes_from_both_ends_at_once_intact(quick: None):
    async def main() -> None:
        registry = CollectorRegistry()
        naps = RelayNaps(Dormancy(), RelaySleepMetrics(registry))
        flow = Flow()
        relay = await flow.start(naps)
        await until(lambda: naps.asleep == 1)
        assert relay.downstream.transport is None and relay.upstream.transport is None
        up_data, down_data = b"u" * 300_000, b"d" * 200_000
        loop = asyncio.get_running_loop()
        await asyncio.gather(loop.sock_sendall(flow.client, down_data),
                             loop.sock_sendall(flow.server, up_data))
        got = await asyncio.gather(read_exactly(flow.server, len(down_data)),
                                   read_exactly(flow.client, len(up_data)))
        assert got == [down_data, up_data]
        assert flow.counted == [len(down_data), len(up_data)]
        assert naps.asleep == 0
        assert registry.get_sample_value("nodeproxy_relay_wakes_total") == 1
        await until(lambda: naps.asleep == 1)  # quiet again: asleep again
        assert registry.get_sample_value("nodeproxy_relay_sleeps_total") == 2
        relay.close()  # the idle timeout: a FIN to each end, no transport needed
        assert flow.ended and relay.finished and naps.asleep == 0 and relay.nap is None
        for sock in (flow.client, flow.server):
            assert await loop.sock_recv(sock, 10) == b""
            sock.close()
    uvloop.run(main())


def test_an_abort_resets_both_ends_of_an_asleep_relay(quick: None):
    async def main() -> None:
        naps = RelayNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))
        flow = Flow()
        relay = await flow.start(naps)
        await until(lambda: naps.asleep == 1)
        relay.abort()  # drain's deadline, a vanished pod
        assert flow.ended and naps.asleep == 0
        loop = asyncio.get_running_loop()
        for sock in (flow.client, flow.server):
            with pytest.raises(ConnectionResetError):
                await loop.sock_recv(sock, 10)
            sock.close()
    uvloop.run(main())


def test_a_half_closed_relay_never_sleeps(quick: None):
    async def main() -> None:
        naps = RelayNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))
        flow = Flow()
        relay = await flow.start(naps)
        flow.client.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(flow.server, 10) == b""  # the FIN went through
        await asyncio.sleep(2.5)  # two turns of the wheel
        assert naps.asleep == 0 and relay.upstream.transport is not None
        await loop.sock_sendall(flow.server, b"still")
        assert await read_exactly(flow.client, 5) == b"still"
        flow.server.close()
        await until(lambda: flow.ended)
        flow.client.close()
    uvloop.run(main())


def test_a_sleep_that_would_take_a_reserved_descriptor_is_refused_and_the_relay_works(
        quick: None):
    """limits.reservedFiles: the duplicate a sleep makes never takes a reserved number;
    refused, the relay stays awake (looked at again later) and relays as before."""
    from nodeproxy.tcp.descriptors import BUDGET

    async def main() -> None:
        naps = RelayNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))
        flow = Flow()
        relay = await flow.start(naps)
        limit, reserved = BUDGET.limit, BUDGET.reserved
        BUDGET.configure(1 << 20, (1 << 20) - 3)  # every descriptor but 0-2 is reserved
        try:
            await asyncio.sleep(2.5)  # two turns of the wheel
            assert naps.asleep == 0 and relay.nap is not None
            assert relay.downstream.transport is not None
            assert relay.upstream.transport is not None
        finally:
            BUDGET.configure(limit, reserved)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(flow.client, b"ping")
        assert await read_exactly(flow.server, 4) == b"ping"
        await until(lambda: naps.asleep == 1)  # the reserve lifted: it sleeps
        relay.abort()
        for sock in (flow.client, flow.server):
            sock.close()
    uvloop.run(main())


@pytest.mark.parametrize("slept", [False, True], ids=["awake", "after-sleep"])
def test_an_ended_relay_leaves_no_reference_cycle(quick: None, slept: bool):
    """Its relay, sides and transports are freed when the last reference goes, not at
    the cyclic collector's next full pass (thousands of flows ending at once would
    wait for it with megabytes, and make that pass longer)."""
    async def main() -> None:
        naps = RelayNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))
        flow = Flow()
        await flow.start(naps)
        if slept:
            await until(lambda: naps.asleep == 1)
        flow.client.close()
        flow.server.close()
        await until(lambda: flow.ended)
        del flow.relay
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    try:
        uvloop.run(main())
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, (Relay, Side))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []


class _Waiting:
    """A quiet flow of somebody else's in the wheel (never due in the test)."""

    def turned(self) -> None:
        raise AssertionError("not due")


@pytest.mark.parametrize("case", ["crowd", "no crowd", "restless in a crowd"])
def test_in_a_crowd_a_quiet_relay_sleeps_sooner_unless_it_woke_early_before(case: str):
    """With CROWDED_PARKED flows awake and quiet in the wheel (a burst of connections
    opening), a relay sleeps after CROWDED_QUIET_SECONDS of quiet, not QUIET_SECONDS;
    without the crowd it waits the whole QUIET_SECONDS, and a relay that woke early
    before waits its doubled wait even in a crowd.  Read from when the table says it
    fell asleep against its last activity; the relay works after it (bytes intact)."""
    async def main() -> None:
        dormancy = Dormancy()
        naps = RelayNaps(dormancy, RelaySleepMetrics(CollectorRegistry()))
        loop = asyncio.get_running_loop()
        crowd = [_Waiting() for _ in range(CROWDED_PARKED)]
        if case != "no crowd":
            for other in crowd:
                dormancy.park(other, loop.time() + 600)
        flow = Flow()
        relay = await flow.start(naps)
        if case == "restless in a crowd":
            relay.nap._restless = 1
        await until(lambda: naps.asleep == 1, seconds=10)
        row = naps._relay.index(relay)  # its downstream's (duplicated) descriptor
        quiet_for = naps._slept_at[row] - relay.last_active
        if case == "crowd":
            assert CROWDED_QUIET_SECONDS - 0.001 <= quiet_for < QUIET_SECONDS
        elif case == "no crowd":
            assert QUIET_SECONDS - 0.001 <= quiet_for
        else:
            assert quiet_wait(1) - 0.001 <= quiet_for
        data = b"x" * 100_001
        await loop.sock_sendall(flow.client, data)
        assert await read_exactly(flow.server, len(data)) == data
        assert flow.counted == [len(data), 0]
        relay.close()
        for sock in (flow.client, flow.server):
            assert await loop.sock_recv(sock, 10) == b""
            sock.close()
    uvloop.run(main())

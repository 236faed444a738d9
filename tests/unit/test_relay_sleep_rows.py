"""Asleep relays as rows of the naps' table (tcp/relay_sleep.py, `RelayNaps`), against a
hostile pod: descriptor numbers the kernel gives again to new connections after an
asleep relay ended must never find the old row (no bytes to the wrong peer, no relay
woken or reset in another's place), a pod that keeps its flows waking and sleeping does
not make the table grow, and the shared stand-ins of asleep sides cannot be written.

Each asserts what the ends notice: every byte reaches its own peer (a payload per flow,
checked whole), a reset reaches exactly the ends of the relays that were aborted."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeproxy.tcp import relay_sleep
from nodeproxy.tcp.dormancy import Dormancy
from nodeproxy.tcp.relay import Relay
from nodeproxy.tcp.relay_sleep import ASLEEP_SIDES, RelayNaps, RelaySleepMetrics
from tests.unit.test_relay_sleep import Flow, read_exactly, until


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 0.05)


def _naps() -> RelayNaps:
    return RelayNaps(Dormancy(), RelaySleepMetrics(CollectorRegistry()))


def _rows(naps: RelayNaps) -> dict[int, tuple[int, Relay]]:
    """The table read back: downstream fd -> (upstream fd, relay), checked consistent."""
    rows = {}
    for fd, relay in enumerate(naps._relay):
        if relay is not None:
            up = naps._peer[fd]
            assert naps._peer[up] == fd and naps._relay[up] is None
            assert relay.sleep_row == fd and relay.nap is naps
            assert (relay.downstream, relay.upstream) == ASLEEP_SIDES
            rows[fd] = (up, relay)
    held = [fd for fd, peer in enumerate(naps._peer) if peer != -1]
    assert len(held) == 2 * len(rows)  # no half row left behind
    return rows


def _payload(i: int, n: int = 3000) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (n // 32)


def test_descriptor_numbers_given_again_never_reach_an_ended_relays_row(quick: None):
    """Half of the asleep relays are aborted (their numbers free), new flows take those
    numbers and fall asleep in the same rows; then every live flow is woken from both
    ends with a payload of its own: each peer gets exactly its own bytes, the aborted
    ones' ends a reset, and the table holds exactly the asleep relays throughout."""
    async def main() -> None:
        naps = _naps()
        loop = asyncio.get_running_loop()
        first = [Flow() for _ in range(40)]
        for flow in first:
            await flow.start(naps)
        await until(lambda: naps.asleep == len(first), 10)
        assert len(_rows(naps)) == len(first)
        freed = {flow.relay.sleep_row for flow in first[::2]}
        for flow in first[::2]:
            flow.relay.abort()
            assert flow.ended and flow.relay.nap is None and flow.relay.sleep_row == -1
        assert naps.asleep == len(first) // 2 == len(_rows(naps))
        second = [Flow() for _ in range(20)]
        for flow in second:
            await flow.start(naps)
        await until(lambda: naps.asleep == 40, 10)
        rows = _rows(naps)
        reused = freed & set(rows)
        assert reused, "the kernel gave none of the freed numbers again: nothing tested"
        for fd in reused:
            assert rows[fd][1] in {flow.relay for flow in second}
        for flow in first[::2]:
            for sock in (flow.client, flow.server):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
                sock.close()
        live = first[1::2] + second
        for i, flow in enumerate(live):
            flow.client.sendall(_payload(i))
            flow.server.sendall(_payload(1000 + i))
        for i, flow in enumerate(live):
            got_up = await asyncio.wait_for(read_exactly(flow.server, len(_payload(i))), 5)
            got_down = await asyncio.wait_for(
                read_exactly(flow.client, len(_payload(1000 + i))), 5)
            assert got_up == _payload(i) and got_down == _payload(1000 + i)
            assert flow.counted == [len(_payload(i)), len(_payload(1000 + i))]
        assert not any(flow.ended for flow in live)
        for flow in live:
            flow.relay.close()
            flow.client.close()
            flow.server.close()
        await until(lambda: all(flow.ended for flow in live))
        assert naps.asleep == 0 and _rows(naps) == {}
    uvloop.run(main())


def test_a_pod_that_keeps_waking_its_flows_does_not_grow_the_table(quick: None):
    """Sleep and wake the same flows over and over: the table stays as long as the
    highest descriptor number they hold, and rows come back empty each time."""
    async def main() -> None:
        naps = _naps()
        flows = [Flow() for _ in range(10)]
        for flow in flows:
            await flow.start(naps)
        await until(lambda: naps.asleep == len(flows), 10)
        size = len(naps._peer)
        held = [fd for fd, peer in enumerate(naps._peer) if peer != -1]
        assert size == max(held) + 1  # as long as the highest number held, no longer
        for round_ in range(5):
            for flow in flows:
                flow.client.sendall(b"r%d" % round_)
            for flow in flows:
                assert await read_exactly(flow.server, 2) == b"r%d" % round_
            await until(lambda: naps.asleep == len(flows), 10)
            assert len(naps._peer) == size and len(_rows(naps)) == len(flows)
        for flow in flows:
            flow.relay.abort()
            flow.client.close()
            flow.server.close()
        assert naps.asleep == 0 and _rows(naps) == {}
    uvloop.run(main())


def test_readiness_on_a_number_with_no_row_wakes_nobody(quick: None):
    """The epoll reporting a number whose row is gone (woken or ended in the same poll
    batch, or never a relay's) wakes no other relay; an upstream's number wakes its
    own relay."""
    async def main() -> None:
        naps = _naps()
        a, b = Flow(), Flow()
        for flow in (a, b):
            await flow.start(naps)
        await until(lambda: naps.asleep == 2, 10)
        up_of_b = naps._peer[b.relay.sleep_row]
        naps.woken(a.relay.sleep_row + 10_000)  # beyond the table
        unused = next(fd for fd in range(len(naps._peer)) if naps._peer[fd] == -1)
        naps.woken(unused)
        assert naps.asleep == 2
        naps.woken(up_of_b)  # b's upstream socket readable
        assert naps.asleep == 1 and b.relay.nap is not naps and a.relay.nap is naps
        naps.woken(up_of_b)  # again, its row gone: nothing happens
        assert naps.asleep == 1 and a.relay.nap is naps
        b.server.sendall(b"up")
        assert await read_exactly(b.client, 2) == b"up"
        for flow in (a, b):
            flow.relay.abort()
            flow.client.close()
            flow.server.close()
    uvloop.run(main())


def test_a_row_is_never_written_over_another():
    """A number already in a row (a bug elsewhere; never, while rows are cleared before
    their descriptors close) refuses the new row and leaves the old one whole."""
    naps = _naps()

    class _Fake:
        sleep_row = -1
        downstream = upstream = nap = None

    one, two = _Fake(), _Fake()
    assert naps._put(one, 7, 9, 0)  # type: ignore[arg-type]
    assert not naps._put(two, 9, 11, 0)  # type: ignore[arg-type]
    assert not naps._put(two, 12, 7, 0)  # type: ignore[arg-type]
    assert not naps._put(two, 5, 5, 0)  # type: ignore[arg-type]
    assert two.sleep_row == -1 and two.nap is None
    assert naps._relay[7] is one and naps._peer[7] == 9 and naps._peer[9] == 7
    assert naps._peer[11] == -1 and naps._peer[12] == -1 and naps._peer[5] == -1


def test_the_asleep_sides_are_shared_and_read_only():
    down, up = ASLEEP_SIDES
    assert down.transport is None and not down.got_eof and not down.lost and not down.early
    for side in (down, up):
        for name in ("lost", "got_eof", "relay", "transport", "eof_forwarded"):
            with pytest.raises(AttributeError):
                setattr(side, name, True)
    assert not down.lost and down.relay is None

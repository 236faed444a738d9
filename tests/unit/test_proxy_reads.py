"""When the daemon posts its read count of a fast-path connection to the kernel
(capture/msg_redirect.py ProxyReads): while the application's direction takes TCP, the first
read posts at once, later reads within WATCH_INTERVAL only add up and the interval's end
posts their exact total; a direction back on the fast path posts every POST_EVERY bytes.
The kernel's maps are stood in for by a recorder of the two calls the class makes (the real
maps and the kernel's use of the count: tests/integration/test_msg_redirect.py)."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

import pytest

from nodeproxy.capture import msg_redirect
from nodeproxy.capture.msg_redirect import POST_EVERY, WATCH_INTERVAL, ProxyReads, counting_reads


class Maps:
    """np_msg_flows and np_msg_proxy_read of one connection: what was posted, and whether
    the application's sends take TCP."""

    def __init__(self) -> None:
        self.posted: list[int] = []
        self.looks = 0
        self.on_tcp = True
        self.gone = False

    def put(self, key: bytes, value: ctypes.c_uint64) -> None:
        self.posted.append(value.value)

    def read_into(self, key: bytes, flow: ctypes.Structure) -> bool:
        self.looks += 1
        if self.gone:
            return False
        flow.send_on_tcp = int(self.on_tcp)  # type: ignore[attr-defined]
        return True


class Feeder:
    """Reads reach a ProxyReads as `consumed(n)`, or as the relay's byte callback does
    (counting_reads: the relay's every read, the meter's too; __call__ writes consumed
    out): both must post the same.  The callback's meter must see every read, both ways,
    and an upstream read must post nothing."""

    def __init__(self, counter: ProxyReads, via_relay: bool):
        self.counter = counter
        self.metered: list[tuple[bool, int]] = []
        self._callback = counting_reads(lambda d, n: self.metered.append((d, n)), counter) \
            if via_relay else None

    def consumed(self, n: int) -> None:
        if self._callback is None:
            self.counter.consumed(n)
            return
        self._callback(False, 3)   # an upstream read between: metered, never posted
        self._callback(True, n)
        assert self.metered[-2:] == [(False, 3), (True, n)]


@pytest.fixture(params=[False, True], ids=["consumed", "relay_callback"])
def reads(request: pytest.FixtureRequest) -> Callable[[Maps], Feeder]:
    return lambda maps: Feeder(ProxyReads(maps, 7, maps, b"k"),  # type: ignore[arg-type]
                               request.param)


def test_on_tcp_one_post_per_interval_and_the_exact_total_at_its_end(
        reads: Callable[[Maps], Feeder]) -> None:
    async def main() -> None:
        maps = Maps()
        counter = reads(maps)
        for _ in range(500):          # a burst of reads within one interval
            counter.consumed(100)
        assert maps.posted == [100]   # the first read at once, the rest add up
        assert maps.looks == 1
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.posted == [100, 50_000]   # the exact total once the interval ended
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.posted == [100, 50_000]   # nothing new: no more posts, no timer
        counter.consumed(1)                   # a read after a quiet interval: at once
        assert maps.posted == [100, 50_000, 50_001]

    asyncio.run(main())


def test_back_on_the_fast_path_posts_every_post_every_bytes(
        reads: Callable[[Maps], Feeder]) -> None:
    async def main() -> None:
        maps = Maps()
        counter = reads(maps)
        maps.on_tcp = False
        counter.consumed(10)          # the look finds the direction redirected again
        assert maps.posted == [10]
        looks = maps.looks
        chunk = POST_EVERY // 64
        for _ in range(63):
            counter.consumed(chunk)
        assert maps.posted == [10] and maps.looks == looks   # no map access per read
        counter.consumed(chunk)
        assert maps.posted == [10, 10 + 64 * chunk]
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.posted == [10, 10 + 64 * chunk]

    asyncio.run(main())


def test_a_gone_flow_stops_the_posts(
        reads: Callable[[Maps], Feeder]) -> None:
    async def main() -> None:
        maps = Maps()
        counter = reads(maps)
        counter.consumed(5)
        maps.gone = True
        counter.consumed(5)
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.posted == [5]
        looks = maps.looks
        counter.consumed(5)
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.looks == looks and maps.posted == [5]

    asyncio.run(main())


def test_the_interval_is_short() -> None:
    """A direction stuck on TCP waits at most this long for its count to go back."""
    assert msg_redirect.WATCH_INTERVAL <= 0.005


def test_the_relays_byte_callback_is_the_counter_itself_and_counts_only_downstream(
        ) -> None:
    """counting_reads binds the relay's byte callback to the ProxyReads (one object per
    connection): every byte reaches the meter's callback, and only the bytes read from
    the downstream side (the application's) count as read from the proxy's socket."""
    async def main() -> None:
        maps = Maps()
        counter = ProxyReads(maps, 7, maps, b"k")  # type: ignore[arg-type]
        seen: list[tuple[bool, int]] = []
        callback = msg_redirect.counting_reads(lambda d, n: seen.append((d, n)), counter)
        assert callback is counter
        callback(True, 300)
        callback(False, 5000)
        callback(True, 20)
        assert seen == [(True, 300), (False, 5000), (True, 20)]
        assert counter.total == 320
        await asyncio.sleep(WATCH_INTERVAL * 5)
        assert maps.posted[-1] == 320
        assert msg_redirect.counting_reads(print, None) is print
    asyncio.run(main())

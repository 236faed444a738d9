"""The daemon's wheel of quiet flows and its sleeping sockets (tcp/dormancy.py), shared by
spliced and relayed flows."""

from __future__ import annotations

import asyncio

import uvloop

from nodeproxy.tcp.dormancy import (
    CROWDED_PARKED,
    SETTLED_CHURN,
    SETTLED_DELAY,
    SETTLED_PARKED,
    TURN_BATCH,
    WHEEL_TICK,
    Dormancy,
)


class Parked:
    def __init__(self) -> None:
        self.turns: list[float] = []

    def turned(self) -> None:
        self.turns.append(asyncio.get_running_loop().time())


def test_the_wheel_looks_at_a_parked_flow_once_due_and_never_after_unpark():
    """Quiet flows wait in the daemon's wheel (tcp/dormancy.py), not on timers of their
    own: each is looked at once its slot is due, one that was unparked (woken,
    finished) never is, and the wheel's one timer stops when nothing is parked."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Dormancy()
        due, later, woken = Parked(), Parked(), Parked()
        now = loop.time()
        wheel.park(due, now)
        slot = wheel.park(woken, now)
        wheel.park(later, now + 60)
        wheel.unpark(woken, slot)
        await asyncio.sleep(2.5 * WHEEL_TICK)
        assert len(due.turns) == 1 and due.turns[0] >= now
        assert woken.turns == [] and later.turns == []
        assert wheel._wheel_timer is not None  # `later` is still parked
        wheel.unpark(later, next(iter(wheel._wheel)))
        await asyncio.sleep(1.5 * WHEEL_TICK)
        assert wheel._wheel == {} and wheel._wheel_timer is None
    asyncio.run(main())


def test_many_due_at_once_are_looked_at_a_batch_per_loop_iteration():
    """Thousands of flows due in one slot are looked at TURN_BATCH per loop iteration
    (each may fall asleep, holding a duplicate descriptor until the next iteration):
    all of them within a few iterations, never more than a batch in one."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Dormancy()
        flows = [Parked() for _ in range(5 * TURN_BATCH + 3)]
        now = loop.time()
        for flow in flows:
            wheel.park(flow, now)
        per_iteration: list[int] = []
        seen = 0
        deadline = now + 3 * WHEEL_TICK
        while seen < len(flows):
            assert loop.time() < deadline
            await asyncio.sleep(0)
            turned = sum(len(f.turns) for f in flows)
            if turned > seen:
                per_iteration.append(turned - seen)
            seen = turned
        assert max(per_iteration) <= TURN_BATCH and len(per_iteration) >= 6
        assert all(len(f.turns) == 1 for f in flows)
        assert wheel._wheel == {}
    uvloop.run(main())


def test_sockets_falling_asleep_and_waking_count_as_churn_for_the_memory_trim():
    """Each socket watched or unwatched counts once (a sleep frees transports: the trim
    waits for a burst of sleeps to be over); unwatching one not watched does not."""
    import socket

    async def main() -> None:
        wheel = Dormancy()
        a, b = socket.socketpair()
        try:
            wheel.watch(a.fileno(), Parked())  # type: ignore[arg-type]
            wheel.watch(b.fileno(), Parked())  # type: ignore[arg-type]
            assert wheel.churn == 2
            wheel.unwatch(a.fileno())
            wheel.unwatch(a.fileno())  # not watched any more: no count
            wheel.unwatch(b.fileno())
            assert wheel.churn == 4
        finally:
            a.close()
            b.close()
    uvloop.run(main())


class Sleeps(Parked):
    """A quiet flow that falls asleep when looked at (its socket watched: churn)."""

    def __init__(self, wheel: Dormancy) -> None:
        super().__init__()
        self.wheel = wheel

    def turned(self) -> None:
        super().turned()
        self.wheel.churn += 1


def test_the_wheel_says_a_burst_of_sleeps_is_over_once_it_is_and_only_then():
    """`Dormancy.settled` (the daemon's memory trim) is told once after a burst: when
    the burst's quiet flows have all been looked at and few others wait, SETTLED_DELAY
    after that turn, with the churn then; never while more than SETTLED_PARKED wait,
    never for fewer than SETTLED_CHURN sleeps, and not again for the same ones."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Dormancy()
        told: list[tuple[float, int]] = []
        wheel.settled = lambda churn: told.append((loop.time(), churn))
        now = loop.time()
        burst = [Sleeps(wheel) for _ in range(SETTLED_CHURN + 10)]
        for f in burst:
            wheel.park(f, now)
        waiting = [Parked() for _ in range(SETTLED_PARKED + 1)]
        slots = [wheel.park(f, now + 60) for f in waiting]
        await asyncio.sleep(2.5 * WHEEL_TICK)
        assert all(len(f.turns) == 1 for f in burst)
        assert told == []  # the burst slept, but more than SETTLED_PARKED still wait
        wheel.unpark(waiting[0], slots[0])  # SETTLED_PARKED wait now: few enough
        await asyncio.sleep(1.5 * WHEEL_TICK)
        assert len(told) == 1 and told[0][1] == SETTLED_CHURN + 10
        for f, slot in zip(waiting[1:], slots[1:], strict=True):
            wheel.unpark(f, slot)
        # Too few sleeps since: never told, however quiet the wheel.
        small = [Sleeps(wheel) for _ in range(SETTLED_CHURN - 1)]
        for f in small:
            wheel.park(f, loop.time())
        await asyncio.sleep(2.5 * WHEEL_TICK)
        assert all(len(f.turns) == 1 for f in small) and len(told) == 1
        # One more makes a burst's worth since the last time: told, after the delay.
        last = Sleeps(wheel)
        wheel.park(last, loop.time())
        await asyncio.sleep(2.5 * WHEEL_TICK)
        assert len(told) == 2 and told[1][1] == 2 * SETTLED_CHURN + 10
        assert told[1][0] - last.turns[0] >= SETTLED_DELAY - 0.01
    uvloop.run(main())


def test_the_wheel_counts_its_parked_flows_and_says_when_they_are_a_crowd():
    """`parked` is exactly the flows in the wheel however they leave it (unparked, looked
    at, parked again in the same slot); `crowded` from CROWDED_PARKED of them on."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Dormancy()
        now = loop.time()
        flows = [Parked() for _ in range(CROWDED_PARKED)]
        slots = [wheel.park(flow, now) for flow in flows[:-1]]
        assert wheel.parked == CROWDED_PARKED - 1 and not wheel.crowded
        wheel.park(flows[0], now)  # the same flow in the same slot again: not two
        assert wheel.parked == CROWDED_PARKED - 1 and not wheel.crowded
        last = wheel.park(flows[-1], now + 60)
        assert wheel.parked == CROWDED_PARKED and wheel.crowded
        wheel.unpark(flows[1], slots[1])
        wheel.unpark(flows[1], slots[1])  # not there any more: nothing to count
        wheel.unpark(flows[-1], slots[0])  # not in that slot: nothing to count
        assert wheel.parked == CROWDED_PARKED - 1 and not wheel.crowded
        deadline = now + 20 * WHEEL_TICK
        while any(not f.turns for f in flows[2:-1]) or flows[0].turns == []:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert wheel.parked == 1  # the one due in a minute
        wheel.unpark(flows[-1], last)
        assert wheel.parked == 0 and wheel._wheel == {}
        assert flows[1].turns == [] and flows[-1].turns == []
    uvloop.run(main())

"""Request deadlines (http/deadlines.py) behave as asyncio.timeout does, with one loop
timer per deadline length instead of one per block, and leave nothing behind."""

from __future__ import annotations

import asyncio
import time

import pytest

from nodeproxy.http.deadlines import Deadlines


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(coro)


def test_a_block_past_its_deadline_is_cancelled_and_raises_timeout_error_on_time() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        started = time.monotonic()
        reached_end = False
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.2):
                await asyncio.sleep(5)
                reached_end = True
        elapsed = time.monotonic() - started
        assert not reached_end and 0.19 <= elapsed < 1.0
        # The task is not left cancelled: it goes on awaiting.
        await asyncio.sleep(0.01)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    run(main())


def test_blocks_that_end_in_time_run_to_completion_and_leave_no_entry_or_timer() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        for _ in range(1000):
            async with deadlines.timeout(5):
                await asyncio.sleep(0)
        queue = deadlines._queues[5]
        assert (len(queue.entries), queue.live, queue._timer) == (0, 0, None)
        async with deadlines.timeout(None):  # no deadline at all
            await asyncio.sleep(0.01)
    run(main())


def test_a_long_block_at_the_head_does_not_pin_the_ended_ones_behind_it() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        release = asyncio.Event()

        async def long() -> None:
            async with deadlines.timeout(30):
                await release.wait()
        holder = asyncio.create_task(long())
        await asyncio.sleep(0)
        for _ in range(5000):
            async with deadlines.timeout(30):
                pass
        queue = deadlines._queues[30]
        assert queue.live == 1 and len(queue.entries) <= 130  # compacted, not 5001
        release.set()
        await holder
        assert (len(queue.entries), queue.live, queue._timer) == (0, 0, None)
    run(main())


def test_each_block_gets_its_own_deadline_among_many_of_one_length() -> None:
    """Staggered blocks of one length: each times out at its own deadline, in order, and
    those that finish before theirs are not touched."""
    async def main() -> None:
        deadlines = Deadlines()
        loop = asyncio.get_running_loop()
        outcomes: dict[int, tuple[str, float]] = {}

        async def block(i: int, work: float) -> None:
            begun = loop.time()
            try:
                async with deadlines.timeout(0.3):
                    await asyncio.sleep(work)
                outcomes[i] = ("done", loop.time() - begun)
            except TimeoutError:
                outcomes[i] = ("timeout", loop.time() - begun)

        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(block(i, 1.0 if i % 2 else 0.05)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        for i, (result, took) in outcomes.items():
            if i % 2:
                assert result == "timeout" and 0.29 <= took < 0.6, (i, took)
            else:
                assert result == "done" and took < 0.3, (i, took)
        assert deadlines._queues[0.3].live == 0
    run(main())


def test_nested_deadlines_the_inner_one_expires_inside_the_outer() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        async with deadlines.timeout(5):
            with pytest.raises(TimeoutError):
                async with deadlines.timeout(0.05):
                    await asyncio.sleep(5)
            await asyncio.sleep(0.01)  # the outer block goes on
        # An outer expiry while inside an inner block raises at the outer block's end.
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.05):
                async with deadlines.timeout(5):
                    await asyncio.sleep(5)
    run(main())


def test_a_cancellation_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    async def main() -> None:
        deadlines = Deadlines()

        async def victim() -> None:
            async with deadlines.timeout(5):
                await asyncio.sleep(5)
        task = asyncio.create_task(victim())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert deadlines._queues[5].live == 0
    run(main())


def test_one_deadlines_object_serves_one_loop_after_another() -> None:
    deadlines = Deadlines()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.02):
                await asyncio.sleep(1)
    run(main())
    run(main())


def test_a_remembered_loop_still_open_does_not_lend_its_task_to_another_loops_block() -> None:
    """The loop of the last block is asked for the current task first (no getpid per
    block); a block on another loop, the first one still open but idle, must bind its
    own task: its deadline cancels that task, and the first loop is served again after."""
    deadlines = Deadlines()
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:
        async def expires() -> asyncio.Task[object] | None:
            with pytest.raises(TimeoutError):
                async with deadlines.timeout(0.02):
                    await asyncio.sleep(1)
            return asyncio.current_task()

        async def in_time() -> None:
            async with deadlines.timeout(5):
                await asyncio.sleep(0)

        first.run_until_complete(in_time())  # first is remembered, and stays open
        assert deadlines._loop is first
        task = second.run_until_complete(expires())
        assert deadlines._loop is second and task is not None and task.get_loop() is second
        assert deadlines._queues[0.02].loop is second
        first.run_until_complete(expires())  # and back, its deadline still enforced
        assert deadlines._loop is first
    finally:
        first.close()
        second.close()


def test_a_block_outside_a_task_is_refused_as_asyncio_timeout_refuses_it() -> None:
    deadlines = Deadlines()
    loop = asyncio.new_event_loop()
    try:
        async def in_task() -> None:
            async with deadlines.timeout(5):
                pass
        loop.run_until_complete(in_task())

        def outside() -> None:
            block = deadlines.timeout(5)
            coro = block.__aenter__()
            with pytest.raises(RuntimeError, match="inside a task"):
                coro.send(None)

        loop.call_soon(outside)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()


def test_a_begun_block_ended_by_its_deadline_says_so_and_leaves_the_task_uncancelled() -> None:
    """begin()/end(), the router's form without `async with`: the deadline's cancellation
    is reported as a timeout once, the task is not left cancelling, and a second end()
    does nothing."""
    async def main() -> None:
        deadlines = Deadlines()
        started = time.monotonic()
        deadline = deadlines.begin(0.05)
        try:
            await asyncio.sleep(5)
            timed_out = False
        except asyncio.CancelledError:
            timed_out = deadline.end(True)
        finally:
            assert deadline.end(False) is False  # ended already
        assert timed_out and time.monotonic() - started < 1.0
        await asyncio.sleep(0.01)  # the task goes on
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        assert deadlines._queues[0.05].live == 0
    run(main())


def test_a_begun_block_that_ends_in_time_or_is_cancelled_elsewhere_is_no_timeout() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        for _ in range(100):
            deadline = deadlines.begin(5)
            await asyncio.sleep(0)
            assert deadline.end(False) is False
        queue = deadlines._queues[5]
        assert (len(queue.entries), queue.live, queue._timer) == (0, 0, None)

        async def victim() -> None:
            deadline = deadlines.begin(5)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                assert deadline.end(True) is False  # another's cancellation
                raise
        task = asyncio.create_task(victim())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queue.live == 0
    run(main())


def test_the_current_task_lookup_answers_as_asyncio_current_task() -> None:
    """deadlines.current_task: asyncio's table of running tasks read directly (3.11) must
    name the same task asyncio.current_task does, and none outside a task."""
    from nodeproxy.http import deadlines as module

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert module.current_task(loop) is asyncio.current_task()

        async def inner() -> asyncio.Task[object] | None:
            return module.current_task(loop)
        task = asyncio.create_task(inner())
        assert await task is task
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        assert module.current_task(loop) is None
    finally:
        loop.close()

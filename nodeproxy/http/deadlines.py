"""Request deadlines without a loop timer per request.

``asyncio.timeout(seconds)`` arms a loop timer on entry and cancels it on exit; under
uvloop that is a timer handle made and closed per request, a few microseconds each, for
a deadline that almost never passes.  ``Deadlines.timeout(seconds)`` gives the same
context manager semantics as ``asyncio.Timeout`` (CPython 3.11's: on expiry the task is
cancelled, and at the block's end the cancellation is taken back and ``TimeoutError``
raised, unless another cancellation is outstanding), in one small object of its own per
block, and keeps the deadline in a queue per length: deadlines of one length arrive in
time order, so one loop timer, armed for the oldest live one, serves them all.  An
exited block's entry is marked done and dropped when it reaches the queue's head, or
when done entries outnumber the live ones (so a long request at the head does not pin
the rest).  ``timeout(None)`` is no deadline and costs nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

# A block's states, as asyncio.Timeout's: in force, cancelled by its deadline, ended.
_ENTERED, _EXPIRING, _ENDED = 0, 1, 2


class _Queue:
    """The live deadlines of one length, oldest first, and the one timer for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.entries: deque[_Deadline] = deque()
        self.live = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, entry: _Deadline) -> None:
        self.entries.append(entry)
        self.live += 1
        if self._timer is None:
            self._timer = self.loop.call_at(self.entries[0].when, self._fire)

    def done(self, entry: _Deadline) -> None:
        """entry's block ended before its deadline."""
        self.live -= 1
        entries = self.entries
        while entries and entries[0].state != _ENTERED:
            entries.popleft()
        if len(entries) > 64 and len(entries) > 2 * self.live:
            self.entries = deque(e for e in entries if e.state == _ENTERED)
        if not self.entries and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        entries = self.entries
        while entries:
            entry = entries[0]
            if entry.state == _ENTERED:
                if entry.when > now:
                    break
                self.live -= 1
                entry.expire()
            entries.popleft()
        if entries:
            self._timer = self.loop.call_at(entries[0].when, self._fire)


class Deadlines:
    """Deadlines for one event loop at a time, in one thread (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[float, _Queue] = {}
        # The loop the last block ran on: asking it for the current task answers without
        # asyncio.get_running_loop(), which makes a getpid system call on CPython 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def timeout(self, seconds: float | None) -> _Deadline | _NoDeadline:
        """As ``asyncio.timeout(seconds)``; None: no deadline."""
        if seconds is None:
            return _NO_DEADLINE
        return _Deadline(self, seconds)

    def _entered(self) -> tuple[asyncio.Task[object], asyncio.AbstractEventLoop]:
        """The task entering a block and its loop.  The loop of the last block is asked
        first: its current task is the caller only if it is the running loop (a loop
        not running a task in this thread has none), else the running loop is looked
        up as asyncio.timeout does."""
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("Timeout should be used inside a task")
        assert loop is not None
        return task, loop

    def _queue(self, loop: asyncio.AbstractEventLoop, seconds: float) -> _Queue:
        queue = self._queues.get(seconds)
        if queue is None or queue.loop is not loop:
            queue = self._queues[seconds] = _Queue(loop)
        return queue


class _NoDeadline:
    """``timeout(None)``: a block without a deadline."""

    async def __aenter__(self) -> _NoDeadline:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


_NO_DEADLINE = _NoDeadline()


class _Deadline:
    """One block's deadline: asyncio.Timeout's behaviour without a timer of its own."""

    __slots__ = ("_owner", "_seconds", "_queue", "_task", "when", "state")

    def __init__(self, owner: Deadlines, seconds: float):
        self._owner = owner
        self._seconds = seconds

    async def __aenter__(self) -> _Deadline:
        owner = self._owner
        self._task, loop = owner._entered()
        self.state = _ENTERED
        queue = self._queue = owner._queue(loop, self._seconds)
        self.when = queue.loop.time() + self._seconds
        queue.add(self)
        return self

    def expire(self) -> None:
        """The deadline passed: cancel the task (the block's end turns it into
        TimeoutError)."""
        self.state = _EXPIRING
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.state == _ENTERED:
            self.state = _ENDED
            self._queue.done(self)
            return None
        self.state = _ENDED
        if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            # No other cancellation is outstanding: this one was the deadline's.
            raise TimeoutError
        return None

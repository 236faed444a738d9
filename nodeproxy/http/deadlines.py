"""Request deadlines without a loop timer per request.

``asyncio.timeout(seconds)`` arms a loop timer on entry and cancels it on exit; under
uvloop that is a timer handle made and closed per request, a few microseconds each, for
a deadline that almost never passes.  ``Deadlines.timeout(seconds)`` gives the same
context manager (an ``asyncio.Timeout``: on expiry the task is cancelled and
``TimeoutError`` raised at the block's end, exactly as asyncio does it) but keeps the
deadline in a queue per length: deadlines of one length arrive in time order, so one
loop timer, armed for the oldest live one, serves them all.  An exited block's entry is
marked done and dropped when it reaches the queue's head, or when done entries
outnumber the live ones (so a long request at the head does not pin the rest).
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class _Entry:
    __slots__ = ("when", "timeout")

    def __init__(self, when: float, timeout: asyncio.Timeout):
        self.when = when
        self.timeout: asyncio.Timeout | None = timeout  # None: its block has ended


class _Queue:
    """The live deadlines of one length, oldest first, and the one timer for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.entries: deque[_Entry] = deque()
        self.live = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.live += 1
        if self._timer is None:
            self._timer = self.loop.call_at(self.entries[0].when, self._fire)

    def done(self, entry: _Entry) -> None:
        if entry.timeout is None:
            return  # fired already
        entry.timeout = None
        self.live -= 1
        entries = self.entries
        while entries and entries[0].timeout is None:
            entries.popleft()
        if len(entries) > 64 and len(entries) > 2 * self.live:
            self.entries = deque(e for e in entries if e.timeout is not None)
        if not self.entries and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        entries = self.entries
        while entries:
            entry = entries[0]
            if entry.timeout is not None:
                if entry.when > now:
                    break
                timeout, entry.timeout = entry.timeout, None
                self.live -= 1
                timeout.reschedule(now)  # asyncio cancels the task and raises at exit
            entries.popleft()
        if entries:
            self._timer = self.loop.call_at(entries[0].when, self._fire)


class Deadlines:
    """Deadlines for one event loop at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[float, _Queue] = {}

    def timeout(self, seconds: float | None) -> _Deadline:
        """As ``asyncio.timeout(seconds)``; None: no deadline."""
        return _Deadline(self, seconds)

    def _queue(self, seconds: float) -> _Queue:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(seconds)
        if queue is None or queue.loop is not loop:
            queue = self._queues[seconds] = _Queue(loop)
        return queue


class _Deadline:
    """One block's deadline: an ``asyncio.Timeout`` without a timer of its own."""

    __slots__ = ("_owner", "_seconds", "_timeout", "_queue", "_entry")

    def __init__(self, owner: Deadlines, seconds: float | None):
        self._owner = owner
        self._seconds = seconds
        self._timeout = asyncio.timeout(None)
        self._queue: _Queue | None = None
        self._entry: _Entry | None = None

    async def __aenter__(self) -> _Deadline:
        await self._timeout.__aenter__()
        if self._seconds is not None:
            queue = self._queue = self._owner._queue(self._seconds)
            self._entry = _Entry(queue.loop.time() + self._seconds, self._timeout)
            queue.add(self._entry)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        if self._queue is not None and self._entry is not None:
            self._queue.done(self._entry)
        return await self._timeout.__aexit__(exc_type, exc, tb)

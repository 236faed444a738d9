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

``begin(seconds)`` is the same block without ``async with``: the caller ends it with
``_Deadline.end(cancelled)`` in a ``finally`` (True when the block's deadline was what
cancelled it: the caller raises or answers the timeout).  Under a compiled build an
``async with`` costs two coroutine objects per block (``__aenter__``, ``__aexit__``);
the router's blocks, one or two per request, use ``begin``.  The current task is read
from asyncio's own table of them (CPython 3.11's ``asyncio.current_task`` is Python
code, a frame per call) where the interpreter has that table, else asked as before.
"""

from __future__ import annotations

import asyncio
import asyncio.tasks
from collections import deque
from collections.abc import Callable
from types import BuiltinFunctionType, TracebackType

# A block's states, as asyncio.Timeout's: in force, cancelled by its deadline, ended.
_ENTERED, _EXPIRING, _ENDED = 0, 1, 2


def _current_task_getter() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[object] | None]:
    """asyncio.current_task(loop), as cheaply as this interpreter allows: a C function
    (3.12 on) as it is; on 3.11, where it is Python reading ``_current_tasks`` (a dict by
    loop that the C task steps keep), that dict's own ``get``."""
    current = asyncio.current_task
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(current, BuiltinFunctionType) or type(table) is not dict:
        return current
    return table.get


current_task = _current_task_getter()


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

    def begin(self, seconds: float) -> _Deadline:
        """A block with a deadline, entered now by the running task, without ``async
        with``: end it with ``end()`` whatever happens (see the module docstring)."""
        deadline = _Deadline(self, seconds)
        deadline.enter()
        return deadline

    def _entered(self) -> tuple[asyncio.Task[object], asyncio.AbstractEventLoop]:
        """The task entering a block and its loop.  The loop of the last block is asked
        first: its current task is the caller only if it is the running loop (a loop
        not running a task in this thread has none), else the running loop is looked
        up as asyncio.timeout does."""
        loop = self._loop
        task = current_task(loop) if loop is not None else None
        if task is None:
            loop = self._loop = asyncio.get_running_loop()
            task = current_task(loop)
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
        self.enter()
        return self

    def enter(self) -> None:
        owner = self._owner
        self._task, loop = owner._entered()
        self.state = _ENTERED
        queue = self._queue = owner._queue(loop, self._seconds)
        self.when = queue.loop.time() + self._seconds
        queue.add(self)

    def expire(self) -> None:
        """The deadline passed: cancel the task (the block's end turns it into
        TimeoutError)."""
        self.state = _EXPIRING
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.end(exc_type is asyncio.CancelledError):
            raise TimeoutError

    def end(self, cancelled: bool) -> bool:
        """The block ends (`cancelled`: by a CancelledError).  True: the deadline's
        cancellation, and no other, ended it: the block timed out (the caller raises
        TimeoutError or answers it).  A second call does nothing and says False."""
        state = self.state
        if state == _ENDED:
            return False
        self.state = _ENDED
        if state == _ENTERED:
            self._queue.done(self)
            return False
        # No other cancellation outstanding: this one was the deadline's.
        return self._task.uncancel() == 0 and cancelled

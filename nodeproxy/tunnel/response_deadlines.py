"""The deadlines of the CONNECT responses a source node waits for: one timer for all.

Each new cross-node connection waits for its stream's response (the destination dials
the pod before it answers).  An ``asyncio.timeout`` around each wait made a Timeout
object and an event-loop timer (a libuv timer under uvloop, started, stopped and closed)
per connection; here the waits of the whole pool share one timer that ticks every
`tick` seconds while any response is awaited.  Every wait has the same length, so the
watched futures are in deadline order (a dict keeps insertion order) and a tick stops
at the first one not yet due.  A due response fails with TimeoutError, as the timeout
did, at most `tick` seconds late; one that came (or failed) in time is forgotten by
``done``.

State only: no I/O but the loop's timer.
"""

from __future__ import annotations

import asyncio

TICK = 0.25  # seconds between looks while a response is awaited


class ResponseDeadlines:
    """Futures (a stream's CONNECT response) failed with TimeoutError once `timeout`
    seconds passed since they were watched and no answer came."""

    def __init__(self, timeout: float, tick: float = TICK):
        self.timeout = timeout
        self.tick = tick
        self._waiting: dict[asyncio.Future, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def watch(self, future: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        self._waiting[future] = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._sweep)

    def done(self, future: asyncio.Future) -> None:
        self._waiting.pop(future, None)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        due = []
        for future, deadline in waiting.items():
            if deadline > now:
                break
            due.append(future)
        for future in due:
            del waiting[future]
            if not future.done():
                future.set_exception(TimeoutError("no CONNECT response in time"))
        if waiting:
            self._timer = loop.call_later(self.tick, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()

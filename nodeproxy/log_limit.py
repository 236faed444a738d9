"""Warnings a peer can cause thousands of times a second, kept to one log line per kind
per interval: a hostile pod or client must not fill the daemon's log, and the line that
is written says how many it stands for.  Every component that logs what a peer did
(refused connections and requests, request denials, the admin faces' refusals,
tracing's export errors) goes through a LogLimiter."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

LOG_EVERY_SECONDS = 10.0
MAX_KINDS = 4096  # kinds remembered at once (a kind may name a peer: they must not pile up)


class LogLimiter:
    """At most one warning per kind every ``interval`` seconds; the next one written for
    a kind says how many were held back since the last (each held line goes to debug)."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def warn(self, kind: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args`` (True), or count it into the kind's next line (False)."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug(message, *args)  # held back from the warnings only
            return False
        if len(self._last) >= MAX_KINDS:
            self._last.clear()
            self._held.clear()
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        self._log.warning(message + (f" ({held} more since the last warning)" if held else ""),
                          *args)
        return True

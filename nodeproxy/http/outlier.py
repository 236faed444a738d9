"""Outlier detection per endpoint: the state behind ``trafficPolicy.outlierDetection``.

One ``OutlierDetector`` per cluster (service port and address family) watches the
result of every attempt sent to each of its endpoints (``record``):

- a response below 500 resets both consecutive counters;
- any 5xx adds to ``consecutive_5xx``; 502, 503 and 504 also add to
  ``consecutive_gateway`` (another 5xx resets that one);
- an attempt that got no response (connect failure, reset, per-try timeout) counts as
  a gateway error and a 5xx, as Envoy maps local-origin errors by default.

When a counter reaches its threshold (0 turns that check off) the endpoint is ejected
at once, unless the cap refuses it:

- at most ``maxEjectionPercent`` of the endpoints are ejected, rounded down, but at
  least one may always be (Envoy's rule), and
- the last endpoint not ejected stays unless ``allowLastHealthyEjection`` is set.

An ejection lasts ``baseEjectionTimeSeconds`` times the number of times the endpoint
has been ejected (the multiplier), at most ``max(base, 300 s)`` (Envoy's
max_ejection_time).  Every ``intervalSeconds`` a timer returns the endpoints whose time
is up, and lowers by one the multiplier of each endpoint that has stayed in for another
``baseEjectionTimeSeconds`` since its return (or its last lowering): an endpoint ejected
again soon after its return stays out longer, one that recovered for good is ejected for
the base time again if it relapses much later.
The timer runs only while some endpoint is ejected or has a multiplier.

``available`` is what the balancer picks from: the endpoints not ejected (recomputed
only on an ejection or a return).  Refused ejections are counted by reason.  Time
comes from an injectable clock and the timer from an injectable scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from nodeproxy.config.model import OutlierDetection

log = logging.getLogger(__name__)

# Envoy's default max_ejection_time (the cap on base x multiplier), unless base is longer.
MAX_EJECTION_SECONDS = 300.0
GATEWAY_ERRORS = frozenset({502, 503, 504})

SKIP_MAX_PERCENT = "max_ejection_percent"
SKIP_LAST_HEALTHY = "last_healthy"


class Keyed(Protocol):
    @property
    def key(self) -> str: ...


E = TypeVar("E", bound=Keyed)


class OutlierEvents(Protocol):
    """Where ejections, returns and refused ejections are counted (the metrics)."""

    def ejected(self, service: str, endpoint: str) -> None: ...

    def returned(self, service: str, endpoint: str) -> None: ...

    def skipped(self, service: str, reason: str) -> None: ...

    def ejected_now(self, service: str, cluster: int, count: int) -> None: ...


@dataclass
class EndpointHealth:
    """One endpoint's outlier state."""

    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float | None = None  # clock time; None: not ejected
    multiplier: int = 0  # ejections in a row (lowered by one per base time back in)
    back_since: float = 0.0  # clock time of the return or of the last lowering
    ejections: int = 0  # ejections, ever


# Schedules a callback after a delay; returns something with cancel() (loop.call_later).
Scheduler = Callable[[float, Callable[[], None]], asyncio.TimerHandle]


class OutlierDetector(Generic[E]):
    """Consecutive-error ejection for one cluster's endpoints (see the module docstring)."""

    def __init__(self, config: OutlierDetection, *, service: str,
                 events: OutlierEvents | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 scheduler: Scheduler | None = None):
        self.config = config
        self.service = service
        self._events = events
        self._clock = clock
        self._scheduler = scheduler
        self._endpoints: list[E] = []
        self._health: dict[str, EndpointHealth] = {}
        self.available: list[E] = []
        self._timer: asyncio.TimerHandle | None = None

    # -- endpoints -------------------------------------------------------------------------

    def attach(self, endpoints: Sequence[E]) -> None:
        """The cluster's current endpoints: their state is kept by key; endpoints no
        longer listed are forgotten."""
        self._endpoints = list(endpoints)
        self._health = {e.key: self._health.get(e.key) or EndpointHealth()
                        for e in self._endpoints}
        self._refresh()

    def health(self, key: str) -> EndpointHealth | None:
        return self._health.get(key)

    @property
    def ejected_count(self) -> int:
        return sum(h.ejected_until is not None for h in self._health.values())

    def _refresh(self) -> None:
        self.available = [e for e in self._endpoints
                          if self._health[e.key].ejected_until is None]
        if self._events is not None:
            self._events.ejected_now(self.service, id(self),
                                     len(self._endpoints) - len(self.available))

    # -- results ---------------------------------------------------------------------------

    def record(self, key: str, status: int | None) -> None:
        """One attempt's result: the response status, or None for no response."""
        health = self._health.get(key)
        if health is None:
            return
        if status is not None and status < 500:
            health.consecutive_5xx = health.consecutive_gateway = 0
            return
        health.consecutive_5xx += 1
        if status is None or status in GATEWAY_ERRORS:
            health.consecutive_gateway += 1
        else:
            health.consecutive_gateway = 0
        if health.ejected_until is not None:
            return  # an attempt that was in flight when it was ejected
        cfg = self.config
        if (0 < cfg.consecutive_5xx_errors <= health.consecutive_5xx) or \
                (0 < cfg.consecutive_gateway_errors <= health.consecutive_gateway):
            self._eject(key, health)

    def _eject(self, key: str, health: EndpointHealth) -> None:
        cfg = self.config
        total = len(self._health)
        ejected = self.ejected_count
        cap = max(1, math.floor(total * cfg.max_ejection_percent / 100.0 + 1e-9))
        if ejected >= cap:
            self._skip(SKIP_MAX_PERCENT)
            return
        if not cfg.allow_last_healthy_ejection and ejected + 1 >= total:
            self._skip(SKIP_LAST_HEALTHY)
            return
        reason = (f"{health.consecutive_5xx} consecutive 5xx"
                  if 0 < cfg.consecutive_5xx_errors <= health.consecutive_5xx
                  else f"{health.consecutive_gateway} consecutive gateway errors")
        health.multiplier += 1
        health.ejections += 1
        base = cfg.base_ejection_time_seconds
        duration = min(base * health.multiplier, max(base, MAX_EJECTION_SECONDS))
        health.ejected_until = self._clock() + duration
        health.consecutive_5xx = health.consecutive_gateway = 0
        log.info("outlier detection: %s endpoint %s ejected for %.1f s (%s)",
                 self.service, key, duration, reason)
        self._refresh()
        if self._events is not None:
            self._events.ejected(self.service, key)
        self._arm()

    def _skip(self, reason: str) -> None:
        if self._events is not None:
            self._events.skipped(self.service, reason)

    # -- the interval ----------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            return
        schedule = self._scheduler or asyncio.get_running_loop().call_later
        self._timer = schedule(self.config.interval_seconds, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        if any(h.ejected_until is not None or h.multiplier for h in self._health.values()):
            self._arm()

    def sweep(self) -> None:
        """One interval: return endpoints whose ejection is over; lower the multiplier of
        those back in for a base ejection time."""
        now = self._clock()
        base = self.config.base_ejection_time_seconds
        returned = []
        for key, health in self._health.items():
            if health.ejected_until is not None:
                if now >= health.ejected_until:
                    health.ejected_until = None
                    health.back_since = now
                    returned.append(key)
            elif health.multiplier and now - health.back_since >= base:
                health.multiplier -= 1
                health.back_since = now
        if returned:
            self._refresh()
            for key in returned:
                log.info("outlier detection: %s endpoint %s returned", self.service, key)
                if self._events is not None:
                    self._events.returned(self.service, key)

    def close(self) -> None:
        """Stop the timer; the detector's endpoints no longer count as ejected."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._events is not None:
            self._events.ejected_now(self.service, id(self), 0)

    # -- the admin page --------------------------------------------------------------------

    def endpoint_view(self, key: str) -> dict[str, object]:
        health = self._health.get(key)
        if health is None:
            return {}
        remaining = (max(health.ejected_until - self._clock(), 0.0)
                     if health.ejected_until is not None else 0.0)
        return {"ejected": health.ejected_until is not None,
                "ejection_remaining_seconds": round(remaining, 3),
                "ejection_multiplier": health.multiplier,
                "times_ejected": health.ejections,
                "consecutive_5xx": health.consecutive_5xx,
                "consecutive_gateway_errors": health.consecutive_gateway}

"""Per-request endpoint choice: which of a service's endpoints one request (or one retry) goes to.

This module owns the per-endpoint load statistics (``EndpointStats``) and the five
balancers of ``config.model.LoadBalancer``: round robin, random, least request (power of
two choices on outstanding requests, Envoy's), peak EWMA (power of two choices on a
peak-sensitive latency average times outstanding requests, Linkerd's default) and ring
hash (a consistent hash of a request key).  It does no I/O and keeps no endpoint list:
the caller passes the current candidates on every pick.

Candidates are any objects with a ``key`` (a stable string such as ``"10.0.0.1:80"``) and
a ``stats`` (their ``EndpointStats``) -- see ``Candidate``.  The caller keeps each
endpoint's ``EndpointStats`` across config reloads (by key), so a reload neither forgets
latency nor loses count of requests in flight.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Final, Protocol, TypeVar

from nodeproxy.config.model import LoadBalancer

Clock = Callable[[], float]

# A new endpoint's latency estimate before its first response: Linkerd's default RTT
# estimate (30 ms).  It makes a fresh endpoint look neither free nor shunned.
DEFAULT_EWMA_SECONDS = 0.030
# Time constant of the latency average (Linkerd's default decay, 10 s).
DEFAULT_DECAY_SECONDS = 10.0
# Points each endpoint puts on the hash ring.
DEFAULT_VIRTUAL_NODES = 100


class EndpointStats:
    """One endpoint's load: requests in flight and a peak-sensitive latency average.

    ``begin()`` when a request is sent to the endpoint, ``end(started, ok)`` when its
    response (or failure) is known.  The latency average (``ewma_seconds``) moves like
    this, with ``tau`` the decay time constant and ``elapsed`` the time since the
    previous sample:

    * a sample above the average replaces it at once (peak sensitivity: a slow endpoint
      is avoided from its first slow response);
    * a sample at or below it is blended in with ``w = exp(-elapsed / tau)``:
      ``ewma = ewma * w + sample * (1 - w)``, so the average follows faster endpoints
      with time constant tau however many samples arrive;
    * a failed request's latency only counts if it raises the average, so an endpoint
      that fails fast (connection refused) does not look fast and attract traffic.

    ``cost()`` is what the peak-EWMA balancer compares: the average, decayed towards zero
    by the time since the last sample (``ewma * exp(-idle / tau)``), times
    ``active + 1``.  The idle decay lets an endpoint that was shunned after a spike be
    tried again after a while instead of never (it gets no samples while shunned).
    """

    __slots__ = ("active", "ewma_seconds", "requests", "failures", "tau", "_clock",
                 "_stamp")

    def __init__(self, *, clock: Clock = time.monotonic,
                 ewma_seconds: float = DEFAULT_EWMA_SECONDS,
                 tau: float = DEFAULT_DECAY_SECONDS):
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.active = 0  # requests sent and not yet ended
        self.ewma_seconds = ewma_seconds
        self.requests = 0  # requests begun, ever
        self.failures = 0  # requests ended with ok=False, ever
        self.tau = tau
        self._clock = clock
        self._stamp = clock()  # time of the last sample (or of creation)

    def begin(self) -> float:
        """A request goes out to this endpoint; returns its start time for ``end``."""
        self.active += 1
        self.requests += 1
        return self._clock()

    def end(self, started: float, ok: bool) -> None:
        """The request begun at ``started`` has its response (ok) or failed (not ok)."""
        if self.active > 0:
            self.active -= 1
        if not ok:
            self.failures += 1
        now = self._clock()
        sample = max(now - started, 0.0)
        if sample > self.ewma_seconds:
            self.ewma_seconds = sample
        elif ok:
            w = math.exp(-max(now - self._stamp, 0.0) / self.tau)
            self.ewma_seconds = self.ewma_seconds * w + sample * (1.0 - w)
        # A failure below the average leaves it as it is, but still counts as a sample.
        self._stamp = now

    def current_ewma(self) -> float:
        """The latency average as of now: decayed towards zero while no sample arrives."""
        idle = max(self._clock() - self._stamp, 0.0)
        return self.ewma_seconds * math.exp(-idle / self.tau)

    def cost(self) -> float:
        """Peak-EWMA load: the (idle-decayed) latency average times (active + 1)."""
        return self.current_ewma() * (self.active + 1)

    def snapshot(self) -> dict[str, float | int]:
        """For the admin page (/clusters)."""
        return {
            "active": self.active,
            "ewma_ms": round(self.ewma_seconds * 1000.0, 3),
            "requests": self.requests,
            "failures": self.failures,
        }


class Candidate(Protocol):
    """What a balancer picks from: an endpoint with a stable key and its statistics.

    Read-only properties, so plain or frozen dataclasses with these two fields fit.
    """

    @property
    def key(self) -> str: ...

    @property
    def stats(self) -> EndpointStats: ...


C = TypeVar("C", bound=Candidate)


def _check(candidates: Sequence[C]) -> None:
    if not candidates:
        raise ValueError("no candidates to pick from")


def untried(candidates: Sequence[C], tried: Collection[str]) -> Sequence[C]:
    """A retry's candidates: those no earlier attempt of the same request went to (by
    key), as Istio's retries do by default (Envoy's ``previous_hosts`` predicate); every
    candidate when each has been tried (a retry still goes somewhere)."""
    if not tried:
        return candidates
    fresh = [c for c in candidates if c.key not in tried]
    return fresh or candidates


class Balancer(ABC):
    """Picks one candidate per request.  One instance per service (or route backend)."""

    @abstractmethod
    def pick(self, candidates: Sequence[C], hash_key: str | None = None) -> C:
        """One of ``candidates`` (which must not be empty: ValueError).

        ``hash_key`` matters to ``RingHash`` only; the others ignore it.
        """


class RoundRobin(Balancer):
    """Each candidate in turn.  The cycle starts at a random place, so proxies that start
    together do not all send their first request to the same endpoint."""

    def __init__(self, rng: random.Random | None = None):
        self._next = (rng or random.Random()).randrange(1 << 30)

    def pick(self, candidates: Sequence[C], hash_key: str | None = None) -> C:
        _check(candidates)
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class Random(Balancer):
    """Uniformly at random."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C], hash_key: str | None = None) -> C:
        _check(candidates)
        return candidates[self._rng.randrange(len(candidates))]


class _PowerOfTwo(Balancer):
    """Two distinct candidates at random; the one with the lower load wins (a tie: the
    first drawn, itself random)."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    @staticmethod
    @abstractmethod
    def load(stats: EndpointStats) -> float: ...

    def pick(self, candidates: Sequence[C], hash_key: str | None = None) -> C:
        _check(candidates)
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return b if self.load(b.stats) < self.load(a.stats) else a


class LeastRequest(_PowerOfTwo):
    """Power of two choices on outstanding requests (Envoy's LEAST_REQUEST)."""

    @staticmethod
    def load(stats: EndpointStats) -> float:
        return stats.active


class PeakEwma(_PowerOfTwo):
    """Power of two choices on ``EndpointStats.cost()`` (Linkerd's default balancer)."""

    @staticmethod
    def load(stats: EndpointStats) -> float:
        return stats.cost()


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    __slots__ = ("points", "owners")

    def __init__(self, keys: frozenset[str], virtual_nodes: int):
        pairs = sorted((_hash64(f"{key}#{v}"), key)
                       for key in keys for v in range(virtual_nodes))
        self.points = [h for h, _ in pairs]
        self.owners = [key for _, key in pairs]

    def owner(self, h: int) -> str:
        i = bisect.bisect_left(self.points, h)
        return self.owners[i if i < len(self.points) else 0]


class RingHash(Balancer):
    """Consistent hashing: the same hash key goes to the same endpoint while it exists.

    Each endpoint key puts ``virtual_nodes`` points on a 64-bit ring (BLAKE2b of
    ``"<key>#<n>"``); a request goes to the owner of the first point at or after the
    BLAKE2b hash of its hash key, wrapping around.  A point's place depends only on its
    own endpoint's key, so removing an endpoint moves only the keys it owned, and adding
    one takes keys only onto itself.  Rings are built once per endpoint set and cached
    (the few most recent sets: a retry that leaves out a failed endpoint is a set of its
    own); a pick still costs O(candidates) to see which set it is.  Without a hash key
    (the request lacks the header, say) the pick is random.
    """

    CACHED_RINGS: Final = 8

    def __init__(self, rng: random.Random | None = None,
                 virtual_nodes: int = DEFAULT_VIRTUAL_NODES):
        if virtual_nodes < 1:
            raise ValueError("virtual_nodes must be at least 1")
        self._rng = rng or random.Random()
        self.virtual_nodes = virtual_nodes
        self._rings: OrderedDict[frozenset[str], _Ring] = OrderedDict()

    def _ring(self, keys: frozenset[str]) -> _Ring:
        ring = self._rings.get(keys)
        if ring is None:
            ring = self._rings[keys] = _Ring(keys, self.virtual_nodes)
            while len(self._rings) > self.CACHED_RINGS:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(keys)
        return ring

    def pick(self, candidates: Sequence[C], hash_key: str | None = None) -> C:
        _check(candidates)
        if hash_key is None:
            return candidates[self._rng.randrange(len(candidates))]
        by_key = {c.key: c for c in candidates}
        if len(by_key) == 1:
            return candidates[0]
        return by_key[self._ring(frozenset(by_key)).owner(_hash64(hash_key))]


def make_balancer(cfg: LoadBalancer, rng: random.Random | None = None) -> Balancer:
    """The balancer ``cfg.policy`` names.  Where the hash key comes from (``hash_header``
    or ``hash_source_identity``) is the caller's business; it passes it to ``pick``."""
    policy = cfg.policy
    if policy == "ROUND_ROBIN":
        return RoundRobin(rng)
    if policy == "RANDOM":
        return Random(rng)
    if policy == "LEAST_REQUEST":
        return LeastRequest(rng)
    if policy == "PEAK_EWMA":
        return PeakEwma(rng)
    if policy == "RING_HASH":
        return RingHash(rng)
    raise ValueError(f"unknown load balancer policy {policy!r}")

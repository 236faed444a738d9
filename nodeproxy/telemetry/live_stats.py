"""Live figures for `nodeproxy top` and `nodeproxy stat`: the last minutes of traffic,
per workload and per HTTP route, kept in memory and read over the admin API.

Each finished HTTP request adds one observation (``request``) and each relayed TCP
connection reports through a ``LiveFlow`` (opened, bytes, closed).  Observations go
into one-second slots of a ring that keeps ``keep_seconds`` of them; a query for a
window of W seconds merges the last W slots (the current, partial second included),
so a figure covers between W-1 and W seconds of traffic and rates divide by W.

Per slot and per (source workload, destination workload, parent service, route) the
collector counts requests and failures and keeps a latency histogram whose buckets grow
by a factor of 2**(1/32): a quantile is reported as the upper bound of the bucket
holding the nearest-rank sample, so it is never below that sample's true value and at
most ``QUANTILE_ERROR`` (2.2 %) above it.  Success follows Linkerd's classification: a
response is a failure if its gRPC status is present and not 0, or (no gRPC status) its
HTTP status is 5xx; a request that got no response at all (status 0) is a failure too.
Latency is the whole exchange, from the request's head to the response's end (the
duration of istio_request_duration_milliseconds), not Linkerd's time to first byte.

Rows: a workload is ``outbound`` for traffic it sent and ``inbound`` for traffic sent
to it.  HTTP is handled on the client's node (nodeproxy's proxy is the source's
waypoint), so one request counts in its source's outbound row and in its destination's
inbound row of the node that proxied it.  TCP connections count where they are
metered: on the source's node (outbound row: plain TCP services) and on the
destination's node (inbound row: every connection delivered into a pod, including the
pooled connections that carry HTTP).  Bytes are relative to the workload: ``bytes_out``
it sent, ``bytes_in`` it received.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from nodeproxy.telemetry.labels import UNKNOWN

if TYPE_CHECKING:
    from nodeproxy.telemetry.labels import RequestLabels, TcpLabels

GROWTH = 2.0 ** (1.0 / 32.0)
QUANTILE_ERROR = GROWTH - 1.0  # a reported quantile is in [true, true * (1 + this)]
_LOG_GROWTH = math.log(GROWTH)
MIN_MS = 0.001  # durations at or below 1 µs share the first bucket
QUANTILES = (0.5, 0.95, 0.99)
DEFAULT_WINDOW = 60  # seconds, as `linkerd viz stat`
DEFAULT_ROUTE = "[default]"  # a service with no HTTPRoute: its one implicit rule
NO_ROUTE = "[no route]"  # a request no rule matched (answered 404, flag NR)

# (source namespace, source workload, destination namespace, destination workload,
#  parent service "<ns>/<name>", route name)
RequestKey = tuple[str, str, str, str, str, str]
TcpKey = tuple[bool, str, str]  # (outbound, namespace, workload)


def bucket(duration_s: float) -> int:
    """The latency bucket of a duration: bucket i holds [MIN_MS*G**i, MIN_MS*G**(i+1)) ms
    (the first one everything below too)."""
    ms = duration_s * 1000.0
    if ms <= MIN_MS:
        return 0
    return int(math.log(ms / MIN_MS) / _LOG_GROWTH)


def bucket_value_ms(index: int) -> float:
    """A bucket's representative: its upper bound (a quantile is never understated)."""
    return MIN_MS * GROWTH ** (index + 1)


def quantile_ms(histogram: dict[int, int], q: float) -> float | None:
    """The nearest-rank q-quantile of a bucket histogram (None if it is empty)."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return bucket_value_ms(index)
    raise AssertionError("unreachable: the ranks add up to the total")


def is_failure(status: int, grpc_status: str) -> bool:
    if grpc_status:
        return grpc_status != "0"
    return status >= 500 or status == 0


class _Requests:
    __slots__ = ("requests", "failures", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.latency: dict[int, int] = {}


class _Tcp:
    __slots__ = ("opened", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.opened = 0
        self.bytes_in = 0
        self.bytes_out = 0


class _Slot:
    __slots__ = ("second", "requests", "tcp")

    def __init__(self, second: int):
        self.second = second
        self.requests: dict[RequestKey, _Requests] = {}
        self.tcp: dict[TcpKey, _Tcp] = {}


@dataclass
class Latency:
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass
class TcpFigures:
    open_connections: int = 0  # open now
    connections: int = 0  # opened in the window
    bytes_in: int = 0  # received by the workload in the window
    bytes_out: int = 0  # sent by the workload in the window


@dataclass
class _Totals:
    requests: int = 0
    failures: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    def add(self, cell: _Requests) -> None:
        self.requests += cell.requests
        self.failures += cell.failures
        for index, count in cell.latency.items():
            self.latency[index] = self.latency.get(index, 0) + count

    def figures(self, window: int) -> dict[str, Any]:
        ok = self.requests - self.failures
        q = [quantile_ms(self.latency, p) for p in QUANTILES]
        return {
            "requests": self.requests,
            "successes": ok,
            "success_rate": round(ok / self.requests, 6) if self.requests else None,
            "rps": round(self.requests / window, 6),
            "latency_ms": asdict(Latency(*(None if v is None else round(v, 3) for v in q))),
        }


@dataclass
class _WorkloadTotals(_Totals):
    tcp: TcpFigures = field(default_factory=TcpFigures)


class LiveStats:
    """The ring of one-second slots; ``clock`` is the monotonic clock observations use."""

    def __init__(self, keep_seconds: int, clock: Callable[[], float] = time.monotonic):
        if keep_seconds < 1:
            raise ValueError("keep_seconds must be at least 1")
        self.keep_seconds = keep_seconds
        self.clock = clock
        self._slot = _Slot(int(clock()))
        self._slots: deque[_Slot] = deque([self._slot])
        self._open: dict[TcpKey, int] = {}
        # Called before a snapshot: the relayed bytes' meters count what they hold (they
        # report at most once a second otherwise; telemetry/proxy_metrics.py).
        self.before_snapshot: Callable[[], None] | None = None

    def _current(self, now: float) -> _Slot:
        second = int(now)
        slot = self._slot
        if second <= slot.second:  # this second (or a request that began earlier ending late)
            return slot
        slot = self._slot = _Slot(second)
        self._slots.append(slot)
        oldest = second - self.keep_seconds
        while self._slots[0].second <= oldest:
            self._slots.popleft()
        return slot

    # -- observations (hot path) -----------------------------------------------------

    def request(self, service: str, route: str, labels: RequestLabels, status: int,
                grpc_status: str, duration_s: float, now: float) -> None:
        """One finished request to parent service `service` matched by `route`."""
        slot = self._current(now)
        key = (labels.source_workload_namespace, labels.source_workload,
               labels.destination_workload_namespace, labels.destination_workload,
               service, route)
        cell = slot.requests.get(key)
        if cell is None:
            cell = slot.requests[key] = _Requests()
        cell.requests += 1
        if is_failure(status, grpc_status):
            cell.failures += 1
        index = bucket(duration_s)
        latency = cell.latency
        latency[index] = latency.get(index, 0) + 1

    def flow(self, labels: TcpLabels) -> LiveFlow:
        """The live figures of one relayed connection, from its Istio labels: a source
        reporter counts it for the source workload (outbound), a destination reporter
        for the destination workload (inbound)."""
        if labels.reporter == "source":
            key = (True, labels.source_workload_namespace, labels.source_workload)
        else:
            key = (False, labels.destination_workload_namespace, labels.destination_workload)
        return LiveFlow(self, key)

    def _opened(self, key: TcpKey) -> None:
        self._open[key] = self._open.get(key, 0) + 1
        self._tcp_cell(key, self.clock()).opened += 1

    def _closed(self, key: TcpKey) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def _tcp_cell(self, key: TcpKey, now: float) -> _Tcp:
        slot = self._current(now)
        cell = slot.tcp.get(key)
        if cell is None:
            cell = slot.tcp[key] = _Tcp()
        return cell

    # -- queries -------------------------------------------------------------------------

    def snapshot(self, window: int | None = None, namespace: str | None = None,
                 now: float | None = None) -> dict[str, Any]:
        """The figures of the last `window` seconds (1..keep_seconds; None: DEFAULT_WINDOW
        or all that is kept, if less), as JSON-ready data: ``window_seconds``,
        ``workloads`` and ``routes`` (see docs/http.md)."""
        if window is None:
            window = min(DEFAULT_WINDOW, self.keep_seconds)
        if not 1 <= window <= self.keep_seconds:
            raise ValueError(f"window must be 1..{self.keep_seconds} seconds, not {window}")
        if self.before_snapshot is not None:
            self.before_snapshot()
        now = self.clock() if now is None else now
        first = int(now) - window  # slots after this second are in the window
        workloads: dict[TcpKey, _WorkloadTotals] = {}
        routes: dict[tuple[str, str], _Totals] = {}
        for slot in self._in_window(first):
            for key, cell in slot.requests.items():
                src_ns, src, dst_ns, dst, service, route = key
                workloads.setdefault((True, src_ns, src), _WorkloadTotals()).add(cell)
                if dst != UNKNOWN:
                    workloads.setdefault((False, dst_ns, dst), _WorkloadTotals()).add(cell)
                routes.setdefault((service, route), _Totals()).add(cell)
            for tcp_key, tcp in slot.tcp.items():
                figures = workloads.setdefault(tcp_key, _WorkloadTotals()).tcp
                figures.connections += tcp.opened
                figures.bytes_in += tcp.bytes_in
                figures.bytes_out += tcp.bytes_out
        for tcp_key, count in self._open.items():
            workloads.setdefault(tcp_key, _WorkloadTotals()).tcp.open_connections = count
        workload_rows = [
            {"namespace": ns, "name": name, "direction": "outbound" if out else "inbound",
             **totals.figures(window), "tcp": asdict(totals.tcp)}
            for (out, ns, name), totals in sorted(workloads.items(),
                                                  key=lambda i: (i[0][1], i[0][2], i[0][0]))
            if namespace is None or ns == namespace]
        route_rows = [
            {"namespace": service.split("/", 1)[0], "service": service, "route": route,
             **totals.figures(window)}
            for (service, route), totals in sorted(routes.items())
            if namespace is None or service.split("/", 1)[0] == namespace]
        return {"window_seconds": window, "kept_seconds": self.keep_seconds,
                "quantile_error": round(QUANTILE_ERROR, 4),
                "workloads": workload_rows, "routes": route_rows}

    def _in_window(self, first: int) -> Iterable[_Slot]:
        return [slot for slot in self._slots if slot.second > first]


class LiveFlow:
    """One relayed connection's share of the live figures."""

    __slots__ = ("_stats", "_key", "_second", "_cell")

    def __init__(self, stats: LiveStats, key: TcpKey):
        self._stats = stats
        self._key = key
        self._second = -1
        self._cell: _Tcp | None = None

    def opened(self) -> None:
        self._stats._opened(self._key)

    def closed(self) -> None:
        self._stats._closed(self._key)

    def bytes(self, from_downstream: bool, n: int) -> None:
        """n bytes relayed; from_downstream: from the client (the source) to the server."""
        now = self._stats.clock()
        cell = self._cell
        if cell is None or int(now) != self._second:
            cell = self._cell = self._stats._tcp_cell(self._key, now)
            self._second = int(now)
        if from_downstream is self._key[0]:  # the workload is the side that sent them
            cell.bytes_out += n
        else:
            cell.bytes_in += n


def route_name(route: str | None) -> str:
    """The route column of a request: the HTTPRoute's "<ns>/<name>", DEFAULT_ROUTE for a
    service without routes, NO_ROUTE when no rule matched."""
    if route is None:
        return NO_ROUTE
    return route or DEFAULT_ROUTE

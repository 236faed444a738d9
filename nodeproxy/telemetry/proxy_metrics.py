"""Proxy-side series with Istio's names and labels, so existing dashboards work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeproxy.telemetry.labels import TCP_LABELS, TcpLabels

if TYPE_CHECKING:
    from nodeproxy.telemetry.live_stats import LiveStats

FLUSH_SECONDS = 1.0  # at most this late, the relayed bytes reach the live figures


class ConnectionMeter:
    """The four Istio TCP series bound to one set of connection labels (and its share of the
    live figures of `nodeproxy top`, when they are kept).  It holds nothing of one
    connection: every connection with the same labels shares one (ProxyMetrics.meter).

    Relayed bytes come once per relay read (every relayed request and response of every
    connection with these labels): they are added up here, as two integers, and reach the
    counters and the live figures at most once a second (`ProxyMetrics.held`: one timer for
    all meters), at every reading of the registry (a scrape, `get_sample_value`: the
    registry's first collector flushes every meter, so a scrape is exact), at every live
    snapshot, and at `closed`.  A quiet flow's message used to pay a flush of its own
    (`loop.call_soon`, two counter updates, the live figures: ~1.5 µs per message and
    daemon, docs/benchmarks.md "Paced tail latency"); now it pays two additions.  Outside
    an event loop the bytes are counted at once."""

    __slots__ = ("_closed", "_live", "_opened", "_received", "_sent", "_held_received",
                 "_held_sent", "_flush_due", "_metrics")

    def __init__(self, metrics: ProxyMetrics, labels: TcpLabels):
        values = labels.values()
        self._metrics = metrics
        self._opened = metrics.tcp_opened.labels(*values)
        self._closed = metrics.tcp_closed.labels(*values)
        self._received = metrics.tcp_received.labels(*values)
        self._sent = metrics.tcp_sent.labels(*values)
        self._live = metrics.live.flow(labels) if metrics.live is not None else None
        self._held_received = 0  # bytes relayed since the last flush, from the client
        self._held_sent = 0      # and to it
        self._flush_due = False  # in ProxyMetrics' held meters

    def opened(self) -> None:
        self._opened.inc()
        if self._live is not None:
            self._live.opened()

    def closed(self) -> None:
        self.flush()
        self._closed.inc()
        if self._live is not None:
            self._live.closed()

    def bytes(self, from_downstream: bool, n: int) -> None:
        # Istio: "received" is what the client sent (request), "sent" what it got back.
        if from_downstream:
            self._held_received += n
        else:
            self._held_sent += n
        if not self._flush_due:
            self._flush_due = True
            self._metrics.held(self)

    def flush(self) -> None:
        """Count the bytes held since the last flush."""
        self._flush_due = False
        received, sent = self._held_received, self._held_sent
        self._held_received = self._held_sent = 0
        live = self._live
        if received:
            self._received.inc(received)
            if live is not None:
                live.bytes(True, received)
        if sent:
            self._sent.inc(sent)
            if live is not None:
                live.bytes(False, sent)


class _FlushFirst:
    """The registry's first collector: every reading of the registry (a scrape,
    `get_sample_value`) counts the meters' held bytes before the byte counters are read."""

    def __init__(self, flush: Callable[[], None]):
        self._flush = flush

    def collect(self) -> list[Any]:
        self._flush()
        return []


class ProxyMetrics:
    # The live figures relayed connections feed (set by the daemon; None: not kept).
    _live: LiveStats | None = None

    def __init__(self, registry: CollectorRegistry):
        self._meters: dict[TcpLabels, ConnectionMeter] = {}
        self._held: list[ConnectionMeter] = []  # meters holding bytes not counted yet
        # The loop their flush is armed on (None: not armed).
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        # Registered before the byte counters, so it runs before they are read.
        registry.register(_FlushFirst(self.flush_held))  # type: ignore[arg-type]
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened through the proxy",
            TCP_LABELS, registry=registry)
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed through the proxy",
            TCP_LABELS, registry=registry)
        self.tcp_received = Counter(
            "istio_tcp_received_bytes", "Bytes the client sent through the proxy (request)",
            TCP_LABELS, registry=registry)
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes", "Bytes the proxy sent back to the client (response)",
            TCP_LABELS, registry=registry)
        self.refused = Counter(
            "nodeproxy_outbound_refused", "Captured connections the proxy refused, by reason",
            ("source_workload_namespace", "source_workload", "reason"), registry=registry)
        self.inbound_refused = Counter(
            "nodeproxy_inbound_refused",
            "Connections into local pods refused at accept, by reason (descriptors, "
            "source_connection_limit; HBONE: node_stream_limit)",
            ("destination_workload_namespace", "destination_workload", "reason"),
            registry=registry)
        self.tcp_idle_closed = Counter(
            "nodeproxy_tcp_idle_timeouts",
            "Relayed TCP flows closed after limits.tcpIdleTimeoutSeconds without a byte",
            registry=registry)
        self.upstream_connect_failures = Counter(
            "nodeproxy_upstream_connect_failures",
            "Upstream connects that failed or timed out (Envoy's UF)",
            ("destination_service", "reason"), registry=registry)
        self.active_connections = Gauge(
            "nodeproxy_proxy_active_connections", "Connections the proxy is relaying now",
            registry=registry)
        self.enrolled_pods = Gauge(
            "nodeproxy_enrolled_pods", "Pods enrolled in the mesh on this node",
            registry=registry)
        self.pod_enrollments = Counter(
            "nodeproxy_pod_enrollments", "Enroll and unenroll events, by cause",
            ("event", "cause"), registry=registry)

    @property
    def live(self) -> LiveStats | None:
        return self._live

    @live.setter
    def live(self, live: LiveStats | None) -> None:
        self.flush_held()     # what the meters hold belongs to the previous live figures
        self._live = live
        self._meters.clear()  # bound to the previous live figures
        if live is not None:
            live.before_snapshot = self.flush_held

    def held(self, meter: ConnectionMeter) -> None:
        """`meter` holds bytes not counted yet: count them within FLUSH_SECONDS (one timer
        for every meter), at the next reading of the registry, or at once outside a loop."""
        self._held.append(meter)
        timer_loop = self._timer_loop
        if timer_loop is not None and not timer_loop.is_closed():
            return   # armed (on a loop that may still run it)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_held()
            return
        self._timer_loop = loop
        loop.call_later(FLUSH_SECONDS, self._tick)

    def _tick(self) -> None:
        self._timer_loop = None
        self.flush_held()

    def flush_held(self) -> None:
        """Count every meter's held bytes now."""
        held, self._held = self._held, []
        for meter in held:
            meter.flush()

    def meter(self, labels: TcpLabels) -> ConnectionMeter:
        """The meter of these labels, made once: a connection does not look its four
        series up again (the series themselves live as long as the registry)."""
        meter = self._meters.get(labels)
        if meter is None:
            meter = self._meters[labels] = ConnectionMeter(self, labels)
        return meter

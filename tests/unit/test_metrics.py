"""Metric names and labels: Istio's where the concept exists, nodeproxy_* for kernel series."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from dataclasses import asdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.capture.maps import FastPathCounters, PodCounters
from nodeproxy.telemetry.kernel_collector import KernelCollector
from nodeproxy.telemetry.labels import TcpLabels
from nodeproxy.telemetry.proxy_metrics import ConnectionMeter, ProxyMetrics

LABELS = TcpLabels(
    reporter="source", source_workload="client", source_workload_namespace="default",
    source_principal="spiffe://cluster.local/ns/default/sa/client",
    destination_workload="web", destination_workload_namespace="default",
    destination_principal="spiffe://cluster.local/ns/default/sa/web",
    destination_service="web.default.svc.cluster.local", connection_security_policy="none",
)


def exposition() -> str:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    meter = ConnectionMeter(metrics, LABELS)
    meter.opened()
    meter.bytes(True, 100)
    meter.bytes(False, 250)
    meter.closed()
    counters = PodCounters(captured=3, out_opened=3, in_opened=1, out_closed=2, in_closed=1,
                           out_bytes_sent=1000, out_bytes_received=2000, in_bytes_sent=30,
                           in_bytes_received=40, rtt_sum_us=500, rtt_samples=5, denied=0,
                           inbound_captured=0)
    fast_path = FastPathCounters(splice_bytes=0, splice_fallback_bytes=0, splice_drops=0,
                                 msg_redirects=12, msg_redirect_bytes=3400, msg_misses=2)
    registry.register(KernelCollector(lambda: {7: counters, 8: counters},
                                      lambda: {7: ("default", "client-1")},
                                      fastpath=lambda: fast_path))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_istio_tcp_series_and_labels():
    got = samples(exposition())
    key = tuple(sorted(asdict(LABELS).items()))
    assert got[("istio_tcp_connections_opened_total", key)] == 1
    assert got[("istio_tcp_connections_closed_total", key)] == 1
    # Istio: received = what the client sent; sent = what it got back.
    assert got[("istio_tcp_received_bytes_total", key)] == 100
    assert got[("istio_tcp_sent_bytes_total", key)] == 250


def test_kernel_series_per_pod_and_direction():
    got = samples(exposition())
    pod = (("pod_name", "client-1"), ("pod_namespace", "default"))
    out = tuple(sorted(pod + (("direction", "outbound"),)))
    assert got[("nodeproxy_kernel_connections_captured_total", pod)] == 3
    assert got[("nodeproxy_kernel_tcp_sent_bytes_total", out)] == 1000
    assert got[("nodeproxy_kernel_tcp_received_bytes_total", out)] == 2000
    assert got[("nodeproxy_kernel_tcp_smoothed_rtt_seconds_sum", pod)] == 500e-6
    assert got[("nodeproxy_kernel_tcp_smoothed_rtt_seconds_count", pod)] == 5
    # Pod 8 is in the map but not enrolled any more: not exported.
    assert not any(dict(labels).get("pod_name") == "8" for _, labels in got)
    assert len([k for k in got if k[0] == "nodeproxy_kernel_connections_captured_total"]) == 1


def test_kernel_fast_path_series_for_the_node():
    got = samples(exposition())
    assert got[("nodeproxy_kernel_fastpath_msg_redirects_total", ())] == 12
    assert got[("nodeproxy_kernel_fastpath_msg_redirect_bytes_total", ())] == 3400
    assert got[("nodeproxy_kernel_fastpath_msg_misses_total", ())] == 2


def test_exposition_passes_promtool():
    assert shutil.which("promtool"), "promtool missing: `make setup` installs Debian's prometheus"
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_series_a_capture_mode_does_not_keep_are_absent_not_zero():
    """iptables mode without sockops: captured counts (the proxy's) only; no TCP series and
    no connect()-time denials, which only ebpf mode refuses and counts."""
    registry = CollectorRegistry()
    counters = PodCounters(captured=3, out_opened=0, in_opened=0, out_closed=0, in_closed=0,
                           out_bytes_sent=0, out_bytes_received=0, in_bytes_sent=0,
                           in_bytes_received=0, rtt_sum_us=0, rtt_samples=0, denied=0,
                           inbound_captured=2)
    registry.register(KernelCollector(lambda: {7: counters}, lambda: {7: ("default", "c")},
                                      tcp=False, connect_denials=False))
    names = {name for name, _ in samples(generate_latest(registry).decode())}
    assert names == {"nodeproxy_kernel_connections_captured_total",
                     "nodeproxy_kernel_inbound_connections_captured_total"}


def test_meter_bytes_are_exact_at_every_scrape_without_a_flush_per_message():
    """In the daemon's loop relayed bytes are held in the meter (no counter update, no
    callback per message), yet every scrape, even in the same turn as the reads, sees
    every byte relayed before it, once; a connection's end counts what is held at once."""

    async def main() -> tuple[list[tuple[float, float]], list[float]]:
        registry = CollectorRegistry()
        metrics = ProxyMetrics(registry)
        meter = ConnectionMeter(metrics, LABELS)
        key = tuple(sorted(asdict(LABELS).items()))
        counter = metrics.tcp_received.labels(*LABELS.values())

        def read() -> tuple[float, float]:
            got = samples(generate_latest(registry).decode())
            return (got[("istio_tcp_received_bytes_total", key)],
                    got[("istio_tcp_sent_bytes_total", key)])

        seen, raw = [], []
        meter.opened()
        for _ in range(1000):
            meter.bytes(True, 7)
            meter.bytes(False, 3)
        raw.append(counter._value.get())  # held: the counter itself not touched yet
        await asyncio.sleep(0)
        raw.append(counter._value.get())  # nor at the turn's end (no flush per turn)
        seen.append(read())               # a scrape: all of it
        seen.append(read())               # and nothing twice
        meter.bytes(True, 5)
        seen.append((registry.get_sample_value("istio_tcp_received_bytes_total",
                                               asdict(LABELS)) or 0, 3000))
        meter.bytes(True, 6)
        meter.closed()                    # the end counts what is held at once
        raw.append(counter._value.get())
        seen.append(read())
        await asyncio.sleep(0)
        seen.append(read())
        return seen, raw

    seen, raw = asyncio.run(main())
    assert raw == [0, 0, 7011]
    assert seen == [(7000, 3000), (7000, 3000), (7005, 3000), (7011, 3000), (7011, 3000)]


def test_meter_bytes_reach_the_counters_and_live_figures_within_the_flush_period(
        monkeypatch):
    """Unscraped, the held bytes reach the counter and the live figures by one timer for all
    meters (FLUSH_SECONDS); a live snapshot counts them at once; with no loop running they
    are counted at once."""
    from nodeproxy.telemetry import proxy_metrics
    from nodeproxy.telemetry.live_stats import LiveStats

    monkeypatch.setattr(proxy_metrics, "FLUSH_SECONDS", 0.05)
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.live = LiveStats(60)
    other = dataclasses.replace(LABELS, destination_workload="api")
    meters = [metrics.meter(LABELS), metrics.meter(other)]

    def tcp_bytes() -> int:  # both meters' connections are the client's (one row)
        return sum(row["tcp"]["bytes_in"] + row["tcp"]["bytes_out"]
                   for row in metrics.live.snapshot()["workloads"])  # type: ignore[union-attr]

    async def main() -> list[object]:
        counters = [metrics.tcp_sent.labels(*m.values()) for m in (LABELS, other)]
        out: list[object] = []
        for meter in meters:
            meter.bytes(False, 400)
        out.append([c._value.get() for c in counters])
        out.append(tcp_bytes())          # a snapshot flushes first
        for meter in meters:
            meter.bytes(False, 100)
        out.append([c._value.get() for c in counters])
        await asyncio.sleep(0.2)         # the timer's flush, one for both meters
        out.append([c._value.get() for c in counters])
        return out

    assert asyncio.run(main()) == [[0, 0], 800, [400, 400], [500, 500]]
    meters[0].bytes(True, 9)             # no loop: at once (and a dead loop's timer
    assert metrics.tcp_received.labels(*LABELS.values())._value.get() == 9  # is not waited on)
    assert asyncio.run(_bytes_in_a_new_loop(metrics, meters[0])) == 9 + 11


async def _bytes_in_a_new_loop(metrics: ProxyMetrics, meter: ConnectionMeter) -> float:
    meter.bytes(True, 11)
    await asyncio.sleep(0.2)
    return metrics.tcp_received.labels(*LABELS.values())._value.get()

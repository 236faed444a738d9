"""Metric names and labels: Istio's where the concept exists, nodeproxy_* for kernel series."""

from __future__ import annotations

import asyncio
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


def test_meter_bytes_of_a_turn_are_counted_at_its_end_exactly():
    """In the daemon's loop a turn's relayed bytes reach the series once, at the turn's end
    (not a counter update per read): a scrape, which runs in a turn of its own, sees every
    byte relayed before it, and a connection's end counts what is held at once."""

    async def main() -> list[tuple[float, float]]:
        registry = CollectorRegistry()
        meter = ConnectionMeter(ProxyMetrics(registry), LABELS)
        key = tuple(sorted(asdict(LABELS).items()))

        def read() -> tuple[float, float]:
            got = samples(generate_latest(registry).decode())
            return (got[("istio_tcp_received_bytes_total", key)],
                    got[("istio_tcp_sent_bytes_total", key)])

        seen = []
        meter.opened()
        for _ in range(1000):
            meter.bytes(True, 7)
            meter.bytes(False, 3)
        seen.append(read())               # the same turn: not counted yet
        await asyncio.sleep(0)
        seen.append(read())               # the next turn: all of it
        meter.bytes(True, 5)
        meter.closed()                    # the end counts what is held at once
        seen.append(read())
        await asyncio.sleep(0)
        seen.append(read())               # and nothing twice
        return seen

    assert asyncio.run(main()) == [(0, 0), (7000, 3000), (7005, 3000), (7005, 3000)]

"""Counters kept by the kernel, read from the BPF maps at scrape time: per pod (sockops,
connect, sk_lookup) and for the node's fast paths."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.capture.maps import FastPathCounters, PodCounters

POD_LABELS = ["pod_namespace", "pod_name"]


class KernelCollector(Collector):
    """Exposes nodeproxy_kernel_* series for every enrolled pod."""

    def __init__(
        self,
        read_counters: Callable[[], dict[int, PodCounters]],
        pod_names: Callable[[], dict[int, tuple[str, str]]],
        policy_denials: Callable[[], dict[str, int]] = dict,
        fast_path: Callable[[], FastPathCounters] | None = None,
    ):
        self._read = read_counters
        self._names = pod_names
        self._policy_denials = policy_denials
        self._fast_path = fast_path

    def collect(self) -> Iterator:
        names = self._names()
        counters = self._read()
        directional = POD_LABELS + ["direction"]
        captured = CounterMetricFamily(
            "nodeproxy_kernel_connections_captured",
            "connect() calls the kernel redirected to the proxy", labels=POD_LABELS)
        opened = CounterMetricFamily(
            "nodeproxy_kernel_tcp_connections_opened",
            "TCP connections established, seen by sockops", labels=directional)
        closed = CounterMetricFamily(
            "nodeproxy_kernel_tcp_connections_closed",
            "TCP connections closed, seen by sockops", labels=directional)
        sent = CounterMetricFamily(
            "nodeproxy_kernel_tcp_sent_bytes",
            "Bytes acknowledged by the peer (tcp_sock.bytes_acked) of closed connections",
            labels=directional)
        received = CounterMetricFamily(
            "nodeproxy_kernel_tcp_received_bytes",
            "Bytes received (tcp_sock.bytes_received) of closed connections",
            labels=directional)
        denied = CounterMetricFamily(
            "nodeproxy_kernel_connect_denied",
            "connect() calls refused with EPERM in the source pod by a compiled DENY policy",
            labels=POD_LABELS)
        inbound = CounterMetricFamily(
            "nodeproxy_kernel_inbound_connections_captured",
            "Connections into the pod steered to its inbound listener (sk_lookup)",
            labels=POD_LABELS)
        by_policy = CounterMetricFamily(
            "nodeproxy_kernel_policy_denials",
            "connect() calls refused in the kernel, by authorization policy",
            labels=["policy"])
        for policy, count in sorted(self._policy_denials().items()):
            by_policy.add_metric([policy], count)
        rtt = SummaryMetricFamily(
            "nodeproxy_kernel_tcp_smoothed_rtt_seconds",
            "Smoothed RTT samples of the pod's TCP connections", labels=POD_LABELS)
        for pod_id, c in sorted(counters.items()):
            if pod_id not in names:
                continue
            pod = list(names[pod_id])
            captured.add_metric(pod, c.captured)
            denied.add_metric(pod, c.denied)
            inbound.add_metric(pod, c.inbound_captured)
            for direction, o, cl, s, r in (
                ("outbound", c.out_opened, c.out_closed, c.out_bytes_sent, c.out_bytes_received),
                ("inbound", c.in_opened, c.in_closed, c.in_bytes_sent, c.in_bytes_received),
            ):
                labels = pod + [direction]
                opened.add_metric(labels, o)
                closed.add_metric(labels, cl)
                sent.add_metric(labels, s)
                received.add_metric(labels, r)
            rtt.add_metric(pod, c.rtt_samples, c.rtt_sum_us / 1e6)
        yield from (captured, opened, closed, sent, received, rtt, denied, inbound, by_policy)
        if self._fast_path is not None:
            yield from fast_path_families(self._fast_path())


def fast_path_families(c: FastPathCounters) -> list[CounterMetricFamily]:
    """nodeproxy_kernel_fastpath_*: what the kernel fast paths moved, for the whole node."""
    families = []
    for name, help_text, value in (
        ("msg_redirects", "Messages the sk_msg fast path handed from one local socket to "
         "its peer (application <-> proxy) without the loopback TCP stack",
         c.msg_redirects),
        ("msg_redirect_bytes", "Bytes of the messages the sk_msg fast path redirected",
         c.msg_redirect_bytes),
        ("msg_misses", "Messages of sockets on the sk_msg fast path that took loopback TCP "
         "(peer not on the fast path, a direction kept on TCP for order, or over its bound)",
         c.msg_misses),
    ):
        family = CounterMetricFamily(f"nodeproxy_kernel_fastpath_{name}", help_text)
        family.add_metric([], value)
        families.append(family)
    return families

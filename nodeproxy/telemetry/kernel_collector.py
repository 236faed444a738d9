"""Counters kept by the kernel, read from the BPF maps at scrape time: per pod (sockops,
connect and sk_lookup programs) and for the node's fast paths (splice, sk_msg).

Only the series the running capture mode really keeps are exported: without sockops
(iptables mode where it could not be set up) there are no TCP series, and outside ebpf
mode no connect()-time denial counts; a series that is not kept is absent, never 0.
"""

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
        *,
        tcp: bool = True,
        connect_denials: bool = True,
        fastpath: Callable[[], FastPathCounters] | None = None,
    ):
        self._read = read_counters
        self._names = pod_names
        self._policy_denials = policy_denials
        self._tcp = tcp  # sockops keeps the opened/closed/bytes/RTT counters
        self._connect_denials = connect_denials  # cgroup/connect refuses and counts denies
        self._fastpath = fastpath  # None: no fast-path programs loaded

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
        tcp = (opened, closed, sent, received, rtt) if self._tcp else ()
        denials = (denied, by_policy) if self._connect_denials else ()
        yield from (captured, *tcp, *denials[:1], inbound, *denials[1:])
        if self._fastpath is not None:
            yield from self._fastpath_families(self._fastpath())

    def _fastpath_families(self, c: FastPathCounters) -> Iterator[CounterMetricFamily]:
        for name, value, doc in (
            ("splice_bytes", c.splice_bytes,
             "Bytes the sk_skb splice moved socket to socket, never entering the proxy"),
            ("splice_fallback_bytes", c.splice_fallback_bytes,
             "Bytes on spliced sockets left to the proxy (flow control, taken back)"),
            ("splice_drops", c.splice_drops,
             "Segments whose splice target socket had already closed"),
            ("msg_redirects", c.msg_redirects,
             "sendmsg() calls the sk_msg program redirected to the peer socket"),
            ("msg_redirect_bytes", c.msg_redirect_bytes,
             "Bytes the sk_msg program redirected, skipping the loopback TCP/IP stack"),
            ("msg_misses", c.msg_misses,
             "sendmsg() calls that fell back to the loopback TCP path"),
        ):
            family = CounterMetricFamily(f"nodeproxy_kernel_fastpath_{name}", doc)
            family.add_metric([], value)
            yield family

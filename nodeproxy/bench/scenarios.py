"""What is measured: scenarios, each one run of a tool that yields one or more metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodeproxy.bench import connections, enrollment, iperf, procstat, sockperf, wrk
from nodeproxy.bench.configurations import Configuration, NodeProxy
from nodeproxy.bench.model import MeasurementError, Metric, NetPath, Route, ServerKind
from nodeproxy.bench.settings import Settings
from nodeproxy.bench.topology import BenchCluster

Values = dict[str, float]


class Scenario:
    """A named measurement; ``once`` scenarios run after the rounds, a single time."""

    name = ""
    once = False
    metrics: tuple[Metric, ...] = ()

    def applies(self, configuration: Configuration) -> bool:
        return any(m.not_applicable(configuration.name, configuration.has_proxy) is None
                   for m in self.metrics)

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        """Metric key -> value, and the raw figures of the run (for the JSON)."""
        raise NotImplementedError


class Latency(Scenario):
    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"latency {path.value}"
        self.points = {
            point: Metric(f"latency.{path.value}.{point}",
                          f"L4 latency {point}, {path.label} (sockperf ping-pong)", "µs",
                          "lower")
            for point in sockperf.WANTED.values()}
        self.metrics = tuple(self.points.values())

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.SOCKPERF, self.path)
        raw = sockperf.pingpong(bench, route, settings)
        return {m.key: raw[point] for point, m in self.points.items()}, raw


class Throughput(Scenario):
    def __init__(self, path: NetPath, streams: int):
        self.path, self.streams = path, streams
        self.name = f"throughput {path.value} {streams}x"
        noun = "stream" if streams == 1 else "streams"
        self.metrics = (Metric(f"throughput.{path.value}.{streams}",
                               f"L4 throughput, {streams} {noun}, {path.label} (iperf3)",
                               "Gbit/s", "higher", digits=2),)

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.IPERF3, self.path)
        raw = iperf.throughput(bench, route, settings, self.streams)
        return {self.metrics[0].key: raw["gbps"]}, raw


def _wrk_with_proxy_cpu(route: Route, run: Callable[[], dict[str, float]],
                        metrics: tuple[Metric, ...]) -> tuple[Values, dict[str, Any]]:
    """One wrk run (saturated or paced) with the CPU the proxies on the route spent in it:
    the rps/p50/p99 values, CPU seconds per 1000 requests where there is a proxy."""
    cpu_before = {p.name: procstat.cpu_seconds(p.pid) for p in route.proxies}
    raw: dict[str, Any] = dict(run())
    cpu = {p.name: procstat.cpu_seconds(p.pid) - cpu_before[p.name] for p in route.proxies}
    raw["proxy_cpu_s"] = cpu
    m = {metric.key.rsplit(".", 1)[1]: metric.key for metric in metrics}
    values = {m["rps"]: raw["rps"], m["p50"]: raw["p50_ms"], m["p99"]: raw["p99_ms"]}
    if route.proxies:
        values[m["cpu"]] = sum(cpu.values()) / (raw["requests"] / 1000)
    return values, raw


class Http(Scenario):
    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"http {path.value}"
        p = f"http.{path.value}"
        where = path.label
        self.metrics = (
            Metric(f"{p}.rps", f"HTTP requests/s, {where} (wrk, nginx)", "req/s", "higher",
                   digits=0),
            Metric(f"{p}.p50", f"HTTP latency p50, {where}", "ms", "lower", digits=2),
            Metric(f"{p}.p99", f"HTTP latency p99, {where}", "ms", "lower", digits=2),
            Metric(f"{p}.cpu", f"proxy CPU per 1000 requests, {where}", "CPU s", "lower",
                   needs_proxy=True, digits=3),
            Metric(f"{p}.rss", f"proxy RSS after the HTTP run, {where}", "MiB", "lower",
                   needs_proxy=True),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.HTTP, self.path)
        values, raw = _wrk_with_proxy_cpu(
            route, lambda: wrk.saturate(bench, route, settings), self.metrics)
        memory = {p.name: procstat.memory_kib(p.pid) for p in route.proxies}
        rss = {name: m["VmRSS"] / 1024 for name, m in memory.items()}
        raw.update({"proxy_rss_mib": rss, "proxy_memory_kib": memory,
                    "proxy_pids": [p.pid for p in route.proxies]})
        if route.proxies:
            values[f"http.{self.path.value}.rss"] = rss[route.proxies[0].name]
        return values, raw


class HttpFixedRate(Scenario):
    """HTTP at a fixed, moderate rate: the latency a proxy adds when it is not saturated,
    and its CPU cost per request at that load."""

    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"http-rate {path.value}"
        p = f"http-rate.{path.value}"
        where = path.label
        rate = f"~{wrk.FIXED_RATE} req/s"
        self.metrics = (
            Metric(f"{p}.rps", f"HTTP at {rate}: achieved, {where}", "req/s", "higher",
                   digits=0),
            Metric(f"{p}.p50", f"HTTP at {rate}: latency p50, {where}", "ms", "lower",
                   digits=3),
            Metric(f"{p}.p99", f"HTTP at {rate}: latency p99, {where}", "ms", "lower",
                   digits=3),
            Metric(f"{p}.cpu", f"HTTP at {rate}: proxy CPU per 1000 requests, {where}",
                   "CPU s", "lower", needs_proxy=True, digits=3),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.HTTP, self.path)
        return _wrk_with_proxy_cpu(
            route, lambda: wrk.fixed_rate(bench, route, settings), self.metrics)


class ConnectRate(Scenario):
    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"connect {path.value}"
        self.metrics = (Metric(f"connect.{path.value}.rate",
                               f"new connections/s, {path.label} (connect, 25 B, 32 B, close)",
                               "conn/s", "higher", digits=0),)

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.ECHO, self.path)
        raw = connections.setup_rate(bench, route, settings)
        return {self.metrics[0].key: raw["per_s"]}, raw


class IdleConnections(Scenario):
    once = True

    def __init__(self, count: int):
        self.count = count
        self.name = "idle connections"
        self.metrics = (
            Metric("idle.open", f"open {count} concurrent connections, same node", "s",
                   "lower", digits=2),
            Metric("idle.rss", f"proxy RSS with {count} idle connections, same node", "MiB",
                   "lower", needs_proxy=True),
            Metric("idle.per_conn", "proxy memory per idle connection", "KiB", "lower",
                   needs_proxy=True, digits=2),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.ECHO, NetPath.SAME_NODE)
        raw = connections.idle_connections(bench, route, self.count)
        values = {"idle.open": raw["setup_s"]}
        if "rss_mib" in raw:
            values.update({"idle.rss": raw["rss_mib"], "idle.per_conn": raw["kib_per_conn"]})
        return values, raw


class Enrollment(Scenario):
    once = True

    def __init__(self, count: int):
        self.count = count
        self.name = "enrollment"
        only = (NodeProxy.name,)
        self.metrics = (
            Metric("enroll.total", f"enroll {count} pods (control socket, one by one)", "s",
                   "lower", only=only, digits=2),
            Metric("enroll.per_pod", "enroll one pod, median", "ms", "lower", only=only),
            Metric("enroll.rss", f"daemon RSS with {count} more pods enrolled", "MiB", "lower",
                   only=only),
            Metric("enroll.rss_per_pod", "daemon memory per enrolled pod", "KiB", "lower",
                   only=only, digits=0),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        if configuration.name != NodeProxy.name:
            raise MeasurementError("enrollment is a nodeproxy measurement")
        raw = enrollment.enroll_many(bench, self.count)
        return {"enroll.total": raw["total_s"], "enroll.per_pod": raw["ms_per_pod"],
                "enroll.rss": raw["rss_mib"], "enroll.rss_per_pod": raw["kib_per_pod"]}, raw


def build(settings: Settings) -> list[Scenario]:
    """Every scenario, in the order a round runs them (once-scenarios last)."""
    scenarios: list[Scenario] = []
    for path in NetPath:
        scenarios.append(Latency(path))
    for path in NetPath:
        for streams in settings.iperf_streams:
            scenarios.append(Throughput(path, streams))
    for path in NetPath:
        scenarios.append(Http(path))
    for path in NetPath:
        scenarios.append(HttpFixedRate(path))
    for path in NetPath:
        scenarios.append(ConnectRate(path))
    scenarios.append(IdleConnections(settings.idle_connections))
    scenarios.append(Enrollment(settings.enroll_pods))
    return scenarios

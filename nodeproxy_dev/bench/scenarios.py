"""What is measured: scenarios, each one run of a tool that yields one or more metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nodeproxy_dev.bench import (
    connections,
    enroll_scale,
    grpcload,
    h2load,
    iperf,
    noisy,
    procstat,
    sockperf,
    wrk,
)
from nodeproxy_dev.bench.configurations import (
    Configuration,
    Direct,
    HAProxyHttp,
    NodeProxy,
    NodeProxyL7,
    NodeProxyL7Full,
)
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import H2C_PORT, BenchCluster
from nodeproxy_dev.bench.vocabulary import (
    Added,
    MeasurementError,
    Metric,
    NetPath,
    RequestCounter,
    Route,
    ServerKind,
)

Values = dict[str, float]


class Scenario:
    """A named measurement; ``once`` scenarios run after the rounds, a single time.
    ``added``: figures the suite derives from ``metrics`` after the run (minus direct's)."""

    name = ""
    once = False
    metrics: tuple[Metric, ...] = ()
    added: tuple[Added, ...] = ()

    def applies(self, configuration: Configuration) -> bool:
        return any(m.not_applicable(configuration.name, configuration.has_proxy,
                                    configuration.http_only) is None
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


# nodeproxy's count of an L7 route's requests may differ from wrk's by the requests in
# flight when wrk stops (the proxy counts them, wrk does not) and by this share.
COUNT_TOLERANCE = 0.03
COUNT_SETTLE_S = 2.0  # how long the requests in flight at wrk's end may take to be counted


def _requests_counted(bench: BenchCluster, counter: RequestCounter | None) -> float | None:
    return None if counter is None else bench.requests_counted(counter.node, counter.service)


def check_request_count(counter: RequestCounter, counted: float, requests: float,
                        in_flight: int) -> str | None:
    """Why nodeproxy's request count does not fit the configuration's claim, or None.

    L7: every request wrk completed was counted, and at most the ones in flight at its
    end more (within COUNT_TOLERANCE).  L4: none was (the bytes were not parsed)."""
    if not counter.parsed:
        if counted:
            return (f"{counted:.0f} of the requests were parsed by nodeproxy "
                    "(istio_requests_total grew), yet this configuration claims L4")
        return None
    low = requests * (1 - COUNT_TOLERANCE)
    high = requests * (1 + COUNT_TOLERANCE) + in_flight
    if not low <= counted <= high:
        return (f"nodeproxy counted {counted:.0f} requests to {counter.service} "
                f"(istio_requests_total) where wrk completed {requests:.0f}: the requests "
                "did not all take the L7 path")
    return None


def _load_with_proxy_cpu(bench: BenchCluster, route: Route, run: Callable[[], dict[str, float]],
                        metrics: tuple[Metric, ...],
                        in_flight: int) -> tuple[Values, dict[str, Any]]:
    """One load run (wrk saturated or paced, h2load, the gRPC client) with the CPU the
    proxies on the route spent in it:
    the rps/p50/p99 values, CPU seconds per 1000 requests where there is a proxy, and
    requests per proxy CPU-second (rps per core busy) where the scenario has that figure.

    Where nodeproxy is on the route, its istio_requests_total for the service is read
    before and after (outside the CPU window): an L7 configuration's figures count only
    if it counted wrk's requests, an L4 one's only if it parsed none."""
    counted_before = _requests_counted(bench, route.counter)
    cpu_before = {p.name: procstat.cpu_seconds(p.pid) for p in route.proxies}
    raw: dict[str, Any] = dict(run())
    cpu = {p.name: procstat.cpu_seconds(p.pid) - cpu_before[p.name] for p in route.proxies}
    raw["proxy_cpu_s"] = cpu
    m = {metric.key.rsplit(".", 1)[1]: metric.key for metric in metrics}
    values = {m["rps"]: raw["rps"], m["p50"]: raw["p50_ms"], m["p99"]: raw["p99_ms"]}
    if route.proxies:
        cpu_total = sum(cpu.values())
        raw["proxy_cores"] = cpu_total / raw["duration_s"]
        values[m["cpu"]] = cpu_total / (raw["requests"] / 1000)
        if "rps_per_core" in m:
            if cpu_total <= 0:
                raise MeasurementError("the proxies used no measurable CPU time")
            values[m["rps_per_core"]] = raw["requests"] / cpu_total
    if route.counter is not None and counted_before is not None:
        counter, requests = route.counter, raw["requests"]
        deadline = time.monotonic() + COUNT_SETTLE_S
        while True:
            counted = _requests_counted(bench, counter) or 0.0
            counted -= counted_before
            if not counter.parsed or counted >= requests or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raw["proxy_requests_counted"] = counted
        raw["proxy_requests_counted_by"] = {"node": counter.node, "service": counter.service,
                                            "parsed": counter.parsed}
        problem = check_request_count(counter, counted, requests, in_flight)
        if problem:
            raise MeasurementError(problem)
    return values, raw


class Http(Scenario):
    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"http {path.value}"
        p = f"http.{path.value}"
        where = path.label
        self.metrics = (
            Metric(f"{p}.rps", f"HTTP requests/s, {where} (wrk, nginx)", "req/s", "higher",
                   digits=0, http=True),
            Metric(f"{p}.p50", f"HTTP latency p50, {where}", "ms", "lower", digits=2,
                   http=True),
            Metric(f"{p}.p99", f"HTTP latency p99, {where}", "ms", "lower", digits=2,
                   http=True),
            Metric(f"{p}.cpu", f"proxy CPU per 1000 requests, {where}", "CPU s", "lower",
                   needs_proxy=True, digits=3, http=True),
            Metric(f"{p}.rps_per_core",
                   f"HTTP requests/s per proxy CPU core (requests per CPU-second), {where}",
                   "req/s/core", "higher", needs_proxy=True, digits=0, http=True),
            Metric(f"{p}.rss", f"proxy RSS after the HTTP run, {where}", "MiB", "lower",
                   needs_proxy=True, http=True),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.HTTP, self.path)
        values, raw = _load_with_proxy_cpu(
            bench, route, lambda: wrk.saturate(bench, route, settings), self.metrics,
            settings.wrk_connections)
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
                   digits=0, http=True),
            Metric(f"{p}.p50", f"HTTP at {rate}: latency p50, {where}", "ms", "lower",
                   digits=3, http=True),
            Metric(f"{p}.p99", f"HTTP at {rate}: latency p99, {where}", "ms", "lower",
                   digits=3, http=True),
            Metric(f"{p}.cpu", f"HTTP at {rate}: proxy CPU per 1000 requests, {where}",
                   "CPU s", "lower", needs_proxy=True, digits=3, http=True),
        )
        # The latency the proxy adds: its percentile minus direct's, same round and block.
        self.added = tuple(
            Added(Metric(f"{p}.{point}_added",
                         f"HTTP at {rate}: added latency {point} (− direct's), {where}", "ms",
                         "lower", needs_proxy=True, digits=3, http=True),
                  of=f"{p}.{point}")
            for point in ("p50", "p99"))

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.HTTP, self.path)
        return _load_with_proxy_cpu(
            bench, route, lambda: wrk.fixed_rate(bench, route, settings), self.metrics,
            wrk.FIXED_RATE_CONNECTIONS)


def _load_metrics(prefix: str, noun: str, tool: str, where: str, only: tuple[str, ...]
                  ) -> tuple[Metric, ...]:
    """rate, p50, p99, proxy CPU per 1000 and per CPU-second of one L7 load scenario."""
    def metric(key: str, title: str, unit: str, better: str, digits: int,
               needs_proxy: bool = False) -> Metric:
        return Metric(f"{prefix}.{key}", title, unit, better, needs_proxy=needs_proxy,
                      only=only, digits=digits, http=True)
    return (
        metric("rps", f"{noun}/s, {where} ({tool})", f"{noun}/s", "higher", 0),
        metric("p50", f"{noun} latency p50, {where} ({tool})", "ms", "lower", 2),
        metric("p99", f"{noun} latency p99, {where} ({tool})", "ms", "lower", 2),
        metric("cpu", f"proxy CPU per 1000 {noun}, {where} ({tool})", "CPU s", "lower", 3,
               needs_proxy=True),
        metric("rps_per_core", f"{noun} per proxy CPU-second, {where} ({tool})",
               f"{noun}/s/core", "higher", 0, needs_proxy=True),
    )


class Http2(Scenario):
    """HTTP/2 from the client (h2load, prior knowledge) at saturation, to the nginx file:
    nodeproxy-l7 (and -full) take HTTP/2 on the HTTP service (``appProtocol: http``) and
    send HTTP/1.1 to nginx, as haproxy-http does (its mode http frontend sees the
    preface); direct speaks HTTP/2 to nginx itself (its h2c port)."""

    CONFIGURATIONS = (Direct.name, NodeProxyL7.name, NodeProxyL7Full.name, HAProxyHttp.name)

    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"http2 {path.value}"
        self.metrics = _load_metrics(f"http2.{path.value}", "HTTP/2 requests", "h2load",
                                     path.label, self.CONFIGURATIONS)

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.HTTP, self.path)
        if not configuration.has_proxy:
            route = replace(route, port=H2C_PORT)  # nginx's own HTTP/2
        h2load.check_bytes(bench, route, settings)
        return _load_with_proxy_cpu(
            bench, route, lambda: h2load.saturate(bench, route, settings), self.metrics,
            settings.h2_connections * settings.h2_streams)


class GrpcUnary(Scenario):
    """gRPC unary calls (bench/grpcunary.py: a bounded count, a fixed number in flight on
    one channel) to the gRPC server: nodeproxy-l7 on the ``appProtocol: grpc`` service
    (parsed, counted, HTTP/2 upstream), haproxy-http's HTTP/2 listener (``proto h2`` both
    sides), and direct.  nodeproxy-l7-full is left out: its authorization policy allows
    GET under /bench/ only, which a gRPC call is not."""

    CONFIGURATIONS = (Direct.name, NodeProxyL7.name, HAProxyHttp.name)

    def __init__(self, path: NetPath):
        self.path = path
        self.name = f"grpc {path.value}"
        self.metrics = _load_metrics(f"grpc.{path.value}", "gRPC calls", "unary",
                                     path.label, self.CONFIGURATIONS)

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.GRPC, self.path)
        return _load_with_proxy_cpu(
            bench, route, lambda: grpcload.unary(bench, route, settings), self.metrics,
            settings.grpc_concurrency)


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


class SustainedConnect(Scenario):
    """The connect scenario's short connections back to back for a minute (full profile),
    the rate taken per window: a proxy whose per-connection cost grows with the sockets
    earlier connections left behind (bound, TIME_WAIT) shows a falling rate, which a
    3-second run cannot.  Once, after the rounds: a minute per configuration and path."""

    once = True

    def __init__(self, path: NetPath, settings: Settings):
        self.path = path
        self.name = f"sustained connect {path.value}"
        p = f"sustained.{path.value}"
        span = f"{settings.sustained_seconds:.0f} s, per {settings.sustained_window:.0f} s"
        self.metrics = (
            Metric(f"{p}.rate", f"new connections/s held for {span} window: median window, "
                   f"{path.label}", "conn/s", "higher", digits=0),
            Metric(f"{p}.held", f"new connections/s held for {span} window: last third's "
                   f"median window ÷ first third's, {path.label}", "×", "higher", digits=2),
            Metric(f"{p}.lowest", f"new connections/s held for {span} window: lowest window "
                   f"÷ median window, {path.label}", "×", "higher", digits=2),
            Metric(f"{p}.failed", f"new connections held for {span} window: failed, "
                   f"{path.label}", "conns", "lower", digits=0),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.ECHO, self.path)
        raw = connections.sustained_rate(bench, route, settings)
        rate, held, lowest, failed = (m.key for m in self.metrics)
        return {rate: raw["median_per_s"], held: raw["held_ratio"],
                lowest: raw["lowest_ratio"], failed: raw["failed"]}, raw


class IdleConnections(Scenario):
    """Open ``count`` connections 64 at a time and hold them idle.  Same node the figures
    keep their first keys (idle.open, idle.rss, idle.per_conn); cross node they are
    idle.cross-node.*, the RSS that of the client's node proxy."""

    once = True

    def __init__(self, count: int, path: NetPath = NetPath.SAME_NODE):
        self.count, self.path = count, path
        self.name = ("idle connections" if path is NetPath.SAME_NODE
                     else f"idle connections {path.value}")
        p = "idle" if path is NetPath.SAME_NODE else f"idle.{path.value}"
        self.keys = {"open": f"{p}.open", "rss": f"{p}.rss", "per_conn": f"{p}.per_conn"}
        where = path.label
        self.metrics = (
            Metric(self.keys["open"], f"open {count} concurrent connections, {where}", "s",
                   "lower", digits=2),
            Metric(self.keys["rss"], f"proxy RSS with {count} idle connections, {where}",
                   "MiB", "lower", needs_proxy=True),
            Metric(self.keys["per_conn"], f"proxy memory per idle connection, {where}", "KiB",
                   "lower", needs_proxy=True, digits=2),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.ECHO, self.path)
        raw = connections.idle_connections(bench, route, self.count)
        values = {self.keys["open"]: raw["setup_s"]}
        if "rss_mib" in raw:
            values.update({self.keys["rss"]: raw["rss_mib"],
                           self.keys["per_conn"]: raw["kib_per_conn"]})
        return values, raw


class ConnectionCapacity(Scenario):
    """How many concurrent connections one proxy holds on this machine: opened a step at
    a time and kept open until the route refuses one, a step slows down, or the cap
    (connections.capacity).  Same node, once; the reason it stopped is in the notes."""

    once = True

    def __init__(self) -> None:
        self.name = "connection capacity"
        self.metrics = (
            Metric("capacity.held", "concurrent connections held until one is refused, a "
                   f"step slows {connections.CAPACITY_SLOW_FACTOR:g}× or the cap, same node",
                   "conns", "higher", digits=0),
            Metric("capacity.slowdown", "connection capacity: the last step's time per "
                   "connection ÷ the earlier steps' median, same node", "×", "lower",
                   digits=2),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        route = configuration.route(bench, ServerKind.ECHO, NetPath.SAME_NODE)
        raw = connections.capacity(bench, route, settings)
        held, slowdown = (m.key for m in self.metrics)
        return {held: float(raw["held"]), slowdown: float(raw["slowdown"])}, raw


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
        raw = enroll_scale.enroll_many(bench, self.count)
        return {"enroll.total": raw["total_s"], "enroll.per_pod": raw["ms_per_pod"],
                "enroll.rss": raw["rss_mib"], "enroll.rss_per_pod": raw["kib_per_pod"]}, raw


class NoisyNeighbour(Scenario):
    """The quiet client's HTTP at ~1000 req/s alone, then while a hostile pod on the same
    node attacks the same proxy (``noisy``).  Once, after the other scale scenarios: an
    attack may leave state behind (pooled connections, memory) that no other figure
    should see.  nodeproxy with the quiet pod's HTTP relayed as bytes and spliced
    (nodeproxy-splice: the product's default capture and fast path) and parsed at L7
    (nodeproxy-l7), and HAProxy in mode http (haproxy-http) as the reference; the attack
    is the same for all (an HTTP service of the attacker's own on the same proxy)."""

    once = True
    CONFIGURATIONS = (NodeProxy.name, NodeProxyL7.name, HAProxyHttp.name)

    def __init__(self, settings: Settings):
        self.name = "noisy neighbour"
        only = self.CONFIGURATIONS
        rate = f"~{wrk.FIXED_RATE} req/s"

        def metric(key: str, title: str, unit: str, better: str, digits: int = 1) -> Metric:
            return Metric(f"noisy.{key}", f"noisy neighbour: {title}", unit, better,
                          only=only, digits=digits, http=True)

        self.metrics = (
            metric("baseline.success", f"quiet pod's HTTP at {rate} alone, success", "%",
                   "higher", digits=2),
            metric("baseline.p99", "quiet pod's p99 alone", "ms", "lower", digits=3),
            metric("baseline.rps", "quiet pod's achieved rate alone", "req/s", "higher",
                   digits=0),
            metric("attack.success", "quiet pod's success under attack", "%", "higher",
                   digits=2),
            metric("attack.p99", "quiet pod's p99 under attack", "ms", "lower", digits=3),
            metric("attack.rps", "quiet pod's achieved rate under attack", "req/s", "higher",
                   digits=0),
            metric("attack.max", "quiet pod's slowest request under attack", "ms", "lower",
                   digits=0),
            metric("p99_ratio", "quiet pod's p99 under attack ÷ alone", "×", "lower",
                   digits=2),
            metric("baseline.cpu", "proxy CPU, quiet pod alone", "cores", "lower",
                   digits=2),
            metric("attack.cpu", "proxy CPU under attack", "cores", "lower", digits=2),
            metric("attack.rss", "proxy peak RSS under attack", "MiB", "lower"),
            metric("rss_growth", "proxy peak RSS growth, attack − alone", "MiB", "lower"),
            # What the proxy did to the attacker (it pushes back: fewer pairs got through,
            # more GOAWAYs, fewer connections held).
            metric("attacker.pairs", "attacker's HTTP/2 HEADERS+RST_STREAM pairs sent",
                   "pairs", "lower", digits=0),
            metric("attacker.goaways", "attacker's HTTP/2 connections ended by GOAWAY",
                   "conns", "higher", digits=0),
            metric("attacker.held", "attacker's flood and slowloris connections open at "
                   "the end", "conns", "lower", digits=0),
        )

    def measure(self, bench: BenchCluster, configuration: Configuration,
                settings: Settings) -> tuple[Values, dict[str, Any]]:
        if configuration.name not in self.CONFIGURATIONS:
            raise MeasurementError(f"the noisy neighbour is not measured for "
                                   f"{configuration.name}")
        route = configuration.route(bench, ServerKind.HTTP, NetPath.SAME_NODE)
        raw = noisy.measure(bench, route, settings, meshed=configuration.uses_mesh)
        baseline, attack = raw["baseline"], raw["attack"]
        values = {
            "noisy.baseline.success": baseline["success_percent"],
            "noisy.baseline.p99": baseline["p99_ms"],
            "noisy.baseline.rps": baseline["rps"],
            "noisy.attack.success": attack["success_percent"],
            "noisy.attack.p99": attack["p99_ms"],
            "noisy.attack.rps": attack["rps"],
            "noisy.attack.max": attack["max_ms"],
            "noisy.baseline.cpu": baseline["proxy_cores"],
            "noisy.attack.cpu": attack["proxy_cores"],
            "noisy.attack.rss": attack["proxy_rss_peak_mib"],
            "noisy.rss_growth": raw["rss_growth_mib"],
        }
        if "p99_ratio" in raw:
            values["noisy.p99_ratio"] = raw["p99_ratio"]
        # An attack tool cancelled at its own bound has no report: those figures are
        # missing, with the reason, the quiet pod's are not.
        rapid, flood, slow = (raw["attacks"][k] for k in ("rapid-reset", "flood", "slowloris"))
        if "sent" in rapid:
            values["noisy.attacker.pairs"] = rapid["sent"]
            values["noisy.attacker.goaways"] = rapid["goaway"]
        if "open_at_end" in flood and "open_at_end" in slow:
            values["noisy.attacker.held"] = flood["open_at_end"] + slow["open_at_end"]
        return values, raw


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
        scenarios.append(Http2(path))
    for path in NetPath:
        scenarios.append(GrpcUnary(path))
    for path in NetPath:
        scenarios.append(ConnectRate(path))
    for path in NetPath:
        scenarios.append(SustainedConnect(path, settings))
    for path in NetPath:
        scenarios.append(IdleConnections(settings.idle_connections, path))
    scenarios.append(ConnectionCapacity())
    scenarios.append(Enrollment(settings.enroll_pods))
    scenarios.append(NoisyNeighbour(settings))
    return scenarios

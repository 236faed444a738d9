"""The project's performance targets, checked against one run's figures.

Each target is a comparison between configurations measured side by side in the
same run (ratios, differences), never an absolute number from another machine.
A target whose figures are missing (a configuration unavailable, a figure not
measured) is reported as such, with the reason, not as met or missed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeproxy_dev.bench import noisy

# (metric key, configuration[, statistic]) -> that configuration's median of the figure, or
# with statistic "min" its lowest sample (a round); None where there is no figure.
Medians = Callable[..., float | None]


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    check: Callable[[Medians], tuple[str, bool] | None]  # (measured, met) or None


def _added(m: Medians, key: str, config: str) -> float | None:
    value, direct = m(key, config), m(key, "direct")
    return None if value is None or direct is None else value - direct


def _splice_latency(m: Medians) -> tuple[str, bool] | None:
    added = _added(m, "latency.same-node.p50", "nodeproxy-splice")
    return None if added is None else (f"{added:+.1f} µs", added <= 10.0)


def _splice_vs_pump(m: Medians) -> tuple[str, bool] | None:
    splice = _added(m, "latency.same-node.p50", "nodeproxy-splice")
    pump = _added(m, "latency.same-node.p50", "nodeproxy-nosplice")
    if splice is None or pump is None:
        return None
    return f"splice {splice:+.1f} µs, pump {pump:+.1f} µs", splice <= 0.5 * pump


def _splice_throughput(streams: int) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        key = f"throughput.same-node.{streams}"
        value, direct = m(key, "nodeproxy-splice"), m(key, "direct")
        if value is None or not direct:
            return None
        return f"{value / direct:.2f}× direct", value >= 0.9 * direct
    return check


def _ebpf_vs_iptables(m: Medians) -> tuple[str, bool] | None:
    ebpf = _added(m, "latency.same-node.p50", "nodeproxy-nosplice")
    iptables = _added(m, "latency.same-node.p50", "nodeproxy-iptables")
    if ebpf is None or iptables is None:
        return None
    return f"eBPF {ebpf:+.1f} µs, iptables {iptables:+.1f} µs", ebpf < iptables


def _rss(key: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        value = m(key, "nodeproxy-splice")
        return None if value is None else (f"{value:.0f} MiB", value <= 80.0)
    return check


def _l7_against_haproxy(m: Medians) -> tuple[str, bool] | None:
    """Requests per proxy CPU-second of nodeproxy-l7 against haproxy-http's, same node, at
    saturation: ≥ ½ of HAProxy's, i.e. at most twice its CPU per 1000 requests."""
    l7, ha = (m("http.same-node.cpu", c) for c in ("nodeproxy-l7", "haproxy-http"))
    if l7 is None or ha is None or l7 <= 0:
        return None
    return (f"{ha / l7:.2f}× HAProxy's requests per CPU-second ({l7:.3f} vs {ha:.3f} CPU s "
            "per 1000 requests)", l7 <= 2.0 * ha)


def _l7_cpu(m: Medians) -> tuple[str, bool] | None:
    value = m("http.same-node.cpu", "nodeproxy-l7")
    return None if value is None else (f"{value:.3f} CPU s", value <= 0.1)


FEATURES_BOUND = 1.15  # issue 18: every feature on costs at most 15% more per request


def _over_l7(config: str) -> Callable[[Medians], tuple[str, bool] | None]:
    """What `config`'s features cost per request over nodeproxy-l7, same node, at
    saturation: at most FEATURES_BOUND times nodeproxy-l7's CPU per request."""
    def check(m: Medians) -> tuple[str, bool] | None:
        more, l7 = m("http.same-node.cpu", config), m("http.same-node.cpu", "nodeproxy-l7")
        if more is None or l7 is None or l7 <= 0:
            return None
        return (f"{more / l7:.2f}× nodeproxy-l7's CPU per request ({more:.3f} vs {l7:.3f} "
                "CPU s per 1000 requests)", more <= FEATURES_BOUND * l7)
    return check


# Issue 18: the latency nodeproxy-l7 adds at ~1000 req/s (wrk paced: each of 10
# connections waits 10 ms between a response and its next request), p99 over direct's of
# the same round, in ms.
ADDED_P99_BOUND_MS = {"same-node": 0.5, "cross-node": 0.8}


def _added_p99(path: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        added = m(f"http-rate.{path}.p99_added", "nodeproxy-l7")
        if added is None:
            return None
        p50 = m(f"http-rate.{path}.p50_added", "nodeproxy-l7")
        shown = f"{added:+.3f} ms" + (f" (p50 {p50:+.3f} ms)" if p50 is not None else "")
        return shown, added <= ADDED_P99_BOUND_MS[path]
    return check


def _against_haproxy(key: str, noun: str) -> Callable[[Medians], tuple[str, bool] | None]:
    """nodeproxy-l7's requests (calls) per proxy CPU-second against haproxy-http's, from
    the CPU per 1000 of ``key``: ≥ ½ of HAProxy's, issue 18's bound for HTTP/1.1."""
    def check(m: Medians) -> tuple[str, bool] | None:
        l7, ha = (m(key, c) for c in ("nodeproxy-l7", "haproxy-http"))
        if l7 is None or ha is None or l7 <= 0:
            return None
        return (f"{ha / l7:.2f}× HAProxy's {noun} per CPU-second ({l7:.3f} vs {ha:.3f} "
                f"CPU s per 1000 {noun})", l7 <= 2.0 * ha)
    return check


# Connection scale: nodeproxy as shipped (eBPF capture, splice) against HAProxy in mode tcp,
# the same clients and servers, the same run.
SCALE_CONFIGURATION = "nodeproxy-splice"


def _rate_against_haproxy(key: str, factor: float) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        ours, theirs = m(key, SCALE_CONFIGURATION), m(key, "haproxy")
        if ours is None or not theirs:
            return None
        return (f"{ours / theirs:.2f}× HAProxy's ({ours:.0f} vs {theirs:.0f} conn/s)",
                ours >= factor * theirs)
    return check


def _no_low_round(key: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        median, lowest = m(key, SCALE_CONFIGURATION), m(key, SCALE_CONFIGURATION, "min")
        if median is None or lowest is None or median <= 0:
            return None
        return (f"lowest round {lowest / median:.2f}× the median ({lowest:.0f} vs "
                f"{median:.0f} conn/s)", lowest >= 0.8 * median)
    return check


def _sustained(path: str) -> Callable[[Medians], tuple[str, bool] | None]:
    """The rate held over the minute: the last third's median window ≥ 0.8× the first
    third's (single windows are too noisy on a shared machine: direct's own lowest window
    is often below 0.8× its median), and no connection failed."""
    def check(m: Medians) -> tuple[str, bool] | None:
        held = m(f"sustained.{path}.held", SCALE_CONFIGURATION)
        lowest = m(f"sustained.{path}.lowest", SCALE_CONFIGURATION)
        rate = m(f"sustained.{path}.rate", SCALE_CONFIGURATION)
        failed = m(f"sustained.{path}.failed", SCALE_CONFIGURATION)
        if held is None or rate is None:
            return None
        shown = f"last third {held:.2f}× the first ({rate:.0f} conn/s median window"
        shown += f", lowest window {lowest:.2f}× it)" if lowest is not None else ")"
        if failed:
            shown += f", {failed:.0f} connections failed"
        return shown, held >= 0.8 and not failed
    return check


def _open_against_haproxy(key: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        ours, theirs = m(key, SCALE_CONFIGURATION), m(key, "haproxy")
        if ours is None or not theirs:
            return None
        return (f"{ours / theirs:.2f}× HAProxy's time ({ours:.2f} s vs {theirs:.2f} s)",
                ours <= 2.0 * theirs)
    return check


def _per_connection_against_haproxy(key: str) -> Callable[[Medians], tuple[str, bool] | None]:
    """Issue 16: what one more idle proxied connection adds to the proxy's resident set,
    against HAProxy's in the same run (its RSS growth over the connections opened)."""
    def check(m: Medians) -> tuple[str, bool] | None:
        ours, theirs = m(key, SCALE_CONFIGURATION), m(key, "haproxy")
        if ours is None or not theirs:
            return None
        return (f"{ours / theirs:.2f}× HAProxy's ({ours:.2f} vs {theirs:.2f} KiB)",
                ours <= theirs)
    return check


def scale_targets(idle_connections: str = "10,000 (fewer where the open-file limit says so: "
                                          "see the notes)") -> tuple[Target, ...]:
    """Issue 16's connection-scale targets, for nodeproxy-splice against haproxy."""
    out: list[Target] = []
    for path, label, factor in (("same-node", "same node", 0.9), ("cross-node",
                                                                  "cross node (HBONE)", 0.8)):
        out += [
            Target(f"new connections/s, {label}, against HAProxy tcp",
                   f"≥ {factor}× HAProxy's", _rate_against_haproxy(f"connect.{path}.rate",
                                                                   factor)),
            Target(f"new connections/s, {label}: no cliff over the rounds",
                   "no round below 0.8× the median", _no_low_round(f"connect.{path}.rate")),
            Target(f"sustained connect, {label}: no cliff as sockets pile up",
                   "the last third's rate ≥ 0.8× the first third's, none failed",
                   _sustained(path)),
        ]
    out += [
        Target(f"open {idle_connections} concurrent connections, same node",
               "≤ 2× HAProxy's time", _open_against_haproxy("idle.open")),
        Target(f"open {idle_connections} concurrent connections, cross node",
               "≤ 2× HAProxy's time", _open_against_haproxy("idle.cross-node.open")),
        Target("proxy memory per idle connection, same node", "≤ HAProxy's",
               _per_connection_against_haproxy("idle.per_conn")),
    ]
    return tuple(out)


# Cross-node traffic rides HBONE (issue 17): nodeproxy as shipped at L4, cross node,
# against direct in the same run.
HBONE_CONFIGURATION = "nodeproxy-splice"


def _hbone_throughput(streams: int, factor: float
                      ) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        key = f"throughput.cross-node.{streams}"
        value, direct = m(key, HBONE_CONFIGURATION), m(key, "direct")
        if value is None or not direct:
            return None
        return (f"{value / direct:.2f}× direct ({value:.2f} vs {direct:.2f} Gbit/s)",
                value >= factor * direct)
    return check


def _hbone_latency(m: Medians) -> tuple[str, bool] | None:
    added = _added(m, "latency.cross-node.p50", HBONE_CONFIGURATION)
    return None if added is None else (f"{added:+.1f} µs", added <= 40.0)


def _hbone_paced_p99(m: Medians) -> tuple[str, bool] | None:
    added = m("http-rate.cross-node.p99_added", HBONE_CONFIGURATION)
    return None if added is None else (f"{added:+.3f} ms", added <= 0.3)


def _hbone_http_cpu(m: Medians) -> tuple[str, bool] | None:
    value = m("http.cross-node.cpu", HBONE_CONFIGURATION)
    return None if value is None else (f"{value:.3f} CPU s", value <= 0.03)


def hbone_targets() -> tuple[Target, ...]:
    """Issue 17's cross-node (HBONE) targets, for nodeproxy-splice against direct."""
    return (
        Target("cross-node throughput over HBONE, 1 stream", "≥ 0.5× direct",
               _hbone_throughput(1, 0.5)),
        Target("cross-node throughput over HBONE, 8 streams", "≥ 0.4× direct",
               _hbone_throughput(8, 0.4)),
        Target("cross-node L4 latency over HBONE (ping-pong)", "added p50 ≤ 40 µs over direct",
               _hbone_latency),
        Target("HTTP through L4 cross node at the paced rate (HBONE)",
               "added p99 ≤ 0.3 ms over direct", _hbone_paced_p99),
        Target("HTTP relayed through L4 cross node, saturated: CPU of both node proxies",
               "≤ 0.03 CPU s per 1000 requests", _hbone_http_cpu),
    )


NOISY_CONFIGURATIONS = ("nodeproxy-splice", "nodeproxy-l7")


def _noisy_success(config: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        value, alone = m("noisy.attack.success", config), m("noisy.baseline.success", config)
        if value is None:
            return None
        return (f"{value:.2f} % (alone: {alone:.2f} %)" if alone is not None
                else f"{value:.2f} %"), value >= 100.0
    return check


def _noisy_p99(config: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        ratio = m("noisy.p99_ratio", config)
        attack, alone = m("noisy.attack.p99", config), m("noisy.baseline.p99", config)
        if ratio is None or attack is None or alone is None:
            return None
        return f"{ratio:.2f}× ({attack:.2f} ms against {alone:.2f} ms)", ratio <= 2.0
    return check


def _noisy_rss(config: str) -> Callable[[Medians], tuple[str, bool] | None]:
    def check(m: Medians) -> tuple[str, bool] | None:
        growth, peak = m("noisy.rss_growth", config), m("noisy.attack.rss", config)
        if growth is None:
            return None
        shown = f"{growth:+.1f} MiB" + (f" (peak {peak:.0f} MiB)" if peak is not None else "")
        return shown, growth <= noisy.rss_growth_bound_mib()
    return check


def noisy_targets() -> tuple[Target, ...]:
    """The noisy-neighbour targets, for each nodeproxy configuration the scenario runs."""
    bound = (f"≤ {noisy.rss_growth_bound_mib():.0f} MiB over the phase alone "
             f"({noisy.HELD_CONNECTIONS} connections held × {noisy.RSS_PER_HELD_KIB} KiB "
             f"+ {noisy.RSS_MARGIN_MIB} MiB)")
    out: list[Target] = []
    for config in NOISY_CONFIGURATIONS:
        where = f"noisy neighbour ({config}): "
        out += [
            Target(where + "quiet pod's success while another pod attacks the node proxy",
                   "100 %", _noisy_success(config)),
            Target(where + "quiet pod's p99 under attack", "≤ 2× its p99 alone, same run",
                   _noisy_p99(config)),
            Target(where + "daemon memory under attack", bound, _noisy_rss(config)),
        ]
    return tuple(out)


TARGETS = (
    Target("same-node L4 latency with splice", "added p50 ≤ 10 µs over direct",
           _splice_latency),
    Target("splice against the userspace pump", "added p50 ≤ ½ of the pump's",
           _splice_vs_pump),
    Target("same-node throughput with splice, 1 stream", "≥ 0.9× direct",
           _splice_throughput(1)),
    Target("same-node throughput with splice, 8 streams", "≥ 0.9× direct",
           _splice_throughput(8)),
    Target("eBPF capture against iptables capture (same pump)", "eBPF adds less latency",
           _ebpf_vs_iptables),
    Target("daemon memory with many pods enrolled", "RSS ≤ 80 MiB", _rss("enroll.rss")),
    Target("daemon memory with idle connections", "RSS ≤ 80 MiB", _rss("idle.rss")),
    Target("L7 HTTP/1.1 CPU per request against HAProxy http (nodeproxy-l7: routing, "
           "retries, metrics; same node, saturated)",
           "≥ 0.5× HAProxy's requests per CPU-second (≤ 2× its CPU per 1000 requests)",
           _l7_against_haproxy),
    Target("L7 HTTP/1.1 CPU per 1000 requests (nodeproxy-l7, same node, saturated)",
           "≤ 0.1 CPU s", _l7_cpu),
    Target("L7 HTTP/1.1 CPU per request with authorization, rate limit, fault, outlier "
           "detection and 1% tracing on (nodeproxy-l7-full against nodeproxy-l7)",
           f"≤ {FEATURES_BOUND}× nodeproxy-l7's", _over_l7("nodeproxy-l7-full")),
    Target("L7 HTTP/1.1 CPU per request with an HTTP authorization policy alone "
           "(nodeproxy-l7-authz against nodeproxy-l7, same node: the source node checks)",
           f"≤ {FEATURES_BOUND}× nodeproxy-l7's (what the whole bundle may cost)",
           _over_l7("nodeproxy-l7-authz")),
    Target("L7 HTTP/1.1 added latency p99 at ~1000 req/s, same node (nodeproxy-l7)",
           f"≤ {ADDED_P99_BOUND_MS['same-node']} ms over direct", _added_p99("same-node")),
    Target("L7 HTTP/1.1 added latency p99 at ~1000 req/s, cross node (nodeproxy-l7)",
           f"≤ {ADDED_P99_BOUND_MS['cross-node']} ms over direct", _added_p99("cross-node")),
    Target("L7 HTTP/2 CPU per request against HAProxy http (h2load, prior knowledge, "
           "HTTP/1.1 to nginx; nodeproxy-l7, same node, saturated)",
           "≥ 0.5× HAProxy's requests per CPU-second (HTTP/1.1's bound)",
           _against_haproxy("http2.same-node.cpu", "requests")),
    Target("L7 gRPC unary CPU per call against HAProxy http (HTTP/2 both sides; "
           "nodeproxy-l7, same node)",
           "≥ 0.5× HAProxy's calls per CPU-second (HTTP/1.1's bound)",
           _against_haproxy("grpc.same-node.cpu", "calls")),
    *scale_targets(),
    *hbone_targets(),
    *noisy_targets(),
)

# What the suite cannot judge yet, said in the report rather than left out: (target,
# why) pairs.
NOT_MEASURABLE: tuple[tuple[str, str], ...] = ()


def evaluate(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target with its measured figure and whether it is met (None: no figure)."""
    by_key = {entry["key"]: entry["results"] for entry in metrics}

    def median(key: str, config: str, statistic: str = "median") -> float | None:
        result = by_key.get(key, {}).get(config) or {}
        if not result.get("available") or not result.get("n"):
            return None
        return float(result[statistic])

    out = []
    for target in TARGETS:
        outcome = target.check(median)
        out.append({"target": target.name, "goal": target.goal,
                    "measured": outcome[0] if outcome else "no figure in this run",
                    "met": outcome[1] if outcome else None})
    out += [{"target": name, "goal": "", "measured": f"not measurable: {why}", "met": None}
            for name, why in NOT_MEASURABLE]
    return out


def markdown(results: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Targets (from the figures above):", "", "| target | goal | measured | met |",
             "|---|---|---|---|"]
    for r in results:
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['target']} | {r['goal']} | {r['measured']} | {met} |")
    return lines

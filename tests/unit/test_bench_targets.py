"""The performance targets are judged from one run's medians, and say when they cannot be."""

from __future__ import annotations

from typing import Any

import pytest

from nodeproxy_dev.bench import noisy, targets


def entry(key: str, **medians: float | None) -> dict[str, Any]:
    return {"key": key, "results": {
        name: {"available": True, "n": 0 if value is None else 5, "median": value}
        for name, value in medians.items()}}


def by_name(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["target"]: r for r in results}


def test_latency_targets_compare_added_latency_within_the_run() -> None:
    metrics = [entry("latency.same-node.p50", direct=70.0, **{
        "nodeproxy-splice": 76.0, "nodeproxy-nosplice": 80.0, "nodeproxy-iptables": 95.0})]
    r = by_name(targets.evaluate(metrics))
    assert r["same-node L4 latency with splice"]["met"] is True
    assert r["same-node L4 latency with splice"]["measured"] == "+6.0 µs"
    assert r["splice against the userspace pump"]["met"] is False  # 6 > 10 / 2
    assert r["eBPF capture against iptables capture (same pump)"]["met"] is True


def test_throughput_and_memory_targets() -> None:
    metrics = [entry("throughput.same-node.1", direct=10.0, **{"nodeproxy-splice": 9.5}),
               entry("throughput.same-node.8", direct=10.0, **{"nodeproxy-splice": 8.0}),
               entry("enroll.rss", **{"nodeproxy-splice": 79.0}),
               entry("idle.rss", **{"nodeproxy-splice": 300.0})]
    r = by_name(targets.evaluate(metrics))
    assert r["same-node throughput with splice, 1 stream"]["met"] is True
    assert r["same-node throughput with splice, 8 streams"]["met"] is False
    assert r["daemon memory with many pods enrolled"]["met"] is True
    assert r["daemon memory with idle connections"]["met"] is False


def test_memory_per_idle_connection_is_judged_against_haproxys_in_the_run() -> None:
    """Issue 16: at most HAProxy's KiB per idle connection, from the same run."""
    for ours, met in ((4.16, False), (3.47, True), (2.9, True)):
        r = by_name(targets.evaluate([entry("idle.per_conn", haproxy=3.47,
                                            **{"nodeproxy-splice": ours})]))
        judged = r["proxy memory per idle connection, same node"]
        assert judged["met"] is met
        assert judged["measured"].startswith(f"{ours / 3.47:.2f}× HAProxy's")
    missing = by_name(targets.evaluate([entry("idle.per_conn", **{"nodeproxy-splice": 4.0})]))
    assert missing["proxy memory per idle connection, same node"]["met"] is None


def test_hbone_targets_judge_cross_node_against_direct_in_the_run() -> None:
    """Issue 17: throughput ratios, added ping-pong p50, added paced p99, CPU per 1000."""
    metrics = [entry("throughput.cross-node.1", direct=17.0, **{"nodeproxy-splice": 8.6}),
               entry("throughput.cross-node.8", direct=28.0, **{"nodeproxy-splice": 11.0}),
               entry("latency.cross-node.p50", direct=67.0, **{"nodeproxy-splice": 108.0}),
               entry("http-rate.cross-node.p99_added", **{"nodeproxy-splice": 0.25}),
               entry("http.cross-node.cpu", **{"nodeproxy-splice": 0.031})]
    r = by_name(targets.evaluate(metrics))
    one = r["cross-node throughput over HBONE, 1 stream"]
    assert one["met"] is True and one["measured"].startswith("0.51× direct")
    assert r["cross-node throughput over HBONE, 8 streams"]["met"] is False  # 0.39 < 0.4
    latency = r["cross-node L4 latency over HBONE (ping-pong)"]
    assert latency["met"] is False and latency["measured"] == "+41.0 µs"
    assert r["HTTP through L4 cross node at the paced rate (HBONE)"]["met"] is True
    cpu = r["HTTP relayed through L4 cross node, saturated: CPU of both node proxies"]
    assert cpu["met"] is False and cpu["measured"] == "0.031 CPU s"


def test_a_missing_figure_is_neither_met_nor_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = [entry("latency.same-node.p50", direct=70.0, **{"nodeproxy-splice": None})]
    r = by_name(targets.evaluate(metrics))
    assert r["same-node L4 latency with splice"]["met"] is None
    assert r["same-node L4 latency with splice"]["measured"] == "no figure in this run"
    # A target the suite cannot judge yet is said so, not left out.
    monkeypatch.setattr(targets, "NOT_MEASURABLE", (("a future figure", "no scenario"),))
    lines = targets.markdown(targets.evaluate(metrics))
    assert "| a future figure |  | not measurable: no scenario | — |" in lines


def test_http2_and_grpc_are_judged_now_not_listed_as_unmeasurable() -> None:
    assert targets.NOT_MEASURABLE == ()
    names = {t.name for t in targets.TARGETS}
    assert any(n.startswith("L7 HTTP/2 CPU per request against HAProxy") for n in names)
    assert any(n.startswith("L7 gRPC unary CPU per call against HAProxy") for n in names)


def target(results: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    found = [r for r in results if r["target"].startswith(prefix)]
    assert len(found) == 1, prefix
    return found[0]


def test_added_p99_at_a_fixed_rate_is_judged_per_path_with_issue_18s_bounds() -> None:
    same, cross = "L7 HTTP/1.1 added latency p99 at ~1000 req/s, same node", \
        "L7 HTTP/1.1 added latency p99 at ~1000 req/s, cross node"
    # The figures of the issue's last full run: both missed.
    metrics = [entry("http-rate.same-node.p99_added", **{"nodeproxy-l7": 1.44}),
               entry("http-rate.same-node.p50_added", **{"nodeproxy-l7": 0.69}),
               entry("http-rate.cross-node.p99_added", **{"nodeproxy-l7": 2.12})]
    results = targets.evaluate(metrics)
    assert target(results, same)["met"] is False
    assert target(results, same)["measured"] == "+1.440 ms (p50 +0.690 ms)"
    assert target(results, same)["goal"] == "≤ 0.5 ms over direct"
    assert target(results, cross)["met"] is False and target(results, cross)["goal"] == \
        "≤ 0.8 ms over direct"
    # At the bounds: met; HAProxy's own figure does not count for nodeproxy-l7.
    metrics = [entry("http-rate.same-node.p99_added", **{"nodeproxy-l7": 0.5,
                                                          "haproxy-http": 0.1}),
               entry("http-rate.cross-node.p99_added", **{"nodeproxy-l7": 0.8})]
    results = targets.evaluate(metrics)
    assert target(results, same)["met"] is True and target(results, cross)["met"] is True
    assert target(results, same)["measured"] == "+0.500 ms"
    metrics = [entry("http-rate.cross-node.p99_added", **{"nodeproxy-l7": 0.81,
                                                           "haproxy-http": 0.2})]
    results = targets.evaluate(metrics)
    assert target(results, cross)["met"] is False
    assert target(results, same)["met"] is None  # no same-node figure in this run


def test_http2_and_grpc_cpu_are_judged_against_haproxy_http() -> None:
    h2, grpc = "L7 HTTP/2 CPU per request", "L7 gRPC unary CPU per call"
    # The quick run of this branch: nodeproxy-l7 far from half of HAProxy's efficiency.
    metrics = [entry("http2.same-node.cpu", **{"nodeproxy-l7": 0.3725, "haproxy-http": 0.03}),
               entry("grpc.same-node.cpu", **{"nodeproxy-l7": 0.8133,
                                               "haproxy-http": 0.05333})]
    results = targets.evaluate(metrics)
    assert target(results, h2)["met"] is False
    assert target(results, h2)["measured"].startswith("0.08× HAProxy's requests per CPU-second")
    assert target(results, grpc)["met"] is False
    assert target(results, grpc)["measured"].startswith("0.07× HAProxy's calls per CPU-second")
    metrics = [entry("http2.same-node.cpu", **{"nodeproxy-l7": 0.06, "haproxy-http": 0.03}),
               entry("grpc.same-node.cpu", **{"nodeproxy-l7": 0.061, "haproxy-http": 0.03})]
    results = targets.evaluate(metrics)
    assert target(results, h2)["met"] is True  # exactly half
    assert target(results, grpc)["met"] is False
    # HAProxy not measured (its gRPC listener failed, say): no judgement.
    metrics = [entry("grpc.same-node.cpu", **{"nodeproxy-l7": 0.06, "haproxy-http": None})]
    assert target(targets.evaluate(metrics), grpc)["met"] is None


def test_l7_targets_compare_cpu_per_request_with_haproxy_http() -> None:
    metrics = [entry("http.same-node.cpu", **{"nodeproxy-l7": 0.08, "haproxy-http": 0.02})]
    r = by_name(targets.evaluate(metrics))
    against = next(v for k, v in r.items() if k.startswith("L7 HTTP/1.1 CPU per request"))
    assert against["met"] is False  # 4x HAProxy's CPU: 0.25x its requests per CPU-second
    assert against["measured"].startswith("0.25× HAProxy's")
    absolute = next(v for k, v in r.items() if k.startswith("L7 HTTP/1.1 CPU per 1000"))
    assert absolute["met"] is True and absolute["measured"] == "0.080 CPU s"
    metrics = [entry("http.same-node.cpu", **{"nodeproxy-l7": 0.03, "haproxy-http": 0.02})]
    r = by_name(targets.evaluate(metrics))
    assert next(v for k, v in r.items() if k.startswith("L7 HTTP/1.1 CPU per request"))["met"]
    # Without haproxy-http's figure the comparison is neither met nor missed.
    metrics = [entry("http.same-node.cpu", **{"nodeproxy-l7": 0.03, "haproxy-http": None})]
    r = by_name(targets.evaluate(metrics))
    assert next(v for k, v in r.items()
                if k.startswith("L7 HTTP/1.1 CPU per request"))["met"] is None


def noisy_metrics(config: str, *, success: float, alone_p99: float, attack_p99: float,
                  growth: float) -> list[dict[str, Any]]:
    return [entry("noisy.baseline.success", **{config: 100.0}),
            entry("noisy.attack.success", **{config: success}),
            entry("noisy.baseline.p99", **{config: alone_p99}),
            entry("noisy.attack.p99", **{config: attack_p99}),
            entry("noisy.p99_ratio", **{config: attack_p99 / alone_p99}),
            entry("noisy.attack.rss", **{config: 300.0 + growth}),
            entry("noisy.rss_growth", **{config: growth})]


def noisy_results(metrics: list[dict[str, Any]], config: str) -> dict[str, dict[str, Any]]:
    prefix = f"noisy neighbour ({config}): "
    return {k.removeprefix(prefix): v for k, v in by_name(targets.evaluate(metrics)).items()
            if k.startswith(prefix)}


def test_noisy_neighbour_targets_met() -> None:
    bound = noisy.rss_growth_bound_mib()
    metrics = noisy_metrics("nodeproxy-splice", success=100.0, alone_p99=2.0,
                            attack_p99=4.0, growth=bound)
    r = noisy_results(metrics, "nodeproxy-splice")
    assert len(r) == 3 and all(v["met"] is True for v in r.values()), r
    assert r["quiet pod's p99 under attack"]["measured"].startswith("2.00×")
    # The other configuration was not measured: neither met nor missed.
    assert all(v["met"] is None for v in noisy_results(metrics, "nodeproxy-l7").values())


def test_noisy_neighbour_targets_missed() -> None:
    bound = noisy.rss_growth_bound_mib()
    metrics = noisy_metrics("nodeproxy-l7", success=99.9, alone_p99=2.0, attack_p99=4.2,
                            growth=bound + 1)
    r = noisy_results(metrics, "nodeproxy-l7")
    assert r["quiet pod's success while another pod attacks the node proxy"]["met"] is False
    assert r["quiet pod's p99 under attack"]["met"] is False
    memory = r["daemon memory under attack"]
    assert memory["met"] is False and f"{noisy.HELD_CONNECTIONS} connections" in memory["goal"]


def scale_entry(key: str, **results: tuple[float, float] | None) -> dict[str, Any]:
    """(median, lowest round) per configuration."""
    return {"key": key, "results": {
        name: {"available": True, "n": 0 if v is None else 3,
               "median": None if v is None else v[0], "min": None if v is None else v[1]}
        for name, v in results.items()}}


def test_connection_rate_targets_compare_with_haproxy_and_look_for_a_cliff() -> None:
    metrics = [scale_entry("connect.same-node.rate", haproxy=(1000.0, 950.0),
                           **{"nodeproxy-splice": (950.0, 800.0)}),
               scale_entry("connect.cross-node.rate", haproxy=(1000.0, 990.0),
                           **{"nodeproxy-splice": (700.0, 650.0)})]
    r = by_name(targets.evaluate(metrics))
    same = r["new connections/s, same node, against HAProxy tcp"]
    assert same["met"] is True and same["measured"].startswith("0.95× HAProxy's")
    # 800 of a median of 950: 0.84, above 0.8.
    assert r["new connections/s, same node: no cliff over the rounds"]["met"] is True
    cross = r["new connections/s, cross node (HBONE), against HAProxy tcp"]
    assert cross["met"] is False  # 0.7 < 0.8
    assert r["new connections/s, cross node (HBONE): no cliff over the rounds"]["met"] is True
    # The issue's measured cliff: one round of 191 against a median of 1,111.
    metrics = [scale_entry("connect.same-node.rate", haproxy=(1760.0, 1700.0),
                           **{"nodeproxy-splice": (1111.0, 191.0)})]
    r = by_name(targets.evaluate(metrics))
    cliff = r["new connections/s, same node: no cliff over the rounds"]
    assert cliff["met"] is False and cliff["measured"].startswith("lowest round 0.17×")


def test_sustained_connect_fails_on_a_dip_or_on_failed_connections() -> None:
    def run(held: float, failed: float) -> dict[str, Any]:
        metrics = [entry("sustained.same-node.held", **{"nodeproxy-splice": held}),
                   entry("sustained.same-node.lowest", **{"nodeproxy-splice": 0.5}),
                   entry("sustained.same-node.rate", **{"nodeproxy-splice": 900.0}),
                   entry("sustained.same-node.failed", **{"nodeproxy-splice": failed})]
        return by_name(targets.evaluate(metrics))[
            "sustained connect, same node: no cliff as sockets pile up"]

    assert run(0.85, 0.0)["met"] is True
    assert run(0.5, 0.0)["met"] is False
    failing = run(0.95, 12.0)
    assert failing["met"] is False and "12 connections failed" in failing["measured"]
    assert by_name(targets.evaluate([]))[
        "sustained connect, cross node (HBONE): no cliff as sockets pile up"]["met"] is None


def test_opening_many_connections_is_judged_against_haproxys_time() -> None:
    metrics = [entry("idle.open", haproxy=2.0, **{"nodeproxy-splice": 3.9}),
               entry("idle.cross-node.open", haproxy=2.0, **{"nodeproxy-splice": 4.1})]
    r = {k.split(",")[-1].strip(): v for k, v in by_name(targets.evaluate(metrics)).items()
         if k.startswith("open ")}
    assert r["same node"]["met"] is True and r["same node"]["measured"].startswith("1.95×")
    assert r["cross node"]["met"] is False


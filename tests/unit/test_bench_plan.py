"""The benchmark's order of measurements: configurations that need other daemon settings
(a restart) are measured as blocks, which swap order every other round; the L7
configurations are measured in the HTTP scenarios only, and their figures count only if
nodeproxy's own request count says the requests took the path claimed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.loader import parse_config
from nodeproxy.http.routes import Routes
from nodeproxy_dev.bench import haproxy, noisy, scenarios, stats
from nodeproxy_dev.bench.configurations import CONFIGURATIONS, Configuration
from nodeproxy_dev.bench.settings import QUICK
from nodeproxy_dev.bench.suite import Suite
from nodeproxy_dev.bench.topology import HTTP_FILE, HTTP_VIP_PORT
from nodeproxy_dev.bench.vocabulary import Cell, RequestCounter, ServerKind
from nodeproxy_dev.testbed import attack

FIRST_BLOCK = ["direct", "nodeproxy-splice", "haproxy", "nodeproxy-nosplice", "nodeproxy-l7",
               "nodeproxy-l7-full", "nodeproxy-l7-authz", "haproxy-http"]


def names(blocks) -> list[list[str]]:
    return [[c.name for c in block] for block in blocks]


def configuration(name: str) -> Configuration:
    return next(c for c in CONFIGURATIONS if c.name == name)


def quiet_suite() -> Suite:
    return Suite(QUICK, CONFIGURATIONS, log=lambda _message: None)


def test_iptables_capture_is_a_block_of_its_own_and_the_blocks_alternate():
    suite = quiet_suite()
    # direct is measured in each block, so every ratio pairs figures taken close together.
    # The L7 configuration needs only live settings (services, httpRoutes): a hot reload,
    # so it is in the first block with the L4 ones.
    first = [FIRST_BLOCK, ["direct", "nodeproxy-iptables"]]
    assert names(suite.blocks(1)) == first
    assert names(suite.blocks(2)) == first[::-1]
    assert names(suite.blocks(3)) == first
    # Every runnable configuration is measured in every round.
    assert {c.name for block in suite.blocks(2) for c in block} == {
        c.name for c in suite.runnable}
    iptables = configuration("nodeproxy-iptables")
    # The same userspace pump as nodeproxy-nosplice, only the capture differs.
    assert iptables.daemon_overrides() == {"capture": {"mode": "iptables"},
                                           "fastPath": {"splice": False}}
    assert iptables.capture_mode == "iptables"
    assert configuration("nodeproxy-nosplice").capture_mode == "ebpf"


def test_l4_configurations_relay_http_and_the_l7_one_parses_it():
    # Left undeclared, the HTTP port would be sniffed and parsed: the L4 rows declare tcp.
    for name in ("nodeproxy-splice", "nodeproxy-nosplice", "nodeproxy-iptables"):
        assert configuration(name).http_app_protocol == "tcp", name
        assert not configuration(name).http_only
    l7 = configuration("nodeproxy-l7")
    assert l7.http_app_protocol == "http" and l7.http_only
    # As nodeproxy-nosplice otherwise, and nothing that needs a restart.
    assert l7.daemon_overrides()["fastPath"] == {"splice": False}
    assert set(l7.daemon_overrides()) == {"fastPath", "httpRoutes"}
    assert configuration("haproxy-http").http_only
    assert not configuration("haproxy").http_only


def test_l7_configurations_are_measured_in_the_http_scenarios_only():
    suite = quiet_suite()
    for scenario in suite.scenarios:
        http = scenario.name.startswith(("http ", "http-rate "))
        h2, grpc = scenario.name.startswith("http2 "), scenario.name.startswith("grpc ")
        noisy = scenario.name == "noisy neighbour"
        l7 = http or h2 or grpc or noisy
        assert scenario.applies(configuration("nodeproxy-l7")) is l7, scenario.name
        assert scenario.applies(configuration("haproxy-http")) is l7, scenario.name
        # HTTP/2 and gRPC: L7 only; -full not on gRPC (its policy allows GETs only).
        assert scenario.applies(configuration("nodeproxy-nosplice")) is (
            scenario.name not in ("enrollment", "noisy neighbour") and not h2 and not grpc)
        assert scenario.applies(configuration("nodeproxy-l7-full")) is (http or h2), \
            scenario.name
        assert scenario.applies(configuration("direct")) is (scenario.name not in (
            "enrollment", "noisy neighbour")), scenario.name
    assert {s.name for s in suite.scenarios} >= {"http2 same-node", "http2 cross-node",
                                                  "grpc same-node", "grpc cross-node"}
    assert suite.results["grpc.same-node.cpu"]["direct"].not_applicable
    assert not suite.results["grpc.same-node.rps"]["direct"].not_applicable
    assert suite.results["grpc.cross-node.rps"]["nodeproxy-l7-full"].not_applicable
    assert not suite.results["http2.cross-node.rps_per_core"]["haproxy-http"].not_applicable
    # Their cells outside HTTP are not applicable (reported as —, never as missing).
    assert suite.results["latency.same-node.p50"]["nodeproxy-l7"].not_applicable
    assert not suite.results["http.same-node.rps_per_core"]["nodeproxy-l7"].not_applicable
    assert suite.results["http.same-node.rps_per_core"]["direct"].not_applicable
    assert not suite.results["http-rate.cross-node.p99_added"]["haproxy-http"].not_applicable


def bench_config() -> Routes:
    """The node YAML the daemons run for nodeproxy-l7, as far as routes go."""
    l7 = configuration("nodeproxy-l7")
    doc = {
        "apiVersion": "nodeproxy.io/v1alpha1", "kind": "NodeProxyConfig",
        "node": {"name": "node0"},
        "services": [{"name": f"srv{i}-http", "namespace": "default",
                      "vips": [f"10.96.0.{20 + i}"],
                      "ports": [{"port": HTTP_VIP_PORT, "targetPort": 8080,
                                 "appProtocol": l7.http_app_protocol}],
                      "selector": {"app": f"srv{i}"}} for i in (0, 1)],
        **l7.daemon_overrides(),
    }
    return Routes(parse_config(yaml.safe_dump(doc), "bench.yaml").config)


def test_the_l7_route_takes_the_benchmark_request_with_retries_and_a_header():
    routes = bench_config()
    for service in ("default/srv0-http", "default/srv1-http"):
        table = routes.table(service, HTTP_VIP_PORT)
        rule = table.match(RequestHead("GET", f"/{HTTP_FILE}", "10.96.0.20"))
        assert rule is not None and rule.route.endswith("-bench")
        assert rule.retry.attempts == 2
        assert set(rule.retry.retry_on) == {"5xx", "connect-failure"}
        assert rule.request_headers is not None
        assert [(h.name, h.value) for h in rule.request_headers.set] == [haproxy.ROUTE_HEADER]
        # No catch-all: a request off the route is refused (404), so wrk's error check
        # proves each measured request was routed.
        assert table.match(RequestHead("GET", "/other", "10.96.0.20")) is None
        assert table.match(RequestHead("GET", "/healthz", "10.96.0.20")) is not rule


def test_haproxy_relays_http_in_tcp_mode_and_parses_it_on_its_own_port(tmp_path: Path):
    text = haproxy.config({0: "10.244.0.3", 1: "10.244.1.3"}, str(tmp_path), 1000,
                          attack_backend="10.244.0.4:8081")
    for index in (0, 1):
        tcp = text.split(f"listen http-node{index}\n", 1)[1].split("\n\n", 1)[0]
        assert "mode tcp" in tcp
        assert f"bind 0.0.0.0:{haproxy.frontend_port(index, ServerKind.HTTP)}" in tcp
        front = text.split(f"frontend http-l7-node{index}\n", 1)[1].split("\n\n", 1)[0]
        assert "mode http" in front and f"bind 0.0.0.0:{haproxy.http_mode_port(index)}" in front
        assert f"path_beg {haproxy.ROUTE_PATH_PREFIX}/" in front
        back = text.split(f"backend http-l7-node{index}\n", 1)[1].split("\n\n", 1)[0]
        assert "http-reuse always" in back and f"retries {haproxy.RETRIES}" in back
        assert "set-header " + " ".join(haproxy.ROUTE_HEADER) in back
        # gRPC: HTTP/2 on both sides of a mode http listener of its own.
        front = text.split(f"frontend grpc-l7-node{index}\n", 1)[1].split("\n\n", 1)[0]
        assert f"bind 0.0.0.0:{haproxy.grpc_mode_port(index)} proto h2" in front
        back = text.split(f"backend grpc-l7-node{index}\n", 1)[1].split("\n\n", 1)[0]
        assert f":{ServerKind.GRPC.port} proto h2" in back and "mode http" in back
    assert HTTP_FILE.startswith(haproxy.ROUTE_PATH_PREFIX.lstrip("/") + "/")
    ports = [haproxy.frontend_port(i, k) for i in (0, 1) for k in ServerKind]
    ports += [haproxy.http_mode_port(i) for i in (0, 1)]
    ports += [haproxy.grpc_mode_port(i) for i in (0, 1)]
    ports.append(haproxy.ATTACK_PORT)
    assert len(set(ports)) == len(ports)
    # The noisy neighbour's attack frontend parses HTTP like nodeproxy's attack-target.
    attack_front = text.split("frontend attack\n", 1)[1].split("\n\n", 1)[0]
    assert "mode http" in attack_front and f"bind 0.0.0.0:{haproxy.ATTACK_PORT}" in attack_front
    assert "server attack 10.244.0.4:8081" in text
    if shutil.which("haproxy"):
        path = tmp_path / "haproxy.cfg"
        path.write_text(text)
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_request_count_must_fit_the_claim():
    l7 = RequestCounter("node0", "srv0-http", parsed=True)
    l4 = RequestCounter("node0", "srv0-http", parsed=False)
    check = scenarios.check_request_count
    assert check(l7, 10_000, 10_000, 32) is None
    assert check(l7, 10_030, 10_000, 32) is None  # requests in flight when wrk stopped
    assert check(l7, 9_800, 10_000, 32) is None  # within the tolerance
    assert "did not all take the L7 path" in (check(l7, 5_000, 10_000, 32) or "")
    assert check(l7, 10_700, 10_000, 32) is not None
    assert check(l4, 0, 10_000, 32) is None
    assert "claims L4" in (check(l4, 12, 10_000, 32) or "")


def test_ratios_pair_with_the_baseline_of_the_same_block():
    direct, iptables = Cell(), Cell()
    direct.add(10.0, 1, 0)
    direct.add(20.0, 1, 1)  # the machine changed state between the blocks
    direct.add(10.0, 2, 0)
    iptables.add(40.0, 1, 1)
    iptables.add(30.0, 2, 1)  # no direct in that block: the round's first direct sample
    assert stats.paired_ratios(iptables, direct) == [2.0, 3.0]
    assert stats.ratio_to_baseline(iptables, direct) == 2.5
    added = stats.paired_differences(iptables, direct)
    assert (added.samples, added.rounds, added.blocks) == ([20.0, 20.0], [1, 2], [1, 1])
    lonely = Cell()
    lonely.add(5.0, 3, 0)
    assert stats.paired_differences(lonely, direct).errors


def test_added_latency_is_derived_after_the_run():
    suite = quiet_suite()
    key = "http-rate.same-node.p50"
    suite.results[key]["direct"].add(0.2, 1, 0)
    suite.results[key]["nodeproxy-l7"].add(1.2, 1, 0)
    suite.results[key]["haproxy-http"].add(0.45, 1, 0)
    suite._derive()
    added = suite.results[f"{key}_added"]
    assert added["nodeproxy-l7"].samples == pytest.approx([1.0])
    assert added["haproxy-http"].samples == pytest.approx([0.25])
    assert added["direct"].not_applicable  # direct adds nothing to itself
    # A configuration without its own figure has no added one either (reported missing).
    assert not added["nodeproxy-splice"].samples


def test_noisy_neighbour_runs_once_last_for_nodeproxy_at_l4_and_l7_and_haproxy_http():
    suite = quiet_suite()
    scenario = suite.scenarios[-1]
    assert scenario.name == "noisy neighbour" and scenario.once
    # After the other once-scenarios: the attack may leave state no other figure should see.
    assert [s.name for s in suite.scenarios if s.once] == [
        "sustained connect same-node", "sustained connect cross-node", "idle connections",
        "idle connections cross-node", "connection capacity", "enrollment", "noisy neighbour"]
    measured = [c.name for c in CONFIGURATIONS if scenario.applies(c)]
    assert measured == ["nodeproxy-splice", "nodeproxy-l7", "haproxy-http"]
    # Every figure is a row of its own, "—" for the other configurations, never missing.
    for metric in scenario.metrics:
        assert suite.results[metric.key]["direct"].not_applicable
        assert suite.results[metric.key]["nodeproxy-nosplice"].not_applicable
        assert not suite.results[metric.key]["nodeproxy-l7"].not_applicable
        assert not suite.results[metric.key]["haproxy-http"].not_applicable
    # --only selects it by name.
    only = Suite(QUICK, CONFIGURATIONS, log=lambda _message: None, only="noisy")
    assert [s.name for s in only.scenarios] == ["noisy neighbour"]
    # Several names, comma-separated.
    only = Suite(QUICK, CONFIGURATIONS, log=lambda _message: None, only="http2,grpc")
    assert [s.name for s in only.scenarios] == ["http2 same-node", "http2 cross-node",
                                                "grpc same-node", "grpc cross-node"]


def test_noisy_neighbour_attacks_are_bounded_and_aimed_at_the_attack_service():
    runs = noisy.attacks(7.0)
    assert [r.kind for r in runs] == ["rapid-reset", "flood", "slowloris"]
    for run in runs:
        argv = noisy.attack_argv("/py", run, "10.96.0.30", 80)
        assert argv[:4] == ["/py", "-m", "nodeproxy_dev.testbed.attack", run.kind]
        # The attack tool itself accepts them: its own bounds hold.
        plan, as_json = attack.parse(argv[3:])
        assert as_json and plan.host == "10.96.0.30" and plan.port == 80
        assert plan.duration == 7.0 and plan.connections <= attack.MAX_CONNECTIONS
        assert plan.reconnect  # what the proxy closes, the attacker opens again
    rapid = attack.parse(noisy.attack_argv("/py", runs[0], "h", 80)[3:])[0]
    assert rapid.rate == noisy.RAPID_RESET_RATE  # paced, not as fast as one core can
    held = sum(attack.parse(noisy.attack_argv("/py", r, "h", 80)[3:])[0].connections
               for r in runs)
    assert held == noisy.HELD_CONNECTIONS
    # The bound on memory is what the attack holds, not what it sends.
    assert noisy.rss_growth_bound_mib() == pytest.approx(
        held * noisy.RSS_PER_HELD_KIB / 1024 + noisy.RSS_MARGIN_MIB)
    # The attack runs around the quiet pod's run, its duration a few tens of seconds.
    assert QUICK.noisy_seconds + noisy.LEAD_S + noisy.TAIL_S < 30


def wrk_result(requests: float, **errors: float) -> dict[str, float]:
    fields = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return {"requests": requests, **{f: errors.get(f, 0.0) for f in fields}}


def test_quiet_pod_success_counts_every_lost_late_or_failed_request():
    assert noisy.success_percent(wrk_result(1000)) == 100.0
    # A status of 400 or more is a completed request that failed.
    assert noisy.success_percent(wrk_result(1000, status_errors=10)) == pytest.approx(99.0)
    # wrk's requests include the late answers, which it also counts as timeouts.
    assert noisy.success_percent(wrk_result(1000, timeouts=10)) == pytest.approx(99.0)
    # A broken connection loses a request wrk counts nowhere else.
    assert noisy.success_percent(wrk_result(990, read_errors=10)) == pytest.approx(99.0)
    assert noisy.success_percent(wrk_result(0, connect_errors=3)) == 0.0
    assert noisy.success_percent(wrk_result(0)) == 0.0
    # A late answer that is also an error is not a negative success.
    assert noisy.success_percent(wrk_result(5, status_errors=5, timeouts=5)) == 0.0


def test_settle_waits_for_a_busy_proxy_within_its_bound(monkeypatch):
    idle = subprocess.Popen(["sleep", "30"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert noisy.settle(idle.pid) < 2 * noisy.SETTLE_WINDOW_S + 0.5
        monkeypatch.setattr(noisy, "SETTLE_MAX_S", 1.2)
        assert noisy.settle(busy.pid) >= 1.2  # never idle: waits the whole bound, no more
    finally:
        for proc in (idle, busy):
            proc.kill()
            proc.wait()


def test_only_takes_the_exact_name_before_the_substring():
    quiet = {"log": lambda _message: None}
    exact = Suite(QUICK, CONFIGURATIONS, only="connect same-node", **quiet)
    assert [s.name for s in exact.scenarios] == ["connect same-node"]
    idle = Suite(QUICK, CONFIGURATIONS, only="idle connections", **quiet)
    assert [s.name for s in idle.scenarios] == ["idle connections"]
    # Each comma-separated part is taken the same way.
    both = Suite(QUICK, CONFIGURATIONS, only="idle connections,connect same-node", **quiet)
    assert [s.name for s in both.scenarios] == ["connect same-node", "idle connections"]
    # No scenario is called "connect": every one whose name has it, as before.
    broad = Suite(QUICK, CONFIGURATIONS, only="connect", **quiet)
    assert [s.name for s in broad.scenarios] == [
        "connect same-node", "connect cross-node", "sustained connect same-node",
        "sustained connect cross-node", "idle connections", "idle connections cross-node",
        "connection capacity"]

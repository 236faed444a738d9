"""The bench's HTTP/2 (h2load) and gRPC unary scenarios on the bench's own cluster, for
real and bounded (a few hundred requests each): every configuration they apply to yields
its figures, nodeproxy counted each request, and a wrong byte or a failed call fails the
run instead of giving a figure.  Speed is not judged here."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nodeproxy_dev.bench.configurations import by_names
from nodeproxy_dev.bench.scenarios import GrpcUnary, Http2
from nodeproxy_dev.bench.settings import QUICK
from nodeproxy_dev.bench.topology import HTTP_FILE, BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, NetPath
from nodeproxy_dev.testbed.cluster import Cluster

pytestmark = pytest.mark.privileged

# Enough for HAProxy's CPU to reach several 10 ms clock ticks (it needs ~0.03 ms per
# HTTP/2 request, ~0.08 ms per gRPC call): with 300 it read 0 ticks and the run failed.
H2_REQUESTS = 3000
GRPC_CALLS = 2000
SETTINGS = replace(QUICK, h2_requests=H2_REQUESTS, h2_connections=4, h2_streams=4,
                   grpc_calls=GRPC_CALLS,
                   grpc_concurrency=4)
DIRECT, L7, HA = by_names(["direct", "nodeproxy-l7", "haproxy-http"])


@pytest.fixture(scope="module")
def bench() -> Iterator[BenchCluster]:
    with Cluster(nodes=2, mtls=True, pod_vip_unreachable=True) as cluster:
        built = BenchCluster(cluster, SETTINGS)
        built.build()
        yield built


def measure(bench: BenchCluster, scenario: Http2 | GrpcUnary, configuration: object
            ) -> tuple[dict[str, float], dict[str, object]]:
    configuration.prepare(bench)  # type: ignore[attr-defined]
    return scenario.measure(bench, configuration, SETTINGS)  # type: ignore[arg-type]


@pytest.mark.parametrize("scenario_class", [Http2, GrpcUnary])
def test_each_configuration_yields_checked_figures(bench: BenchCluster,
                                                   scenario_class: type) -> None:
    for path in NetPath:
        scenario = scenario_class(path)
        prefix = f"{'http2' if scenario_class is Http2 else 'grpc'}.{path.value}"
        for configuration in (DIRECT, L7, HA):
            values, raw = measure(bench, scenario, configuration)
            where = (path.value, configuration.name)
            count = H2_REQUESTS if scenario_class is Http2 else GRPC_CALLS
            assert raw["requests"] == count, where
            assert values[f"{prefix}.rps"] > 0, where
            assert 0 < values[f"{prefix}.p50"] <= values[f"{prefix}.p99"], where
            if scenario_class is Http2:
                assert raw["data_bytes"] == count * SETTINGS.http_body, where
            if configuration is DIRECT:
                assert f"{prefix}.cpu" not in values and raw["proxy_cpu_s"] == {}
                continue
            assert values[f"{prefix}.cpu"] > 0 and values[f"{prefix}.rps_per_core"] > 0, where
            if configuration is L7:
                # nodeproxy parsed and counted every request (HTTP/2 in, HTTP/1.1 out to
                # nginx; gRPC over HTTP/2 both ways), cross node on both daemons' CPU.
                assert raw["proxy_requests_counted"] == count, where
                assert len(raw["proxy_cpu_s"]) == (1 if path is NetPath.SAME_NODE else 2)
            else:
                assert list(raw["proxy_cpu_s"]) == ["haproxy"]


def test_an_answer_of_other_bytes_fails_the_http2_run(bench: BenchCluster) -> None:
    served = Path(bench.cluster.dir, "bench", "plain-0", "www", HTTP_FILE)
    original = served.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    try:
        served.write_bytes(bytes(changed))  # same length: only the bytes tell
        for configuration in (DIRECT, HA):
            with pytest.raises(MeasurementError, match="not others"):
                measure(bench, Http2(NetPath.SAME_NODE), configuration)
        served.write_bytes(original[:-1])  # one byte short
        with pytest.raises(MeasurementError, match="1023 bytes"):
            measure(bench, Http2(NetPath.SAME_NODE), DIRECT)
    finally:
        served.write_bytes(original)
    measure(bench, Http2(NetPath.SAME_NODE), DIRECT)  # and whole again, it counts


def test_failed_calls_fail_the_grpc_run(bench: BenchCluster) -> None:
    """The meshed server pod's gRPC server gone: nodeproxy answers UNAVAILABLE, and the
    run fails rather than reporting the rate of failures.  Last: it kills the server."""
    pod = bench.pod("srv-0")
    servers = [p for p in pod.processes if "nodeproxy_dev.bench.grpcunary" in p.args]
    assert len(servers) == 1
    os.kill(servers[0].pid, signal.SIGKILL)
    servers[0].wait(timeout=10)
    with pytest.raises(MeasurementError, match=rf"of {GRPC_CALLS} calls answered right"):
        measure(bench, GrpcUnary(NetPath.SAME_NODE), L7)

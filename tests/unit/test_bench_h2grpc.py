"""The HTTP/2 (h2load) and gRPC unary scenarios' parsing and checks, on recorded real
outputs of h2load 1.52 (Debian 12's nghttp2-client) and of the gRPC client, and the gRPC
client itself against real grpcio servers on loopback: a run with a failed request or
call, or an answer of other bytes, never counts."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest

from nodeproxy_dev.bench import grpcload, grpcunary, h2load
from nodeproxy_dev.bench.vocabulary import MeasurementError

# h2load -t1 -c4 -m10 -n 400 --log-file=... http://127.0.0.1:18082/bench/small.bin
# (nginx h2c, a 1024-byte file)
H2LOAD_OK = """\
starting benchmark...
spawning thread #0: 4 total client(s). 400 total requests
Application protocol: h2c
progress: 10% done
progress: 100% done

finished in 16.31ms, 24526.34 req/s, 27.12MB/s
requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 400 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 452.93KB (463796) total, 45.70KB (46800) headers (space savings 39.38%), \
400.00KB (409600) data
                     min         max         mean         sd        +/- sd
time for request:       84us      2.63ms      1.28ms       499us    68.00%
time for connect:      162us       493us       303us       141us    75.00%
time to 1st byte:      834us      2.00ms      1.65ms       546us    75.00%
req/s           :    6355.16     7481.78     6809.06      543.43    75.00%
"""

# The same server, a path it does not have: every request done, none succeeded (exit 0).
H2LOAD_404 = """\
spawning thread #0: 4 total client(s). 40 total requests
finished in 3.08ms, 12987.01 req/s, 2.80MB/s
requests: 40 total, 40 started, 40 done, 0 succeeded, 40 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 40 4xx, 0 5xx
traffic: 8.82KB (9036) total, 1.95KB (2000) headers (space savings 49.49%), 5.98KB (6120) data
"""

# h2load -D 1: the requests in flight when the time is up are counted failed and errored.
H2LOAD_TIMED = """\
finished in 1.00s, 2000.00 req/s, 2.21MB/s
requests: 2009 total, 2018 started, 2009 done, 2000 succeeded, 9 failed, 9 errored, 0 timeout
status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.21MB (2318132) total, 228.52KB (234000) headers (space savings 39.38%), \
1.95MB (2048000) data
"""

# Nothing listening: exit 0 all the same.
H2LOAD_REFUSED = """\
starting benchmark...
spawning thread #0: 2 total client(s). 10 total requests

finished in 1.35ms, 0.00 req/s, 0B/s
requests: 10 total, 0 started, 0 done, 0 succeeded, 10 failed, 10 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""

H2LOAD_LOG = "1796544165049938\t200\t575\n1796544165049939\t200\t596\n" \
             "1796544165049940\t200\t600\n"

# The gRPC client, 300 calls, 8 in flight, against its server on loopback.
GRPC_OK = {"calls": 300, "ok": 300, "failed": 0, "failed_by_status": {}, "wrong": 0,
           "duration_s": 0.06283279200215475, "p50_us": 1454.3360011884943,
           "p99_us": 6768.393999664113, "max_us": 6820.028997026384}
# ... against nginx's h2c port (HTTP/2, not gRPC): every call failed.
GRPC_UNIMPLEMENTED = {"calls": 20, "ok": 0, "failed": 20,
                      "failed_by_status": {"UNIMPLEMENTED": 20}, "wrong": 0,
                      "duration_s": 0.008623492998594884, "p50_us": 0.0, "p99_us": 0.0,
                      "max_us": 0.0}


def test_h2load_report_is_read_whole() -> None:
    s = h2load.parse(H2LOAD_OK)
    assert s.seconds == pytest.approx(0.01631)
    assert (s.total, s.started, s.done, s.succeeded) == (400, 400, 400, 400)
    assert (s.failed, s.errored, s.timeout) == (0, 0, 0)
    assert (s.status_2xx, s.status_3xx, s.status_4xx, s.status_5xx) == (400, 0, 0, 0)
    assert s.data_bytes == 409600
    assert h2load.problem(s, 400, 1024) is None
    assert h2load.parse(H2LOAD_TIMED).seconds == 1.0
    assert h2load.parse(H2LOAD_REFUSED).errored == 10


def test_h2load_runs_that_do_not_count() -> None:
    why = h2load.problem(h2load.parse(H2LOAD_404), 40, 1024)
    assert why is not None and "0 of 40 requests succeeded" in why and "4xx 40" in why
    why = h2load.problem(h2load.parse(H2LOAD_TIMED), 2009, 1024)
    assert why is not None and "9 errored" in why
    why = h2load.problem(h2load.parse(H2LOAD_REFUSED), 10, 1024)
    assert why is not None and "10 errored" in why
    # Every request succeeded, but the answers are not all the whole file.
    why = h2load.problem(h2load.parse(H2LOAD_OK), 400, 1000)
    assert why == ("h2load: 409600 bytes of response data for 400 answers of 1000 bytes "
                   "(expected 400000)")
    # Fewer requests than asked for.
    assert h2load.problem(h2load.parse(H2LOAD_OK), 401, 1024) is not None


def test_h2load_without_a_report_is_an_error() -> None:
    with pytest.raises(MeasurementError, match="no report"):
        h2load.parse("spawning thread #0: 4 total client(s).\n")
    with pytest.raises(MeasurementError, match="no report"):
        h2load.parse(H2LOAD_OK.replace("status codes:", "codes:"))


def test_h2load_log_gives_the_latencies_and_refuses_a_failed_request() -> None:
    assert h2load.latencies_us(H2LOAD_LOG) == [575.0, 596.0, 600.0]
    with pytest.raises(MeasurementError, match="status 502"):
        h2load.latencies_us(H2LOAD_LOG + "1796544165049941\t502\t100\n")
    with pytest.raises(MeasurementError, match="unreadable"):
        h2load.latencies_us(H2LOAD_LOG + "garbage\n")
    # A request without a status of 2xx (no response at all) is refused too.
    with pytest.raises(MeasurementError, match="status -1"):
        h2load.latencies_us("1796544165049941\t-1\t100\n")


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert grpcunary.percentile(values, 50) == 50.0
    assert grpcunary.percentile(values, 99) == 99.0
    assert grpcunary.percentile(values, 100) == 100.0
    assert grpcunary.percentile([7.0], 99) == 7.0
    assert grpcunary.percentile([], 50) == 0.0


def test_grpc_report_that_counts_gives_calls_per_second_and_latency() -> None:
    assert grpcload.problem(GRPC_OK, 300) is None
    f = grpcload.figures(GRPC_OK)
    assert f["rps"] == pytest.approx(300 / 0.06283279200215475)
    assert f["p50_ms"] == pytest.approx(1.454336) and f["p99_ms"] == pytest.approx(6.768394)
    assert f["requests"] == 300


def test_grpc_reports_that_do_not_count() -> None:
    why = grpcload.problem(GRPC_UNIMPLEMENTED, 20)
    assert why == ("gRPC: 0 of 20 calls answered right (20 made, 20 failed: "
                   "UNIMPLEMENTED 20, 0 answered with other bytes)")
    wrong = dict(GRPC_OK, ok=299, wrong=1)
    assert "1 answered with other bytes" in str(grpcload.problem(wrong, 300))
    assert grpcload.problem(GRPC_OK, 301) is not None  # fewer calls made than asked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_against(handler: Any, calls: int) -> dict[str, Any]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        grpcunary.SERVICE, {grpcunary.METHOD: grpc.unary_unary_rpc_method_handler(handler)}),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        return await grpcunary.drive(f"127.0.0.1:{port}", calls, 4, 64)
    finally:
        await server.stop(None)


def test_grpc_client_checks_every_answer_against_real_servers() -> None:
    async def right(request: bytes, context: Any) -> bytes:
        return grpcunary.answer(request)

    async def one_byte_off(request: bytes, context: Any) -> bytes:
        out = bytearray(grpcunary.answer(request))
        if request[7] % 5 == 0:  # every fifth call
            out[-1] ^= 1
        return bytes(out)

    async def refuse_some(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request[7] % 4 == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no")
        return grpcunary.answer(request)

    report = asyncio.run(run_against(right, 40))
    assert report["calls"] == report["ok"] == 40 and grpcload.problem(report, 40) is None
    assert 0 < report["p50_us"] <= report["p99_us"] <= report["max_us"]
    report = asyncio.run(run_against(one_byte_off, 40))
    assert (report["ok"], report["wrong"]) == (32, 8)
    assert "8 answered with other bytes" in str(grpcload.problem(report, 40))
    report = asyncio.run(run_against(refuse_some, 40))
    assert report["failed_by_status"] == {"UNAVAILABLE": 10} and report["ok"] == 30
    assert "UNAVAILABLE 10" in str(grpcload.problem(report, 40))

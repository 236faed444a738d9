"""Tracing: reading and writing W3C and B3 trace context, the tracing config section, and
the SDK pipeline end to end against a loopback OTLP/HTTP receiver (no daemon)."""

from __future__ import annotations

import os
import random
import socket
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.loader import ConfigError, parse_config
from nodeproxy.config.model import TracingSettings
from nodeproxy.telemetry import trace_headers as tc
from nodeproxy.telemetry.request_spans import Tracer
from nodeproxy.telemetry.trace_start import UNSAMPLED, first_decision
from nodeproxy.telemetry.tracing import Tracing
from nodeproxy.telemetry.tracing_metrics import TracingMetrics
from nodeproxy_dev.testbed.otlp_receiver import make_server, read_spans
from tests.unit.test_config import VALID

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{SPAN}-01"


# -- extraction ------------------------------------------------------------------------


def test_w3c_traceparent_and_tracestate() -> None:
    got = tc.extract([("traceparent", TP), ("tracestate", "a=1"), ("tracestate", "b=2")])
    assert (got.trace_id, got.span_id, got.sampled) == (int(TRACE, 16), int(SPAN, 16), True)
    assert got.tracestate == "a=1,b=2"
    assert got.invalid == ()
    assert tc.extract([("traceparent", TP[:-2] + "00")]).sampled is False


@pytest.mark.parametrize("value", [
    f"ff-{TRACE}-{SPAN}-01",                 # version ff is invalid
    f"00-{'0' * 32}-{SPAN}-01",              # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",             # all-zero parent id
    f"00-{TRACE.upper()}-{SPAN}-01",         # uppercase hex
    f"00-{TRACE[:-1]}-{SPAN}-01",            # short trace id
    f"00-{TRACE}-{SPAN}0-01",                # long parent id
    f"00-{TRACE}-{SPAN}-01-extra",           # version 00 has exactly four fields
    f"00-{TRACE}-{SPAN}-1",                  # one-digit flags
    f"0x-{TRACE}-{SPAN}-01",                 # non-hex version
    "garbage",
    "",
])
def test_malformed_traceparent_is_reported_and_ignored(value: str) -> None:
    got = tc.extract([("traceparent", value), ("tracestate", "a=1")])
    assert got.invalid == (tc.W3C,)
    assert got.trace_id == 0 and got.sampled is None
    assert got.tracestate is None  # dropped with its invalid traceparent


@pytest.mark.parametrize("value", [
    "a=1,b=2", "vendor@tenant=x y", "a=1,,b=2 ", "k=" + "v" * 256,
    ",".join(f"k{i}=v" for i in range(32)),
])
def test_valid_tracestate_passes(value: str) -> None:
    got = tc.extract([("traceparent", TP), ("tracestate", value)])
    assert got.tracestate == value and got.invalid == ()


@pytest.mark.parametrize("value", [
    "bad value!!", "A=1", "a=1,a=2", "a=", "a=x,b=1=2", "a=1\x01",
    ",".join(f"k{i}=v" for i in range(33)), "k=" + "v" * 257,
])
def test_malformed_tracestate_is_dropped_and_reported(value: str) -> None:
    got = tc.extract([("traceparent", TP), ("tracestate", value)])
    assert got.trace_id == int(TRACE, 16)  # the traceparent still counts
    assert got.tracestate is None and got.invalid == (tc.TRACESTATE,)


def test_later_traceparent_version_may_carry_more_fields() -> None:
    got = tc.extract([("traceparent", f"01-{TRACE}-{SPAN}-01-future")])
    assert got.trace_id == int(TRACE, 16) and got.invalid == ()


def test_two_traceparents_are_invalid() -> None:
    assert tc.extract([("traceparent", TP), ("traceparent", TP)]).invalid == (tc.W3C,)


def test_b3_multi() -> None:
    got = tc.extract([("x-b3-traceid", TRACE[:16]), ("x-b3-spanid", SPAN),
                      ("x-b3-parentspanid", "1" * 16), ("x-b3-sampled", "0")])
    assert (got.trace_id, got.span_id, got.sampled) == (int(TRACE[:16], 16), int(SPAN, 16),
                                                        False)
    assert got.b3_multi and not got.b3_single
    debug = tc.extract([("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-flags", "1")])
    assert debug.sampled is True and debug.debug


@pytest.mark.parametrize("headers", [
    [("x-b3-traceid", TRACE)],                                   # no span id
    [("x-b3-traceid", "abc"), ("x-b3-spanid", SPAN)],            # bad length
    [("x-b3-traceid", TRACE), ("x-b3-spanid", "0" * 16)],        # zero span id
    [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "yes")],
])
def test_malformed_b3_multi(headers: list[tuple[str, str]]) -> None:
    got = tc.extract(headers)
    assert got.invalid == (tc.B3_MULTI,) and got.trace_id == 0


def test_b3_single() -> None:
    got = tc.extract([("b3", f"{TRACE}-{SPAN}-1-{'2' * 16}")])
    assert (got.trace_id, got.span_id, got.sampled) == (int(TRACE, 16), int(SPAN, 16), True)
    assert got.b3_single
    assert tc.extract([("b3", f"{TRACE}-{SPAN}")]).sampled is None
    deny = tc.extract([("b3", "0")])
    assert (deny.trace_id, deny.sampled, deny.invalid) == (0, False, ())
    assert tc.extract([("b3", "d")]).debug


@pytest.mark.parametrize("value", ["x", f"{TRACE}", f"{TRACE}-{SPAN}-2",
                                   f"{TRACE}-{SPAN}-1-zz", f"{TRACE}-{SPAN}-1-{SPAN}-9"])
def test_malformed_b3_single(value: str) -> None:
    assert tc.extract([("b3", value)]).invalid == (tc.B3_SINGLE,)


def test_w3c_wins_over_b3_and_a_bad_w3c_falls_back_to_b3() -> None:
    b3 = ("b3", f"{'a' * 32}-{'b' * 16}-1")
    assert tc.extract([b3, ("traceparent", TP)]).trace_id == int(TRACE, 16)
    got = tc.extract([("traceparent", "bad"), b3])
    assert got.trace_id == int("a" * 32, 16) and got.invalid == (tc.W3C,)


def test_no_context() -> None:
    assert tc.extract([("x-request-id", "r")]) is tc.NONE


# -- injection -------------------------------------------------------------------------


def test_inject_replaces_every_trace_header() -> None:
    headers = [("traceparent", TP), ("tracestate", "a=1"), ("x-b3-traceid", TRACE),
               ("x-b3-spanid", SPAN), ("x-b3-sampled", "1"), ("b3", f"{TRACE}-{SPAN}-1"),
               ("x-other", "kept")]
    incoming = tc.extract(headers)
    tc.inject(headers, incoming, int(TRACE, 16), 0xabc, True)
    got = dict(headers)
    assert len(headers) == len(got)  # none twice
    assert got["traceparent"] == f"00-{TRACE}-0000000000000abc-01"
    assert got["tracestate"] == "a=1"
    assert got["x-b3-traceid"] == TRACE and got["x-b3-spanid"] == "0000000000000abc"
    assert got["x-b3-parentspanid"] == SPAN and got["x-b3-sampled"] == "1"
    assert got["b3"] == f"{TRACE}-0000000000000abc-1-{SPAN}"
    assert got["x-other"] == "kept"


def test_inject_w3c_only_when_no_b3_arrived_and_keeps_a_64_bit_b3_trace_id() -> None:
    headers: list[tuple[str, str]] = []
    tc.inject(headers, tc.NONE, 5, 6, False)
    assert headers == [("traceparent", f"00-{5:032x}-{6:016x}-00")]
    multi = [("x-b3-traceid", TRACE[:16]), ("x-b3-spanid", SPAN)]
    tc.inject(multi, tc.extract(multi), int(TRACE[:16], 16), 7, True)
    assert dict(multi)["x-b3-traceid"] == TRACE[:16]
    assert dict(multi)["traceparent"] == f"00-{'0' * 16}{TRACE[:16]}-{7:016x}-01"


def test_roundtrip_is_valid() -> None:
    headers = [("b3", f"{TRACE}-{SPAN}-0")]
    tc.inject(headers, tc.extract(headers), int(TRACE, 16), 99, False)
    again = tc.extract(headers)
    assert again.invalid == () and again.span_id == 99 and again.sampled is False


# -- config ----------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.yaml")
    return info.value.problems


def tracing(body: str) -> str:
    return VALID + "tracing:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_tracing_defaults_off() -> None:
    settings = parse_config(VALID, "node.yaml").config.tracing
    assert settings == TracingSettings()
    assert not settings.enabled and settings.sampling_percent == 1.0
    assert settings.endpoint == "http://127.0.0.1:4318/v1/traces"


def test_tracing_section_loads() -> None:
    settings = parse_config(tracing("""\
        enabled: true
        endpoint: http://otel-collector.observability:4318/v1/traces
        samplingPercent: 12.5
        """), "node.yaml").config.tracing
    assert settings.enabled and settings.sampling_percent == 12.5


@pytest.mark.parametrize(("body", "expected"), [
    ("endpoint: otel-collector:4318", "is not an OTLP/HTTP URL"),
    ("endpoint: ftp://collector/v1/traces", "is not an OTLP/HTTP URL"),
    ("endpoint: http://collector:99999/v1/traces", "is not an OTLP/HTTP URL"),
    ("endpoint: 'http:///v1/traces'", "is not an OTLP/HTTP URL"),
    ("samplingPercent: 101", "samplingPercent: must be at most 100"),
    ("maxQueueSize: 0", "maxQueueSize: must be at least 1"),
    ("{maxQueueSize: 10, maxExportBatchSize: 20}",
     "maxExportBatchSize: must not exceed maxQueueSize (10)"),
    ("sampling: 5", "unknown field (did you mean 'samplingPercent'?)"),
])
def test_bad_tracing_config_names_its_line(body: str, expected: str) -> None:
    line = VALID.count("\n") + 2
    found = problems(tracing(body))
    assert len(found) == 1, found
    assert found[0].startswith(f"node.yaml:{line}: tracing"), found
    assert expected in found[0]


# -- the SDK pipeline against a loopback receiver --------------------------------------


@pytest.fixture
def receiver(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, str]]:
    out = os.path.join(tmp_path, "spans.jsonl")
    server = make_server("127.0.0.1", 0, out)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", out
    server.shutdown()
    server.server_close()


def head(*headers: tuple[str, str]) -> RequestHead:
    return RequestHead("GET", "/items?x=1", "web.shop:80", list(headers))


def finish(span: object, status: int = 200) -> None:
    span.finish(status=status, grpc_status="", flags="-", attempts=1,  # type: ignore[attr-defined]
                upstream=("10.0.0.1", 8080), service="web.shop.svc.cluster.local",
                source=("client", "shop"), destination=("web", "shop"),
                end_ns=time.time_ns())


def test_sampled_spans_reach_the_receiver_with_their_parent(
        receiver: tuple[str, str]) -> None:
    endpoint, out = receiver
    registry = CollectorRegistry()
    metrics = TracingMetrics(registry)
    tracer = Tracer(TracingSettings(enabled=True, endpoint=endpoint, sampling_percent=100,
                                    schedule_delay_seconds=0.05), metrics, "node-a")
    request = head(("traceparent", TP))
    span = tracer.begin(request, "req-1", time.time_ns())
    finish(span, 503)
    tracer.shutdown()
    spans = read_spans(out)
    assert len(spans) == 1
    got = spans[0]
    assert (got["trace_id"], got["parent_span_id"]) == (TRACE, SPAN)
    assert got["span_id"] == f"{span.span_id:016x}"
    assert request.header("traceparent") == f"00-{TRACE}-{got['span_id']}-01"
    assert got["kind"] == "SPAN_KIND_CLIENT" and got["status"] == "STATUS_CODE_ERROR"
    # The request's attributes (kept from begin) and the response's, every one exported.
    assert got["attributes"] == {
        "http.request.method": "GET", "url.path": "/items", "url.scheme": "http",
        "server.address": "web.shop", "server.port": 80,
        "network.protocol.version": "1.1", "http.request.header.x-request-id": "req-1",
        "nodeproxy.response_flags": "-",
        "nodeproxy.destination.service": "web.shop.svc.cluster.local",
        "nodeproxy.source.workload": "client", "nodeproxy.source.namespace": "shop",
        "http.response.status_code": 503, "network.peer.address": "10.0.0.1",
        "network.peer.port": 8080, "nodeproxy.destination.workload": "web",
        "nodeproxy.destination.namespace": "shop", "error.type": "503"}
    assert got["resource"]["service.name"] == "nodeproxy"
    assert registry.get_sample_value("nodeproxy_tracing_spans_exported_total") == 1


def test_unsampled_requests_propagate_and_export_nothing(receiver: tuple[str, str]) -> None:
    endpoint, out = receiver
    metrics = TracingMetrics(CollectorRegistry())
    tracer = Tracer(TracingSettings(enabled=True, endpoint=endpoint, sampling_percent=0,
                                    schedule_delay_seconds=0.05), metrics, "node-a")
    ids = set()
    for _ in range(20):
        request = head(("accept", "*/*"))
        # Unsampled: no span to end, only the headers carry the new context.
        assert tracer.begin(request, "r", time.time_ns()) is None
        assert [name for name, _ in request.headers] == ["accept", "traceparent"]
        parsed = tc.parse_traceparent(request.header("traceparent") or "")
        assert parsed is not None and parsed[2] is False
        ids.add(parsed[:2])
    assert len(ids) == 20 and len({t for t, _ in ids}) == 20  # a new trace each
    # An unsampled parent is continued, not replaced; its B3 form is answered in B3 too.
    request = head(("traceparent", f"00-{TRACE}-{SPAN}-00"), ("x-b3-sampled", "0"))
    assert tracer.begin(request, "r", time.time_ns()) is None
    parsed = tc.parse_traceparent(request.header("traceparent") or "")
    assert parsed is not None and f"{parsed[0]:032x}" == TRACE and not parsed[2]
    assert f"{parsed[1]:016x}" != SPAN  # the proxy's own span id as the new parent
    assert request.header("x-b3-sampled") == "0"
    tracer.shutdown()
    assert read_spans(out) == []


def test_sampling_percent_is_kept_by_requests_without_context() -> None:
    """The fast path of a request with no trace header samples samplingPercent of them,
    and a sampled one gets a span whose ids its traceparent carries."""
    tracer = Tracer(TracingSettings(enabled=True, endpoint="http://127.0.0.1:9/v1/traces",
                                    sampling_percent=25, schedule_delay_seconds=60),
                    TracingMetrics(CollectorRegistry()), "node-a")
    sampled = 0
    try:
        for _ in range(4000):
            request = head()
            span = tracer.begin(request, "r", time.time_ns())
            parsed = tc.parse_traceparent(request.header("traceparent") or "")
            assert parsed is not None
            if span is not None:
                sampled += 1
                assert parsed == (span.trace_id, span.span_id, True)
            else:
                assert parsed[2] is False
    finally:
        tracer.shutdown()
    assert 800 < sampled < 1200, sampled


def test_a_full_queue_drops_new_spans_and_counts_them() -> None:
    with socket.socket() as s:  # a port nothing listens on: every export fails
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = CollectorRegistry()
    tracer = Tracer(TracingSettings(
        enabled=True, endpoint=f"http://127.0.0.1:{port}/v1/traces", sampling_percent=100,
        max_queue_size=10, max_export_batch_size=10, schedule_delay_seconds=60,
        # The first batch's export then waits out one retry (about 1 s) while the rest
        # of the spans arrive: they find 10 spans not yet through the exporter.
        export_timeout_seconds=2), TracingMetrics(registry), "node-a")
    t0 = time.monotonic()
    for _ in range(25):
        finish(tracer.begin(head(), "r", time.time_ns()))
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, elapsed  # ending spans never waits for the collector
    value = registry.get_sample_value
    deadline = time.monotonic() + 10
    while value("nodeproxy_tracing_export_failures_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    tracer.shutdown()
    dropped = value("nodeproxy_tracing_spans_dropped_total", {"reason": "queue_full"})
    failed = value("nodeproxy_tracing_spans_dropped_total", {"reason": "export_failed"})
    assert dropped == 15
    assert failed == 10
    assert value("nodeproxy_tracing_export_failures_total") == 1
    assert value("nodeproxy_tracing_spans_exported_total") == 0


def test_tracing_holder_swaps_tracers_only_on_change() -> None:
    tracing = Tracing(CollectorRegistry(), "node-a")
    assert tracing.configure(TracingSettings()) is None
    on = TracingSettings(enabled=True, sampling_percent=0)
    first = tracing.configure(on)
    assert first is not None and tracing.configure(on) is first
    second = tracing.configure(TracingSettings(enabled=True, sampling_percent=50))
    assert second is not None and second is not first
    assert tracing.configure(TracingSettings()) is None
    tracing.close()


def test_the_request_paths_own_first_decision_draws_as_begin_does() -> None:
    """The handler decides most requests itself (trace_start.first_decision, compiled)
    and calls begin_decided only for the rest: with the same PRNG state it must write the
    same headers and sample the same requests as begin, context or none."""
    settings = TracingSettings(enabled=True, endpoint="http://127.0.0.1:9/v1/traces",
                               sampling_percent=25, schedule_delay_seconds=60)
    whole, split = (Tracer(settings, TracingMetrics(CollectorRegistry()), "node-a")
                    for _ in range(2))
    whole.random.seed(7)
    split.random.seed(7)
    sampled = 0
    try:
        for i in range(400):
            arrived = [("traceparent", f"00-{TRACE}-{SPAN}-00")] if i % 5 == 0 else []
            first, second = head(*arrived), head(*arrived)
            span = whole.begin(first, "r", 1)
            decided = first_decision(second.headers, split.random, split.ratio)
            other = None if decided == UNSAMPLED else split.begin_decided(
                decided, second, "r", 1)
            assert (span is None) == (other is None), i
            if span is None:  # the ids drawn from the PRNG: the same
                assert first.headers == second.headers, i
            else:  # a sampled span's ids are the SDK's own
                assert [n for n, _ in first.headers] == [n for n, _ in second.headers]
            sampled += span is not None
    finally:
        whole.shutdown()
        split.shutdown()
    assert 40 < sampled < 200, sampled


class _Bits(random.Random):
    """A PRNG whose 192-bit draws are given (the ids' edge cases), its ratio draws high."""

    def __init__(self, draws: list[int]):
        super().__init__(0)
        self._draws = draws

    def random(self) -> float:
        return 0.99

    def getrandbits(self, k: int, /) -> int:
        assert k == 192
        return self._draws.pop(0)


def test_an_unsampled_requests_traceparent_is_its_two_ids_in_w3c_form() -> None:
    """first_decision's traceparent (a printf-style format in the compiled path) is the
    W3C text of the drawn ids: 32 and 16 lower-case hex digits, zero-padded, an all-zero
    id replaced by 1 (invalid in W3C), the sampled flag 0; and a receiver reads back the
    same ids."""
    top, span_max = (1 << 128) - 1, (1 << 64) - 1
    draws = [0, (top << 64) | span_max, 1, 1 << 64, (0xabc << 64) | 0xdef,
             ((1 << 127) << 64) | (1 << 63)]
    draws += [random.Random(i).getrandbits(192) for i in range(200)]
    for bits in list(draws):
        headers: list[tuple[str, str]] = [("x-other", "kept")]
        assert first_decision(headers, _Bits([bits]), 0.5) == UNSAMPLED
        trace, span = (bits >> 64) or 1, (bits & span_max) or 1
        assert headers == [("x-other", "kept"),
                           ("traceparent", f"00-{trace:032x}-{span:016x}-00")], bits
        value = headers[1][1]
        assert len(value) == 55 and value == value.lower()
        got = tc.extract(headers[1:])
        assert (got.invalid, got.trace_id, got.span_id, got.sampled) == ((), trace, span,
                                                                          False)

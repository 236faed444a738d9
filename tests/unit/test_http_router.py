"""The router's next step after an attempt (attempts.next_step, a pure function), and the
router carrying it out against real retry budgets and circuit breakers with a scripted
upstream (router.Router)."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy import native
from nodeproxy.codec.message import (
    Body,
    RequestHead,
    ResponseHead,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.config import model
from nodeproxy.http import attempts
from nodeproxy.http.attempts import (
    ATTEMPTS_USED,
    BODY_NOT_REPLAYABLE,
    BUDGET_EXHAUSTED,
    CLIENT_LEFT,
    RETRY_OVERFLOW,
    Action,
    Ended,
    Progress,
    Result,
    Step,
    next_step,
    settled,
)
from nodeproxy.http.balancer import RoundRobin
from nodeproxy.http.circuit_breaker import OVERFLOW_TEXT, CircuitBreaker
from nodeproxy.http.clusters import Cluster
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.mirror import Mirrors
from nodeproxy.http.pool import Endpoint
from nodeproxy.http.retry import RetryBudget
from nodeproxy.http.router import Router
from nodeproxy.http.routes import CompiledRule, WeightedBackend
from nodeproxy.mesh.destinations import Backend
from nodeproxy.telemetry.request_metrics import RequestMetrics


def policy(*on: str, attempts: int = 2, codes: tuple[int, ...] = (503,),
           non_idempotent: bool = False, per_try: float | None = None) -> model.RetryPolicy:
    return model.RetryPolicy(retry_on=list(on or ("5xx",)), attempts=attempts,
                             status_codes=list(codes), non_idempotent=non_idempotent,
                             per_try_timeout_seconds=per_try,
                             backoff=model.RetryBackoff(base_seconds=0.001, max_seconds=0.002))


FIRST = Progress(attempts=1)
LAST = Progress(attempts=3)  # policy(attempts=2): the third attempt was the last


# -- the decision ----------------------------------------------------------------------------

def test_a_response_the_policy_does_not_match_goes_back_and_charges_nothing():
    step = next_step(policy(), "GET", Result.response(200), FIRST)
    assert step == Step(Action.RESPOND)
    # Even with the budget and the breaker empty: they are not consulted at all.
    empty = Progress(attempts=1, budget_has_room=False, retry_slot_free=False)
    assert next_step(policy(), "GET", Result.response(404), empty) == Step(Action.RESPOND)


def test_a_retriable_status_is_retried_charging_the_budget_and_a_retry_slot():
    step = next_step(policy("retriable-status-codes"), "GET", Result.response(503), FIRST)
    assert step.action is Action.RETRY
    assert step.spend_budget and step.take_retry_slot
    assert step.retry_reason == "503" and step.flags == ()


def test_a_retriable_status_on_the_last_attempt_goes_back_marked_urx():
    step = next_step(policy("retriable-status-codes"), "GET", Result.response(503), LAST)
    assert step.action is Action.RESPOND and step.flags == ("URX",)
    assert step.not_retried == ATTEMPTS_USED
    assert not step.spend_budget and not step.take_retry_slot


def test_without_retries_a_retriable_failure_is_not_marked_urx():
    step = next_step(policy(attempts=0), "GET", Result.response(503), FIRST)
    assert step == Step(Action.RESPOND)  # attempts 0: should_retry says no
    step = next_step(policy(attempts=0), "GET", Result.no_response("UC"), FIRST)
    assert step.action is Action.REPLY and step.flags == ("UC",) and step.status == 503


@pytest.mark.parametrize("flag,status,text", [
    ("UF", 503, "upstream connect error or disconnect/reset before headers. "
                "reset reason: connection failure"),
    ("UC", 503, "upstream connect error or disconnect/reset before headers. "
                "reset reason: connection termination"),
    ("UT", 504, "upstream request timeout"),
])
def test_no_response_is_retried_then_answered_locally_with_its_flag(flag, status, text):
    retry = next_step(policy("reset"), "GET", Result.no_response(flag), FIRST)
    assert retry.action is Action.RETRY and retry.retry_reason == flag
    last = next_step(policy("reset"), "GET", Result.no_response(flag), LAST)
    assert last.action is Action.REPLY
    assert (last.status, last.text, last.flags) == (status, text, ("URX", flag))


def test_a_per_try_timeout_not_covered_by_the_policy_is_a_504_without_urx():
    step = next_step(policy("connect-failure"), "GET", Result.no_response("UT"),
                     Progress(attempts=2))
    assert step.action is Action.REPLY and step.status == 504 and step.flags == ("UT",)


def test_the_request_timeout_is_a_504_or_a_reset_once_the_response_began():
    assert attempts.request_timeout(False) == Step(
        Action.REPLY, ("UT",), 504, "upstream request timeout")
    assert attempts.request_timeout(True) == Step(Action.RESET, ("UT",))


def test_an_exhausted_budget_stops_the_retry_and_is_charged_so_it_is_counted():
    step = next_step(policy(), "GET", Result.response(502),
                     Progress(attempts=2, budget_has_room=False, retry_slot_free=False))
    assert step.action is Action.RESPOND and step.flags == ("URX",)
    assert step.not_retried == BUDGET_EXHAUSTED
    # The budget refuses (counted exhausted); the breaker is never asked.
    assert step.spend_budget and not step.take_retry_slot


def test_a_first_attempt_stopped_by_the_budget_is_not_urx():
    step = next_step(policy(), "GET", Result.no_response("UC"),
                     Progress(attempts=1, budget_has_room=False))
    assert step.action is Action.REPLY and step.flags == ("UC",)


def test_no_retry_slot_stops_the_retry_after_the_budget_was_spent():
    step = next_step(policy(), "GET", Result.response(503),
                     Progress(attempts=1, retry_slot_free=False))
    assert step.action is Action.RESPOND and step.not_retried == RETRY_OVERFLOW
    assert step.spend_budget and step.take_retry_slot  # the overflow is the breaker's count


def test_a_refused_stream_needs_no_retry_slot():
    result = Result.no_response("UC", refused_stream=True)
    step = next_step(policy("refused-stream"), "POST", result,
                     Progress(attempts=1, retry_slot_free=False))
    assert step.action is Action.RETRY
    assert step.spend_budget and not step.take_retry_slot


@pytest.mark.parametrize("progress,reason", [
    (Progress(attempts=1, body_replayable=False), BODY_NOT_REPLAYABLE),
    (Progress(attempts=1, client_gone=True), CLIENT_LEFT),
])
def test_a_body_that_cannot_be_sent_again_or_a_client_that_left_is_not_retried(
        progress, reason):
    step = next_step(policy(), "GET", Result.no_response("UF"), progress)
    assert step.action is Action.REPLY and step.not_retried == reason
    assert not step.spend_budget and not step.take_retry_slot


def test_a_non_idempotent_request_is_retried_only_when_the_upstream_never_saw_it():
    p = policy("5xx", "connect-failure")
    assert next_step(p, "POST", Result.response(503), FIRST).action is Action.RESPOND
    assert next_step(p, "POST", Result.no_response("UC"), FIRST).action is Action.REPLY
    assert next_step(p, "POST", Result.no_response("UF"), FIRST).action is Action.RETRY
    allowed = policy("5xx", non_idempotent=True)
    assert next_step(allowed, "POST", Result.response(503), FIRST).action is Action.RETRY


def test_a_grpc_status_in_the_head_is_retried_by_its_name():
    step = next_step(policy("unavailable"), "POST", Result.response(200, grpc_status=14),
                     FIRST)
    assert step.action is Action.RESPOND
    # POST: gRPC calls are POSTs, so a gRPC retry needs nonIdempotent or an unseen request.
    p = policy("unavailable", non_idempotent=True)
    assert next_step(p, "POST", Result.response(200, grpc_status=14),
                     FIRST).action is Action.RETRY
    assert next_step(p, "POST", Result.response(200, grpc_status=0),
                     FIRST).action is Action.RESPOND


@pytest.mark.parametrize("ended,status,flag,text", [
    (Ended.OVERFLOW, 503, "UO", OVERFLOW_TEXT),
    (Ended.NO_HEALTHY_UPSTREAM, 503, "UH", None),
    (Ended.DENIED, 403, "UAEX", None),
    (Ended.UNEXPECTED_101, 502, "UPE", "upstream protocol error"),
])
def test_attempts_that_never_reached_a_response_are_answered_at_once(ended, status, flag,
                                                                     text):
    for progress in (FIRST, Progress(attempts=2)):
        step = next_step(policy("5xx", "reset"), "GET", Result(ended), progress)
        assert step.action is Action.REPLY
        assert (step.status, step.flags, step.text) == (status, (flag,), text)
        assert not step.spend_budget and not step.take_retry_slot
    assert next_step(policy(), "GET", Result(Ended.UNEXPECTED_101), FIRST).upgrade_refusal


def test_a_client_that_broke_off_is_abandoned_or_answered_its_malformed_status():
    assert next_step(policy(), "GET", Result(Ended.CLIENT_GONE), FIRST).action \
        is Action.ABANDON
    slow = next_step(policy(), "GET", Result(Ended.CLIENT_GONE, malformed_status=408), FIRST)
    assert (slow.action, slow.status, slow.text) == (Action.REPLY, 408, "request timeout")
    bad = next_step(policy(), "GET", Result(Ended.CLIENT_GONE, malformed_status=400), FIRST)
    assert (bad.action, bad.status, bad.text) == (Action.REPLY, 400, "bad request")


def test_every_combination_keeps_the_invariants():
    """Over every outcome and state: a retry always spends the budget; nothing is charged
    unless a retriable failure was about to be retried; a local reply has a status; the
    request is never retried past its attempts."""
    results = [Result.response(s, g) for s in (200, 404, 500, 502, 503, 504)
               for g in (None, 14)]
    results += [Result.no_response(f, refused_stream=r) for f in ("UF", "UC", "UT")
                for r in (False, True)]
    results += [Result(e) for e in (Ended.OVERFLOW, Ended.NO_HEALTHY_UPSTREAM,
                                    Ended.DENIED, Ended.UNEXPECTED_101, Ended.CLIENT_GONE)]
    policies = [policy(*on, attempts=n) for on in
                (("5xx",), ("reset",), ("gateway-error", "unavailable"),
                 ("connect-failure", "refused-stream", "retriable-status-codes"))
                for n in (0, 1, 2)]
    for p, method, result, n, replay, gone, room, slot in itertools.product(
            policies, ("GET", "POST"), results, (1, 2, 3), (True, False), (True, False),
            (True, False), (True, False)):
        progress = Progress(n, replay, gone, room, slot)
        step = next_step(p, method, result, progress)
        if step.action is Action.RETRY:
            assert step.spend_budget and n <= p.attempts and replay and not gone and room
            assert step.take_retry_slot or result.refused_stream
            assert step.flags == ()
        else:
            assert step.retry_reason == ""
            if step.spend_budget or step.take_retry_slot:
                assert step.not_retried in (BUDGET_EXHAUSTED, RETRY_OVERFLOW)
        if step.action is Action.REPLY:
            assert 400 <= step.status <= 599
        if "URX" in step.flags:
            assert n > 1 and step.not_retried is not None


# -- the router carrying it out --------------------------------------------------------------

class ScriptedConnection:
    """An upstream that answers each send with the next entry of its script: a status,
    an UpstreamError to raise, or HANG (no answer)."""

    def __init__(self, script: list[int | UpstreamError | str]):
        self.script = list(script)
        self.sent: list[RequestHead] = []
        self.closed = False

    async def send(self, head: RequestHead, body: Any) -> UpstreamResponse:
        self.sent.append(head)
        while await body.read():
            pass
        step = self.script.pop(0)
        if step == HANG:
            await asyncio.sleep(10)
        if isinstance(step, UpstreamError):
            raise step
        return UpstreamResponse(ResponseHead(step), Body.of(b"from upstream"))

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


HANG = "hang"


class FakeExchange:
    """The client's side: records what the proxy answered."""

    def __init__(self, head: RequestHead):
        self.request = head
        self.body = Body.empty()
        self.responded = False
        self.client_gone = False
        self.status: int | None = None
        self.data = b""
        self.was_reset = False

    async def respond(self, head: ResponseHead, end: bool = False) -> None:
        self.responded = True
        self.status = head.status

    async def send(self, data: bytes) -> None:
        self.data += data

    async def finish(self, trailers: Any = None) -> None:
        pass

    def reset(self) -> None:
        self.was_reset = True


class FakeClusters:
    def __init__(self, cluster: Cluster, connection: ScriptedConnection):
        self.cluster = cluster
        self.connection = connection

    def get(self, service: str, port: int, version: int) -> Cluster | None:
        return self.cluster

    def pooled(self, ctx: Any, endpoint: Endpoint, cluster: Cluster) -> None:
        return None  # connect() every time

    async def connect(self, ctx: Any, endpoint: Endpoint, cluster: Cluster
                      ) -> ScriptedConnection:
        return self.connection


class Allow:
    def allows(self, ctx: Any, backend: Any, head: Any) -> bool:
        return True


class Entry:  # the shape of a ServicePortEntry the router reads
    port = 80
    fqdn = "web.default.svc.cluster.local"


# A real RequestContext: the compiled build (nodeproxy/native.py) checks its class.
Context = RequestContext(pod=None, entry=Entry, version=4,  # type: ignore[arg-type]
                         http2_upstream=False, access_log=False)


def make_router(script: list[int | UpstreamError | str], *, max_retries: int = 3,
                budget: model.RetryBudgetSettings | None = None
                ) -> tuple[Router, Cluster, ScriptedConnection, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    connection = ScriptedConnection(script)
    backend = Backend(ipaddress.ip_address("10.0.0.1"), 8080, None)
    cluster = Cluster(
        entry=Context.entry, endpoints=[Endpoint(backend)],  # type: ignore[arg-type]
        balancer=RoundRobin(), budget=RetryBudget(budget or model.RetryBudgetSettings()),
        hash_header=None, hash_source=False,
        breaker=CircuitBreaker(model.ConnectionPool(max_retries=max_retries)), outlier=None)
    clusters = FakeClusters(cluster, connection)
    rng = random.Random(3)
    mirrors = Mirrors(metrics, rng, cluster=clusters.get, hash_key=lambda *_: None,
                      authorized=lambda *_: True, connect=clusters.connect)  # type: ignore
    router = Router(clusters=clusters, authorizer=Allow(), mirrors=mirrors,  # type: ignore
                    metrics=metrics, rng=rng)
    return router, cluster, connection, registry


def rule(p: model.RetryPolicy, timeout: float = 5.0) -> CompiledRule:
    return CompiledRule("", (WeightedBackend("default/web", None, 1),), None, None,
                        model.Timeouts(request_seconds=timeout), p)


def forward(router: Router, r: CompiledRule, method: str = "GET"
            ) -> tuple[FakeExchange, Outcome]:
    exchange = FakeExchange(RequestHead(method, "/", "web"))
    outcome = Outcome()

    async def main() -> None:
        await router.forward(Context, exchange, r, outcome)  # type: ignore[arg-type]
    asyncio.run(main())
    return exchange, outcome


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_the_router_retries_a_503_and_passes_the_second_answer_on():
    router, cluster, connection, registry = make_router([503, 200])
    exchange, outcome = forward(router, rule(policy("retriable-status-codes")))
    assert exchange.status == 200 and exchange.data == b"from upstream"
    assert outcome.attempts == 2 and outcome.flags == []
    assert [h.header("x-envoy-attempt-count") for h in connection.sent] == [None, "2"]
    assert cluster.budget.retries_in_window == 1 and cluster.budget.requests_in_window == 1
    assert cluster.breaker.retries == 0 and cluster.breaker.requests == 0  # all given back
    assert cluster.endpoints[0].stats.requests == 2
    assert cluster.endpoints[0].stats.failures == 1


def test_the_router_answers_the_last_failure_locally_with_urx():
    reset = UpstreamError("UC", "reset before headers")
    router, cluster, connection, registry = make_router([reset, reset, reset])
    exchange, outcome = forward(router, rule(policy("reset")))
    assert exchange.status == 503 and b"connection termination" in exchange.data
    assert outcome.attempts == 3 and outcome.flags == ["URX", "UC"]
    assert len(connection.sent) == 3


def test_the_router_stops_on_an_empty_budget_and_counts_it():
    # No floor and no ratio: the first retry is refused.
    budget = model.RetryBudgetSettings(ratio=0.0, min_retries_per_second=0)
    router, cluster, connection, registry = make_router([503, 200], budget=budget)
    exchange, outcome = forward(router, rule(policy("retriable-status-codes")))
    assert exchange.status == 503 and outcome.attempts == 1 and len(connection.sent) == 1
    assert cluster.budget.exhausted == 1
    assert sample(registry, "nodeproxy_http_retry_budget_exhausted_total",
                  destination_service="web.default.svc.cluster.local") == 1


def test_the_router_stops_when_the_breaker_has_no_retry_slot():
    router, cluster, connection, registry = make_router([503, 200], max_retries=0)
    exchange, outcome = forward(router, rule(policy("retriable-status-codes")))
    assert exchange.status == 503 and outcome.attempts == 1
    assert cluster.breaker.overflows["retries"] == 1
    assert cluster.budget.retries_in_window == 1  # spent before the breaker refused


def test_the_request_timeout_ends_a_hanging_attempt_with_504():
    router, cluster, connection, registry = make_router([])

    async def hang(head: RequestHead, body: Any) -> UpstreamResponse:
        await asyncio.sleep(10)
        raise AssertionError("not reached")
    connection.send = hang  # type: ignore[method-assign]
    exchange, outcome = forward(router, rule(policy(), timeout=0.05))
    assert exchange.status == 504 and outcome.flags == ["UT"]
    assert cluster.breaker.requests == 0  # the slot was given back
    assert cluster.endpoints[0].stats.active == 0


def test_a_per_try_timeout_is_retried_and_counts_against_the_endpoint():
    router, cluster, connection, registry = make_router([HANG, 200])
    exchange, outcome = forward(router, rule(policy("reset", per_try=0.05)))
    assert exchange.status == 200 and outcome.attempts == 2
    assert connection.closed  # the timed-out exchange cannot serve again
    assert sample(registry, "nodeproxy_http_retries_total",
                  destination_service="web.default.svc.cluster.local", reason="UT") == 1
    assert cluster.endpoints[0].stats.failures == 1


class FirstCandidate:
    """A balancer that would send every attempt to the same endpoint (a fake Balancer:
    the compiled build, nodeproxy/native.py, takes only its own classes there, so the
    test using it runs in the suite's pure pass, NODEPROXY_NATIVE=0)."""

    def pick(self, candidates: Any, hash_key: str | None = None) -> Any:
        return candidates[0]


@pytest.mark.skipif(native.state()[0], reason="a fake Balancer: pure Python only")
def test_a_retry_goes_to_an_endpoint_no_earlier_attempt_used_then_to_any():
    """Istio's default (Envoy's previous_hosts): retry elsewhere while there is an
    elsewhere; with every endpoint tried, the next attempt still goes somewhere."""
    router, cluster, connection, registry = make_router([503, 503, 503, 200], max_retries=5)
    cluster.endpoints = [Endpoint(Backend(ipaddress.ip_address(f"10.0.0.{i}"), 8080, None))
                         for i in (1, 2, 3)]
    cluster.balancer = FirstCandidate()  # type: ignore[assignment]
    used: list[str] = []
    connect = router._clusters.connect  # type: ignore[attr-defined]

    async def recording(ctx: Any, endpoint: Endpoint, c: Cluster) -> ScriptedConnection:
        used.append(endpoint.key)
        return await connect(ctx, endpoint, c)
    router._clusters.connect = recording  # type: ignore[attr-defined]
    exchange, outcome = forward(router, rule(policy("retriable-status-codes", attempts=3)))
    assert exchange.status == 200 and outcome.attempts == 4
    assert used == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.1:8080"]


def test_settled_is_next_steps_decision_whatever_the_progress() -> None:
    """The router skips the budget and the breaker when ``settled`` decides: for every
    policy, method and result it decides, next_step decides the same under every
    progress (attempts, body, client, budget, breaker), and it decides the common case
    (a 200)."""
    rng = random.Random(9)
    names = list(model.RetryOn.__args__)
    results = [Result.response(s, g) for s in (200, 204, 404, 409, 500, 502, 503, 504)
               for g in (None, 0, 1, 4, 8, 13, 14)]
    results += [Result.no_response(f, refused_stream=r) for f in ("UF", "UC", "UT")
                for r in (False, True)]
    results += [Result(Ended.RESPONSE, 503, None, None, True)]
    results += [Result(e) for e in (Ended.NO_HEALTHY_UPSTREAM, Ended.DENIED, Ended.OVERFLOW,
                                    Ended.CLIENT_GONE, Ended.UNEXPECTED_101)]
    decided = 0
    for _ in range(300):
        policy = model.RetryPolicy(
            attempts=rng.choice((0, 1, 2, 5)), retry_on=rng.sample(names, rng.randrange(0, 5)),
            status_codes=rng.sample([409, 500, 503, 504], rng.randrange(0, 3)),
            non_idempotent=rng.random() < 0.5)
        for method in ("GET", "POST"):
            for result in results:
                step = settled(policy, method, result)
                if step is None:
                    continue
                decided += 1
                for progress in itertools.product((1, 2, 7), (True, False), (True, False),
                                                  (True, False), (True, False)):
                    assert next_step(policy, method, result, Progress(*progress)) == step
    assert decided > 1000
    assert settled(model.RetryPolicy(), "GET", Result.response(200)) is not None

"""The router: one routed request sent upstream, attempt by attempt (Envoy's router filter).

Given the route rule a request matched (handler.py), per attempt: the rule's backend
service by weight, that service's cluster (clusters.py), an endpoint by the cluster's
balancer among those not ejected, the destination's authorization (authorize.py) and
its workload's rate limit; then a circuit-breaker request slot, a pooled connection, the
exchange under the per-try timeout, and the attempt's record in the endpoint's
statistics and the cluster's outlier detector.  What comes next -- another attempt, a
local reply, or the upstream response streamed back -- is attempts.next_step's
decision; this module carries it out (charges the retry budget and retry slots it
names, backs off with full jitter, answers).  The rule's request timeout bounds all
attempts and backoffs (504 UT; a response already begun is reset).  A rule with mirrors
starts its copies here, before the body is read (mirror.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import NamedTuple

from nodeproxy.codec.h1 import H1Client, H1Exchange
from nodeproxy.codec.message import (
    Body,
    BodyError,
    Exchange,
    MalformedRequest,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
    grpc_status_of,
)
from nodeproxy.codec.upgrade import UNEXPECTED_101
from nodeproxy.config.model import HttpSettings
from nodeproxy.http import attempts
from nodeproxy.http.attempts import (
    Action,
    Ended,
    Progress,
    Result,
    Step,
    next_step,
    settled,
)
from nodeproxy.http.authorize import RequestAuthorizer
from nodeproxy.http.balancer import untried
from nodeproxy.http.circuit_breaker import Overflow
from nodeproxy.http.clusters import Cluster, Clusters
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.deadlines import Alarm, Deadlines
from nodeproxy.http.local_reply import local_reply, rate_limited
from nodeproxy.http.mirror import Mirrors
from nodeproxy.http.pool import Endpoint, abort_exchange
from nodeproxy.http.rate_limit import Limiter
from nodeproxy.http.resilience import Slots
from nodeproxy.http.retry import RetryBudget, backoff_delay
from nodeproxy.http.routes import CompiledRule, apply_modifier
from nodeproxy.mesh.upstream import Refused
from nodeproxy.telemetry.request_metrics import RequestMetrics, wire_protocol

log = logging.getLogger(__name__)

Picked = tuple[Cluster, Endpoint]
# One attempt's end as _attempt returns it: the result, the response, the connection it
# came on, the error before a response.
Attempted = tuple[Result, "UpstreamResponse | None", "UpstreamConnection | None",
                  "UpstreamError | None"]
# Router.start's callback: None, the exchange has ended; else the coroutine to run it on.
Done = Callable[[Coroutine[object, object, None] | None], None]


class Router:
    """Forwards routed requests (see the module docstring); one per node."""

    def __init__(self, *, clusters: Clusters, authorizer: RequestAuthorizer,
                 mirrors: Mirrors, metrics: RequestMetrics, rng: random.Random):
        self._clusters = clusters
        self._authorizer = authorizer
        self._mirrors = mirrors
        self._metrics = metrics
        self._random = rng
        self._settings = HttpSettings()
        self._workload_limits: dict[tuple[str, str], Limiter] = {}
        self._deadlines = Deadlines()

    def update(self, settings: HttpSettings,
               workload_limits: dict[tuple[str, str], Limiter]) -> None:
        """A new configuration: the retry buffer size and the workloads' rate limits."""
        self._settings = settings
        self._workload_limits = workload_limits

    async def forward(self, ctx: RequestContext, exchange: Exchange, rule: CompiledRule,
                      outcome: Outcome, first: Picked | Result | None = None,
                      resume: Resumed | None = None) -> None:
        """Forward under the rule's request timeout (504, UT, when it passes).  A request
        that began on the callback path (``start``) goes on here: `first` is its first
        attempt's pick (made, the attempt not), `resume` the attempt made and its result."""
        timeout = rule.timeouts.request_seconds or None
        try:
            # As asyncio.timeout (not wait_for: no extra task per request), without a loop
            # timer per request (deadlines.py); a resumed request keeps its deadline.
            async with (self._deadlines.timeout(timeout) if resume is None
                        else asyncio.timeout_at(resume.when)):
                slots = Slots() if resume is None else resume.slots  # circuit-breaker slots held
                try:  # the attempts, inline (no coroutine of their own)
                    head = exchange.request
                    policy = rule.retry
                    body: ReplayableBody
                    budget: RetryBudget | None = None  # the first attempt's service's
                    if resume is not None:
                        body, budget = resume.body, resume.budget
                    else:
                        source: Body = exchange.body
                        if rule.mirrors:  # copies for shadow services; the body through a tap
                            outcome.mirror_tap = self._mirrors.start(
                                ctx, head, source, rule, self._settings.retry_buffer_bytes)
                            source = outcome.mirror_tap or source  # type: ignore[assignment]
                        body = ReplayableBody(source, self.retry_buffer(rule))
                    while True:
                        if resume is not None:
                            cluster = resume.cluster
                            result, response, connection, error = resume.attempt
                            resume = None
                        else:
                            if first is not None:
                                picked, first = first, None
                            else:
                                outcome.attempts += 1
                                picked = self._pick(ctx, head, rule, outcome)
                            # (else: choose()'s)
                            if isinstance(picked, Result) or self._workload_limits:
                                admitted = await self._admit(ctx, exchange, rule, outcome, picked)
                                if admitted is None:
                                    return
                                picked = admitted
                            cluster, endpoint = picked
                            if budget is None:
                                budget = cluster.budget
                                budget.record_request()
                            upstream_head = self._upstream_head(ctx, head, rule, outcome)
                            result, response, connection, error = await self._attempt(
                                ctx, exchange, cluster, endpoint, upstream_head, body, rule, slots)
                        # The budget and the breaker are asked only when a retry is
                        # possible (settled: a response the policy does not retry).
                        step = settled(policy, head.method, result) or next_step(
                            policy, head.method, result, Progress(
                            attempts=outcome.attempts, body_replayable=body.replayable,
                            client_gone=exchange.client_gone, budget_has_room=budget.has_room(),
                            retry_slot_free=cluster.breaker.retry_slot_free()))
                        if step.spend_budget and not budget.try_retry():
                            self._metrics.count_budget_exhausted(outcome.service)
                        if step.take_retry_slot:
                            slots.retry(cluster.breaker)
                        if step.upgrade_refusal:
                            self._metrics.count_upgrade_refusal(wire_protocol(head), UNEXPECTED_101)
                        if step.action is Action.RETRY:
                            self._metrics.count_retry(outcome.service, step.retry_reason)
                            if response is not None:
                                _discard(response, connection)
                            await asyncio.sleep(backoff_delay(outcome.attempts, policy.backoff,
                                                              self._random))
                            continue
                        if step.action is Action.ABANDON:
                            raise BodyError(str(error))
                        if step.action is Action.RESPOND:
                            assert response is not None
                            outcome.flags.extend(step.flags)
                            await stream_response(exchange, rule, response, connection, outcome)
                            return
                        await _answer(exchange, outcome, step)
                        return
                finally:
                    slots.release()
        except TimeoutError:
            await _answer(exchange, outcome, attempts.request_timeout(exchange.responded))

    @staticmethod
    def _upstream_head(ctx: RequestContext, head: RequestHead, rule: CompiledRule,
                       outcome: Outcome) -> RequestHead:
        """The request as the attempt sends it: the rule's header modifiers applied, and
        from the second attempt on, its count."""
        upstream_head = RequestHead(
            head.method, head.path, head.authority,
            apply_modifier(head.headers, rule.request_headers), head.scheme,
            "2" if ctx.http2_upstream else "1.1")
        if outcome.attempts > 1:
            # A copy: without header modifiers the list is the client's own, and an
            # append would pile one count per attempt onto it.
            upstream_head.headers = [
                *upstream_head.headers,
                ("x-envoy-attempt-count", str(outcome.attempts))]
        return upstream_head

    def retry_buffer(self, rule: CompiledRule) -> int:
        """The bytes of a request body kept for the rule's retries."""
        return self._settings.retry_buffer_bytes if rule.retry.attempts else 0

    def start(self, ctx: RequestContext, exchange: H1Exchange, rule: CompiledRule,
              outcome: Outcome, done: Done) -> None:
        """``forward`` from a protocol callback, for an HTTP/1.1 request whose (empty) body
        has arrived: the first attempt is picked, authorized and sent on a pooled
        connection here, and when the response is small and passed on as it is (the
        policy does not retry it), it is written from the upstream connection's callback
        (``_Flight``): no task, no coroutine.  `done(None)` when the exchange has ended
        that way; `done(rest)` with the coroutine that carries it on (``forward`` with
        what is known so far) for anything else: no pooled connection, a retry, a
        response still arriving, a full client socket, a timeout.  `done` is called
        exactly once, maybe before this returns."""
        if rule.mirrors or self._workload_limits or ctx.http2_upstream \
                or rule.retry.per_try_timeout_seconds is not None:
            done(self.forward(ctx, exchange, rule, outcome))
            return
        head = exchange.request
        outcome.attempts += 1
        picked = self._pick(ctx, head, rule, outcome)
        if isinstance(picked, Result):
            done(self.forward(ctx, exchange, rule, outcome, first=picked))
            return
        cluster, endpoint = picked
        connection = self._clusters.pooled(ctx, endpoint, cluster)
        if not isinstance(connection, H1Client):
            done(self.forward(ctx, exchange, rule, outcome, first=picked))
            return
        slots = Slots()
        try:
            slots.request(cluster.breaker)
        except Overflow:  # forward's attempt meets the same refusal and answers it
            done(self.forward(ctx, exchange, rule, outcome, first=picked))
            return
        budget = cluster.budget
        budget.record_request()
        flight = _Flight(self, ctx, exchange, rule, outcome, cluster, endpoint, connection,
                         slots, budget, done)
        timeout = rule.timeouts.request_seconds
        if timeout:
            flight.alarm = self._deadlines.alarm(timeout, flight.expired)
        exchange.on_lost = flight.lost
        connection.send_now(self._upstream_head(ctx, head, rule, outcome), flight.landed)

    async def choose(self, ctx: RequestContext, exchange: Exchange, rule: CompiledRule,
                     outcome: Outcome) -> Picked | None:
        """The rule's backend service by weight, then an endpoint by its balancer, then the
        destination's authorization and its workload's rate limit.  None: answered already
        (503 UH, 403 UAEX, 429 RL)."""
        return await self._admit(ctx, exchange, rule, outcome,
                                 self._pick(ctx, exchange.request, rule, outcome))

    async def _admit(self, ctx: RequestContext, exchange: Exchange, rule: CompiledRule,
                     outcome: Outcome, picked: Picked | Result) -> Picked | None:
        """choose() after the pick: answer a pick that failed, apply the workload's rate
        limit.  None: answered already."""
        head = exchange.request
        if isinstance(picked, Result):
            await _answer(exchange, outcome, next_step(rule.retry, head.method, picked,
                                                       Progress(outcome.attempts)))
            return None
        if self._workload_limits and picked[1].backend.workload is not None:
            ref = picked[1].backend.workload
            limiter = self._workload_limits.get((ref.namespace, ref.name))
            if limiter is not None and await rate_limited(ctx, exchange, limiter, outcome,
                                                          self._metrics, "workload"):
                return None
        return picked

    def _pick(self, ctx: RequestContext, head: RequestHead, rule: CompiledRule,
              outcome: Outcome) -> Picked | Result:
        choice = rule.backend(self._random.random())
        cluster = self._clusters.get(choice.service, choice.port or ctx.entry.port,
                                     ctx.version)
        if cluster is None or not cluster.endpoints:
            return Result(Ended.NO_HEALTHY_UPSTREAM)
        outcome.service = cluster.entry.fqdn
        endpoints = cluster.available
        if not endpoints:  # all ejected (allowLastHealthyEjection)
            return Result(Ended.NO_HEALTHY_UPSTREAM)
        endpoint = cluster.balancer.pick(untried(endpoints, outcome.tried),
                                         cluster.hash_key(ctx, head))
        outcome.tried.add(endpoint.key)
        outcome.endpoint, outcome.destination = endpoint, endpoint.backend.workload
        if not self._authorizer.allows(ctx, endpoint.backend, head):
            return Result(Ended.DENIED)
        return cluster, endpoint

    async def _attempt(self, ctx: RequestContext, exchange: Exchange, cluster: Cluster,
                       endpoint: Endpoint, head: RequestHead, body: ReplayableBody,
                       rule: CompiledRule, slots: Slots
                       ) -> tuple[Result, UpstreamResponse | None,
                                  UpstreamConnection | None, UpstreamError | None]:
        """One exchange with the endpoint: a request slot, a connection, the send under
        the per-try timeout; recorded in the endpoint's statistics and, when the result
        says something about the endpoint, its outlier detector."""
        per_try = rule.retry.per_try_timeout_seconds
        response: UpstreamResponse | None = None
        connection: UpstreamConnection | None = None
        error: UpstreamError | None = None
        started = endpoint.stats.begin()
        judged = True  # does the result say something about the endpoint (outliers)?
        try:
            slots.request(cluster.breaker)
            connection = self._clusters.pooled(ctx, endpoint, cluster)
            if connection is None:
                connection = await self._clusters.connect(ctx, endpoint, cluster)
            if per_try is None:
                response = await connection.send(head, body.reader())
            else:
                async with self._deadlines.timeout(per_try):
                    response = await connection.send(head, body.reader())
        except Refused as e:
            error = UpstreamError("UF", str(e))
            judged = e.reason != "denied"  # a policy refusal is not the endpoint's
        except Overflow:
            endpoint.stats.end(started, ok=False)
            return Result(Ended.OVERFLOW), None, None, None
        except UpstreamError as e:
            error = e
        except TimeoutError:
            error = UpstreamError("UT", "per-try timeout")
            if connection is not None:
                abort_exchange(connection)
        except asyncio.CancelledError:
            # The request timeout (or the client) ended the exchange mid-attempt: the
            # connection's response would never be read, so it cannot serve again.
            endpoint.stats.end(started, ok=False)
            if connection is not None:
                abort_exchange(connection)
            raise
        status = response.head.status if response else None
        endpoint.stats.end(started, ok=status is not None and status < 500)
        slots.attempt_done()
        if cluster.outlier is not None and judged and (error is None or error.flag != "DC"):
            cluster.outlier.record(endpoint.key, status)
        if response is not None:
            assert status is not None
            return (Result(Ended.RESPONSE, status, grpc_status_of(response.head.headers)),
                    response, connection, None)
        assert error is not None
        return _failed(exchange, error, connection)


class Resumed(NamedTuple):
    """A request begun on the callback path, handed to ``forward`` after its first
    attempt: what forward's loop would hold at that point."""

    cluster: Cluster
    budget: RetryBudget
    slots: Slots
    body: ReplayableBody
    attempt: Attempted
    when: float | None  # the request timeout's deadline (loop time), None: none


class _Flight:
    """The first attempt of a request served from callbacks (``Router.start``): it ends
    when the upstream's response head lands, the request timeout rings or the client
    goes, whichever is first; each does what ``forward``'s task does at that point."""

    __slots__ = ("_router", "_ctx", "_exchange", "_rule", "_outcome", "_cluster",
                 "_endpoint", "_connection", "_slots", "_budget", "_done",
                 "_started", "alarm")

    def __init__(self, router: Router, ctx: RequestContext, exchange: H1Exchange,
                 rule: CompiledRule, outcome: Outcome, cluster: Cluster, endpoint: Endpoint,
                 connection: H1Client, slots: Slots, budget: RetryBudget, done: Done):
        self._router = router
        self._ctx = ctx
        self._exchange = exchange
        self._rule = rule
        self._outcome = outcome
        self._cluster = cluster
        self._endpoint = endpoint
        self._connection = connection
        self._slots = slots
        self._budget = budget
        self._done = done
        self._started = endpoint.stats.begin()
        self.alarm: Alarm | None = None

    def landed(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        """The upstream answered (a head), or failed before it did: ``_attempt``'s
        bookkeeping, then the response written here when it is whole and passed on as it
        is, else ``forward`` carries on from this attempt.  (A failure here ends the
        exchange as a handler's failure does: reset.)"""
        try:
            self._land(response, error)
        except Exception:
            log.exception("HTTP/1.1 request handler failed")
            self._slots.release()
            self._exchange.reset()
            self._done(None)

    def _land(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        exchange, outcome = self._exchange, self._outcome
        exchange.on_lost = None
        alarm = self.alarm
        if alarm is not None:
            alarm.cancel()
        endpoint, cluster, connection = self._endpoint, self._cluster, self._connection
        status = response.head.status if response is not None else None
        endpoint.stats.end(self._started, ok=status is not None and status < 500)
        self._slots.attempt_done()
        if cluster.outlier is not None and (error is None or error.flag != "DC"):
            cluster.outlier.record(endpoint.key, status)
        attempt: Attempted
        if response is not None:
            assert status is not None
            result = Result(Ended.RESPONSE, status, grpc_status_of(response.head.headers))
            body = response.body
            if body.ended and body.trailers is None and settled(
                    self._rule.retry, exchange.request.method, result) is not None:
                # (settled's only step is RESPOND, without flags.)  The whole response,
                # in one write, as stream_response's first branch writes it.
                if respond_whole(exchange, self._rule, response, outcome):
                    if result.grpc_status is not None:
                        outcome.grpc_status = str(result.grpc_status)
                    self._slots.release()
                    self._done(None)
                    return
                self._done(self._finish(response, result.grpc_status))
                return
            attempt = (result, response, connection, None)
        else:
            assert error is not None
            attempt = _failed(exchange, error, connection)
        # (The request's body is empty: its replayable view is made only here.)
        body = ReplayableBody(exchange.body, self._router.retry_buffer(self._rule))
        self._done(self._router.forward(
            self._ctx, exchange, self._rule, outcome,
            resume=Resumed(cluster, self._budget, self._slots, body, attempt,
                           alarm.when if alarm is not None else None)))

    async def _finish(self, response: UpstreamResponse, grpc: int | None) -> None:
        """The whole response was written and the client's socket is full (or the client
        gone): stream_response's steps after its write, under the request timeout."""
        exchange, outcome = self._exchange, self._outcome
        alarm = self.alarm
        try:
            async with asyncio.timeout_at(alarm.when if alarm is not None else None):
                try:
                    await exchange.drain()
                    if exchange.client_gone:
                        raise ConnectionResetError("client went away")
                    await exchange.finish(None)
                except (ConnectionError, OSError):
                    outcome.flags.append("DC")
                    abort_exchange(self._connection, response)
                finally:
                    self._slots.release()
                if grpc is not None:
                    outcome.grpc_status = str(grpc)
        except TimeoutError:
            await _answer(exchange, outcome, attempts.request_timeout(exchange.responded))

    def _give_up(self) -> None:
        """The attempt is given up before its response (``_attempt`` cancelled)."""
        self._connection.forget()
        self._endpoint.stats.end(self._started, ok=False)
        abort_exchange(self._connection)
        self._slots.release()

    def expired(self) -> None:
        """The request timeout rang before the response head: 504 UT."""
        self._exchange.on_lost = None
        self._give_up()
        self._done(_answer(self._exchange, self._outcome,
                           attempts.request_timeout(self._exchange.responded)))

    def lost(self) -> None:
        """The client connection was lost before the response head."""
        alarm = self.alarm
        if alarm is not None:
            alarm.cancel()
        self._give_up()
        self._done(None)


def _failed(exchange: Exchange, error: UpstreamError,
            connection: UpstreamConnection | None) -> Attempted:
    """An attempt that ended in `error` before a response, as ``_attempt`` returns it."""
    if error.flag == "DC":
        broken = exchange.body.error
        malformed = broken.status if isinstance(broken, MalformedRequest) \
            and not exchange.responded else None
        return Result(Ended.CLIENT_GONE, malformed_status=malformed), None, None, error
    if error.flag == "UPE":
        return Result(Ended.UNEXPECTED_101), None, None, error
    return (Result.no_response(error.flag, refused_stream=error.refused_stream),
            None, connection, error)


def respond_whole(exchange: H1Exchange, rule: CompiledRule, response: UpstreamResponse,
                  outcome: Outcome) -> bool:
    """Pass on a response whose body has ended (no trailers) in one write, with the
    rule's response header modifiers; False when the client's socket is full after the
    write (or the client is gone): then drain, check and finish as after a send."""
    head = response.head
    outcome.status = head.status
    data = response.body.take()
    finished = exchange.respond_whole(
        ResponseHead(head.status, apply_modifier(head.headers, rule.response_headers)), data)
    outcome.bytes_sent += len(data)
    return finished


async def _answer(exchange: Exchange, outcome: Outcome, step: Step) -> None:
    """Carry out a step that ends the request here: a local reply or a reset."""
    outcome.flags.extend(step.flags)
    if step.action is Action.RESET:
        exchange.reset()
    else:
        await local_reply(exchange, outcome, step.status, step.text)


async def stream_response(exchange: Exchange, rule: CompiledRule,
                          response: UpstreamResponse, connection: UpstreamConnection | None,
                          outcome: Outcome) -> None:
    """Stream the upstream response back, with the rule's response header modifiers; a
    backend that breaks off mid-response resets the client's exchange (UC)."""
    body = response.body
    grpc = grpc_status_of(response.head.headers)
    try:
        if body.ended and body.trailers is None and type(exchange) is H1Exchange:
            # The whole response is here already (a small one arrives in one read): the
            # same bytes in one write, and no coroutine per step.
            if not respond_whole(exchange, rule, response, outcome):
                # the client's socket is full: as after send(), wait for it
                await exchange.drain()
                if exchange.client_gone:
                    raise ConnectionResetError("client went away")
                await exchange.finish(None)
        else:
            outcome.status = response.head.status
            head = ResponseHead(response.head.status,
                                apply_modifier(response.head.headers, rule.response_headers))
            await exchange.respond(head, end=body.ended and body.buffered == 0
                                   and body.trailers is None)
            while True:
                data = await body.read()
                if not data:
                    break
                await exchange.send(data)
                outcome.bytes_sent += len(data)
                if exchange.client_gone:
                    raise ConnectionResetError("client went away")
            if body.trailers:
                trailer_grpc = grpc_status_of(body.trailers)
                grpc = trailer_grpc if trailer_grpc is not None else grpc
            await exchange.finish(body.trailers)
    except BodyError:
        outcome.flags.append("UC")  # the backend broke off mid-response
        exchange.reset()
    except (ConnectionError, OSError):
        outcome.flags.append("DC")
        if connection is not None:
            abort_exchange(connection, response)
    except asyncio.CancelledError:
        if connection is not None and not (body.ended and body.buffered == 0):
            abort_exchange(connection, response)  # the rest will never be read
        raise
    if grpc is not None:
        outcome.grpc_status = str(grpc)


def _discard(response: UpstreamResponse, connection: UpstreamConnection | None) -> None:
    """A response not passed on (its attempt will be retried): read it to its end in the
    background so an HTTP/1.1 connection can serve again, or drop the connection."""
    body: Body = response.body
    if body.ended and body.buffered == 0:
        return
    cancel = getattr(body, "cancel", None)
    if cancel is not None:
        cancel()  # HTTP/2: reset just this stream
        return

    async def drain() -> None:
        try:
            async with asyncio.timeout(1.0):
                while await body.read():
                    pass
        except (TimeoutError, BodyError):
            if connection is not None:
                abort_exchange(connection)

    task = asyncio.get_running_loop().create_task(drain())
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


_DRAINING: set[asyncio.Task[None]] = set()

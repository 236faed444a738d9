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
import random
from typing import Protocol

from nodeproxy.codec.h1 import H1Exchange
from nodeproxy.codec.message import (
    NO_BODY,
    Body,
    BodyError,
    BodySource,
    Exchange,
    MalformedRequest,
    OutgoingBody,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
    grpc_status_of,
)
from nodeproxy.codec.upgrade import UNEXPECTED_101
from nodeproxy.config.model import HeaderModifier, HttpSettings
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
from nodeproxy.http.balancer import untried
from nodeproxy.http.circuit_breaker import Overflow
from nodeproxy.http.clusters import Cluster
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.deadlines import Deadlines
from nodeproxy.http.local_reply import local_reply, rate_limited
from nodeproxy.http.mirror import Mirrors
from nodeproxy.http.pool import Endpoint, abort_exchange
from nodeproxy.http.rate_limit import Limiter
from nodeproxy.http.resilience import Slots
from nodeproxy.http.retry import RetryBudget, backoff_delay
from nodeproxy.http.routes import CompiledRule, apply_modifier
from nodeproxy.mesh.destinations import Backend
from nodeproxy.mesh.upstream import Refused
from nodeproxy.telemetry.request_metrics import RequestMetrics, wire_protocol

Picked = tuple[Cluster, Endpoint]


class ClusterSource(Protocol):
    """What the router asks of the clusters: http/clusters.py's Clusters (a protocol, so
    the compiled build, which checks classes at run time, takes a test's fake too)."""

    def get(self, service: str, port: int, version: int) -> Cluster | None: ...

    def pooled(self, ctx: RequestContext, endpoint: Endpoint,
               cluster: Cluster) -> UpstreamConnection | None: ...

    async def connect(self, ctx: RequestContext, endpoint: Endpoint,
                      cluster: Cluster) -> UpstreamConnection: ...


class RequestCheck(Protocol):
    """The destination's L7 check: http/authorize.py's RequestAuthorizer."""

    def allows(self, ctx: RequestContext, backend: Backend, head: RequestHead) -> bool: ...


class Router:
    """Forwards routed requests (see the module docstring); one per node."""

    def __init__(self, *, clusters: ClusterSource, authorizer: RequestCheck,
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
                      outcome: Outcome) -> None:
        """Forward under the rule's request timeout (504, UT, when it passes)."""
        timeout = rule.timeouts.request_seconds
        # As asyncio.timeout (not wait_for: no extra task per request), without a loop
        # timer per request and without `async with`'s two coroutines (deadlines.py).
        deadline = self._deadlines.begin(timeout) if timeout else None
        timed_out = False
        try:
            slots = Slots()  # the circuit-breaker slots the request holds
            try:  # the attempts, inline (no coroutine of their own)
                head = exchange.request
                policy = rule.retry
                source: BodySource = exchange.body
                if rule.mirrors:  # copies for shadow services; the body is read through a tap
                    outcome.mirror_tap = self._mirrors.start(
                        ctx, head, exchange.body, rule, self._settings.retry_buffer_bytes)
                    source = outcome.mirror_tap or source
                # A request its head ended (the shared NO_BODY, not a mirrors' tap) is sent
                # as it is by every attempt: nothing to record for a replay.
                body = None if source is NO_BODY else ReplayableBody(
                    source, self._settings.retry_buffer_bytes if policy.attempts else 0)
                budget: RetryBudget | None = None  # the first attempt's service's
                while True:
                    outcome.attempts += 1
                    picked = self._pick(ctx, head, rule, outcome)
                    if isinstance(picked, Result) or self._workload_limits:  # else: choose()'s
                        admitted = await self._admit(ctx, exchange, rule, outcome, picked)
                        if admitted is None:
                            return
                        picked = admitted
                    cluster, endpoint = picked
                    if budget is None:
                        budget = cluster.budget
                        budget.record_request()
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
                    result, response, connection, error = await self._attempt(
                        ctx, exchange, cluster, endpoint, upstream_head, body, rule, slots)
                    # The budget and the breaker are asked only when a retry is
                    # possible (settled: a response the policy does not retry).
                    step = settled(policy, head.method, result) or next_step(
                        policy, head.method, result, Progress(
                        attempts=outcome.attempts,
                        body_replayable=body is None or body.replayable,
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
                        await stream_response(exchange, rule.response_headers, response,
                                              connection, outcome)
                        return
                    await _answer(exchange, outcome, step)
                    return
            finally:
                slots.release()
        except asyncio.CancelledError:
            if deadline is None or not deadline.end(True):
                raise
            timed_out = True
        except TimeoutError:
            timed_out = True
        finally:
            if deadline is not None:
                deadline.end(False)  # (nothing when ended above)
        if timed_out:
            await _answer(exchange, outcome, attempts.request_timeout(exchange.responded))

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
                       endpoint: Endpoint, head: RequestHead, body: ReplayableBody | None,
                       rule: CompiledRule, slots: Slots
                       ) -> tuple[Result, UpstreamResponse | None,
                                  UpstreamConnection | None, UpstreamError | None]:
        """One exchange with the endpoint: a request slot, a connection, the send under
        the per-try timeout; recorded in the endpoint's statistics and, when the result
        says something about the endpoint, its outlier detector.  `body` None: the
        request has none (NO_BODY is sent)."""
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
            outgoing: OutgoingBody = NO_BODY if body is None else body.reader()
            if per_try is None:
                response = await connection.send(head, outgoing)
            else:
                deadline = self._deadlines.begin(per_try)
                try:
                    response = await connection.send(head, outgoing)
                except asyncio.CancelledError:
                    if deadline.end(True):
                        raise TimeoutError from None
                    raise
                finally:
                    deadline.end(False)
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
        if error.flag == "DC":
            broken = exchange.body.error
            malformed = broken.status if isinstance(broken, MalformedRequest) \
                and not exchange.responded else None
            return Result(Ended.CLIENT_GONE, malformed_status=malformed), None, None, error
        if error.flag == "UPE":
            return Result(Ended.UNEXPECTED_101), None, None, error
        return (Result.no_response(error.flag, refused_stream=error.refused_stream),
                None, connection, error)


async def _answer(exchange: Exchange, outcome: Outcome, step: Step) -> None:
    """Carry out a step that ends the request here: a local reply or a reset."""
    outcome.flags.extend(step.flags)
    if step.action is Action.RESET:
        exchange.reset()
    else:
        await local_reply(exchange, outcome, step.status, step.text)


async def stream_response(exchange: Exchange, modifier: HeaderModifier | None,
                          response: UpstreamResponse, connection: UpstreamConnection | None,
                          outcome: Outcome) -> None:
    """Stream the upstream response back, with the route's response header modifier; a
    backend that breaks off mid-response resets the client's exchange (UC), a client
    that goes away aborts the upstream exchange (DC).  The one loop that passes a
    response on: the router's, a declined upgrade's, and a destination node's that
    judges requests itself (listeners/inbound_hbone_l7.py)."""
    outcome.status = response.head.status
    grpc = grpc_status_of(response.head.headers)
    # Without a response modifier the upstream's head is passed on as it is (no copy).
    head = response.head if modifier is None else ResponseHead(
        response.head.status, apply_modifier(response.head.headers, modifier))
    body = response.body
    try:
        if body.ended and body.trailers is None and type(exchange) is H1Exchange:
            # The whole response is here already (a small one arrives in one read): the
            # same bytes in one write, and no coroutine per step.
            data = body.take()
            finished = exchange.respond_whole(head, data)
            outcome.bytes_sent += len(data)
            if not finished:  # the client's socket is full: as after send(), wait for it
                await exchange.drain()
                if exchange.client_gone:
                    raise ConnectionResetError("client went away")
                await exchange.finish(None)
        else:
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

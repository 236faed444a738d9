"""One request of a client connection, from its head to its record (the request side of
Envoy's HTTP connection manager, and its filter chain before the router).

Per request, in this order: the source pod's fair share (``limits.perPod.maxRequests``
in flight over all its connections; past it 503 at once, flag OM, as Envoy's overload
manager); the request's one meaning (request_target.py, header_fields.py: the target
normalized, one value per header name; a refusal is 400, flag DPE, or a 307 to the
normalized target); CONNECT refused (403); the route rule (none: 404, flag NR); the
rule's rate limit (429, RL); the rule's fault delay (DI) and abort (FI); then an
HTTP/1.1 upgrade (upgrade_flow.py) or the router (router.py), which picks, authorizes,
retries and streams the response.  Each request ends in one record (recorder.py).

A client too slow to send its body is cut off: no whole request within
``http.requestTimeoutSeconds`` of its head (408 if nothing was answered yet, and the
connection closes).  A rule without a request timeout is declared streaming: its
requests may take as long as they take to arrive, too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from nodeproxy.codec.h1 import H1Exchange
from nodeproxy.codec.header_fields import one_view
from nodeproxy.codec.message import BodyError, Exchange, MalformedRequest, RequestHead
from nodeproxy.codec.request_target import (
    Normalized,
    Refusal,
    TargetPolicy,
    normalize,
    normalize_authority,
)
from nodeproxy.codec.upgrade import connect_refusal
from nodeproxy.config.model import HttpSettings
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.fault import ABORT_BODY, Fault
from nodeproxy.http.local_reply import local_reply, refuse_rate_limited
from nodeproxy.http.recorder import Recorder
from nodeproxy.http.router import Router
from nodeproxy.http.routes import Routes
from nodeproxy.http.upgrade_flow import Tunnel, Upgrades
from nodeproxy.tcp.fairshare import REQUEST_LIMIT, RefusalLog, SourceShares
from nodeproxy.telemetry.request_metrics import RequestMetrics, wire_protocol
from nodeproxy.telemetry.trace_start import UNSAMPLED, first_decision

if TYPE_CHECKING:
    from nodeproxy.telemetry.request_spans import RequestSpan, Tracer

log = logging.getLogger(__name__)

OVERLOAD_TEXT = "overloaded: too many requests in flight from this pod"


class RequestHandler:
    """Serves the requests of every L7 client connection (see the module docstring)."""

    def __init__(self, *, router: Router, upgrades: Upgrades, recorder: Recorder,
                 metrics: RequestMetrics, shares: SourceShares | None, rng: random.Random):
        self._router = router
        self._upgrades = upgrades
        self._recorder = recorder
        self._metrics = metrics
        self._shares = shares  # requests in flight per source pod
        self._random = rng
        self._refusals = RefusalLog(log)
        self._settings = HttpSettings()
        self._target_policy = TargetPolicy.of(self._settings)
        self._routes: Routes | None = None
        self._tracer: Tracer | None = None  # None: tracing off, one check per request
        # The tracer's PRNG and sampled share, read once per tracer (its properties are
        # interpreted: two Python calls per request otherwise).
        self._trace_random = rng
        self._trace_ratio = 0.0

    def update(self, settings: HttpSettings, routes: Routes, tracer: Tracer | None) -> None:
        """A new configuration: its HTTP settings, route tables and tracer."""
        self._settings = settings
        self._target_policy = TargetPolicy.of(settings)
        self._routes = routes
        self._tracer = tracer
        if tracer is not None:
            self._trace_random, self._trace_ratio = tracer.random, tracer.ratio

    async def handle(self, ctx: RequestContext, exchange: Exchange) -> None:
        """Serve one request of a client connection to its end."""
        shares = self._shares
        if shares is not None and not shares.begin_request(ctx.pod.key):
            await self._overloaded(ctx, exchange)
            return
        try:  # (the admitted request served inline: no coroutine of its own)
            start = time.monotonic()
            started_at = time.time()
            head = exchange.request
            outcome = Outcome(service=ctx.entry.fqdn)
            refusal = self._one_meaning(head)
            if refusal is not None:
                await self._refuse(ctx, exchange, outcome, refusal, start, started_at)
                return
            request_id = head.header("x-request-id")
            if request_id is None:
                request_id = self._request_id()
                head.headers.append(("x-request-id", request_id))
            tracer = self._tracer
            span: RequestSpan | None = None
            if tracer is not None:  # most requests: decided here, compiled (trace_start.py)
                decided = first_decision(head.headers, self._trace_random, self._trace_ratio)
                if decided != UNSAMPLED:
                    span = tracer.begin_decided(decided, head, request_id,
                                                int(started_at * 1e9))
            assert self._routes is not None
            rule = self._routes.table(ctx.entry.service, ctx.entry.port).match(head)
            if rule is not None:
                outcome.route = rule.route
            # A rule without a request timeout is declared streaming: its requests may take
            # as long as they take to arrive, too.
            receiving = self._request_timer(exchange) if rule is None or \
                rule.timeouts.request_seconds else None
            tunnel: Tunnel | None = None
            try:
                if head.method == "CONNECT":
                    await self._upgrades.refuse(exchange, outcome,
                                                connect_refusal(head.path, head.version))
                elif rule is None:
                    outcome.flags.append("NR")
                    await local_reply(exchange, outcome, 404)
                elif rule.rate_limit is not None and (
                        wait := rule.rate_limit.take(ctx.pod.principal)):  # no coroutine per pass
                    await refuse_rate_limited(exchange, wait, outcome, self._metrics, "route")
                elif rule.fault is not None and rule.fault.eligible(head) and await self._inject(
                        exchange, rule.fault, outcome):
                    pass
                elif isinstance(exchange, H1Exchange) and exchange.upgrade:
                    tunnel = await self._upgrades.start(ctx, exchange, rule, outcome)
                else:
                    await self._router.forward(ctx, exchange, rule, outcome)
            except BodyError:
                outcome.flags.append("DC")
            except (ConnectionError, OSError):
                outcome.flags.append("DC")
            finally:
                if receiving is not None:
                    receiving.cancel()
                if exchange.client_gone and "DC" not in outcome.flags:
                    outcome.flags.append("DC")
                if outcome.mirror_tap is not None:
                    outcome.mirror_tap.primary_done()
                self._recorder.record(ctx, exchange, outcome, start, started_at, request_id, span)
            if tunnel is not None:
                assert isinstance(exchange, H1Exchange)
                await self._upgrades.relay(ctx, exchange, tunnel, outcome, request_id)
        finally:
            if shares is not None:
                shares.end_request(ctx.pod.key)

    async def _overloaded(self, ctx: RequestContext, exchange: Exchange) -> None:
        """The source pod has maxRequests in flight: 503 OM at once, counted and logged
        (rate-limited); the request is recorded like any other."""
        start, started_at = time.monotonic(), time.time()
        outcome = Outcome(service=ctx.entry.fqdn, flags=["OM"])
        reason = "pod_" + REQUEST_LIMIT
        self._metrics.count_refused(ctx.pod.workload.namespace, ctx.pod.ref.workload, reason)
        self._refusals.refused(ctx.pod.key, reason, "HTTP request")
        request_id = exchange.request.header("x-request-id") or self._request_id()
        try:
            await local_reply(exchange, outcome, 503, OVERLOAD_TEXT)
        except (ConnectionError, OSError, BodyError):
            outcome.flags.append("DC")
        finally:
            self._recorder.record(ctx, exchange, outcome, start, started_at, request_id)

    def _request_timer(self, exchange: Exchange) -> asyncio.TimerHandle | None:
        """http.requestTimeoutSeconds for the rest of the request to arrive (none needed
        when the head ended it)."""
        seconds = self._settings.request_timeout_seconds
        if not seconds or exchange.body.ended:
            return None
        return asyncio.get_running_loop().call_later(seconds, self._request_timed_out,
                                                     exchange)

    def _request_timed_out(self, exchange: Exchange) -> None:
        body = exchange.body
        if body.ended or body.error is not None:
            return
        self._metrics.count_downstream_timeout(wire_protocol(exchange.request), "request")
        if isinstance(exchange, H1Exchange):
            exchange.keep_alive = False  # the rest of its body cannot be told from a request
        # The forwarding path sees a malformed request and answers its status, unless it
        # has answered already (then the exchange is reset).
        body.fail(MalformedRequest(408, "request timeout"))

    def _one_meaning(self, head: RequestHead) -> Refusal | Normalized | None:
        """Give the request the one meaning routing, authorization and the upstream all
        use: its header fields one per name (header_fields.py) and its target normalized
        (request_target.py), in place.  A Refusal, or the Normalized target when it is to
        be redirected to; None when the request goes on.  CONNECT's target is an
        authority, not a path: it is refused whole in _handle_admitted (upgrade.py)."""
        if head.method == "CONNECT":
            return None
        try:
            head.headers = one_view(head.headers)
            normalized = normalize(head.path, self._target_policy)
            head.authority = normalize_authority(head.authority)
        except Refusal as e:
            return e
        if normalized.redirect:
            return normalized
        head.path = normalized.target
        return None

    async def _refuse(self, ctx: RequestContext, exchange: Exchange, outcome: Outcome,
                      refusal: Refusal | Normalized, start: float, started_at: float) -> None:
        """Answer a request refused before routing: 400 (counted by reason), or 307 to its
        normalized target (UNESCAPE_AND_REDIRECT).  Nothing is forwarded."""
        head = exchange.request
        request_id = head.header("x-request-id") or self._request_id()
        try:
            if isinstance(refusal, Refusal):
                log.debug("request refused (%s): %s", refusal.reason, refusal)
                self._metrics.count_bad_request(wire_protocol(head), refusal.reason)
                outcome.flags.append("DPE")
                await local_reply(exchange, outcome, 400, "bad request")
            else:
                await local_reply(exchange, outcome, 307, "",
                                  headers=[("location", refusal.target)])
        except (BodyError, ConnectionError, OSError):
            outcome.flags.append("DC")
        finally:
            self._recorder.record(ctx, exchange, outcome, start, started_at, request_id)

    async def _inject(self, exchange: Exchange, fault: Fault, outcome: Outcome) -> bool:
        """The rule's faults: maybe hold the request (DI), then maybe answer it at once
        (FI, and say True); the caller has checked fault.eligible.  The delay is outside
        the request timeout, as Envoy's is."""
        head = exchange.request
        delay = fault.delay(self._random)
        if delay:
            outcome.flags.append("DI")
            self._metrics.count_fault(outcome.service, "delay")
            await asyncio.sleep(delay)
        abort = fault.abort(head, self._random)
        if abort is None:
            return False
        outcome.flags.append("FI")
        self._metrics.count_fault(outcome.service, "abort")
        await local_reply(exchange, outcome, abort.http_status, ABORT_BODY,
                          grpc_code=abort.grpc_code)
        return True

    def _request_id(self) -> str:
        """A random (version 4) UUID, from the proxy's PRNG: uuid4() reads the kernel's
        random pool on every call, a system call per request for an id that only has to
        be unique, not secret."""
        return request_id(self._random.getrandbits(128))


_UUID_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))  # the variant and version bits
_UUID_V4 = (0x8000 << 48) | (4 << 76)  # RFC 9562: variant 10, version 4


def request_id(bits: int) -> str:
    """``str(uuid.UUID(int=bits, version=4))`` without the UUID object (a request's id
    is made on every request that arrives without one)."""
    h = "%032x" % ((bits & _UUID_CLEAR) | _UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

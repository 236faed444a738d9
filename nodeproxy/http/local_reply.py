"""Responses the proxy makes itself (Envoy's local replies), in HTTP or gRPC form.

A local reply's body names no internals: a fixed text per status unless the caller
gives one.  A gRPC client gets a trailers-only response (HTTP 200, ``grpc-status`` and
``grpc-message``) whose code is the one given or gRPC's mapping of the HTTP status.
An exchange that has sent its response head already cannot be answered again: it is
reset.  Also here: the 429 of a local rate limit (rate_limit.py), which every stage
that takes a token answers alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from nodeproxy.codec.message import Exchange, ResponseHead
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.rate_limit import Limiter, retry_after
from nodeproxy.telemetry.request_metrics import RequestMetrics

# gRPC's mapping of HTTP statuses to gRPC codes, for local replies to gRPC clients.
GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
LOCAL_REPLY_BODY = {
    403: "RBAC: access denied",
    404: "no route",
    503: "no healthy upstream",
    429: "local_rate_limited",
}
RESOURCE_EXHAUSTED = 8  # a gRPC client refused by a rate limit gets this code


async def local_reply(exchange: Exchange, outcome: Outcome, status: int,
                      text: str | None = None, *, grpc_code: int | None = None,
                      headers: Sequence[tuple[str, str]] = ()) -> None:
    """Answer the exchange with status (see the module docstring); extra headers go on
    either form.  The outcome records the status (gRPC: 200 and the code) and bytes."""
    outcome.status = status
    if exchange.responded:
        exchange.reset()
        return
    message = text or LOCAL_REPLY_BODY.get(status, "")
    if exchange.request.is_grpc:
        code = grpc_code if grpc_code is not None else GRPC_FOR_HTTP.get(status, 2)
        outcome.status = 200
        outcome.grpc_status = str(code)
        await exchange.respond(ResponseHead(200, [
            ("content-type", "application/grpc"), ("grpc-status", str(code)),
            ("grpc-message", message), *headers]), end=True)
        return
    body = message.encode()
    await exchange.respond(ResponseHead(status, [
        ("content-type", "text/plain"), ("content-length", str(len(body))), *headers]),
        end=not body)
    if body:
        await exchange.send(body)
        outcome.bytes_sent += len(body)
        await exchange.finish()


async def rate_limited(ctx: RequestContext, exchange: Exchange, limiter: Limiter,
                       outcome: Outcome, metrics: RequestMetrics, scope: str) -> bool:
    """Take a token from limiter; without one, answer 429 (gRPC: RESOURCE_EXHAUSTED)
    with Retry-After, flag RL, and say True."""
    wait = limiter.take(ctx.pod.principal)
    if not wait:
        return False
    await refuse_rate_limited(exchange, wait, outcome, metrics, scope)
    return True


async def refuse_rate_limited(exchange: Exchange, wait: float, outcome: Outcome,
                              metrics: RequestMetrics, scope: str) -> None:
    """rate_limited's answer, for a caller that took the token itself (limiter.take
    said wait seconds): 429 with Retry-After, flag RL, counted."""
    outcome.flags.append("RL")
    metrics.count_rate_limited(outcome.service, scope)
    await local_reply(exchange, outcome, 429, grpc_code=RESOURCE_EXHAUSTED,
                      headers=[("retry-after", retry_after(wait))])

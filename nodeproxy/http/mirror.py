"""Request mirroring (shadowing): copies of a share of a rule's requests to shadow services.

This module owns what happens to a mirrored copy, from the draw that picks it to its
count in ``nodeproxy_http_mirrored_requests_total``:

- the authority rewrite (``shadow_authority``: ``-shadow`` on the host, before any port,
  as Envoy does);
- the request body (``BodyTap``, body_tap.py): the primary reads the client's body as
  before, and the tap keeps a copy while the whole body stays within
  ``http.retryBufferBytes``.  A copy is sent only once the body is complete, so a shadow
  never sees a truncated request; a larger body is not mirrored (reason
  ``body_too_large``).  The tap never waits for a mirror, so a mirror cannot hold the
  primary back;
- the copy itself (``Mirrors``): endpoint picked by the shadow service's balancer,
  authorized like any request, sent over the same pools (HBONE to other nodes, with the
  source pod's identity), its response read and discarded, under its own timeout (the
  rule's request timeout) and a cap of ``MAX_IN_FLIGHT`` copies per shadow service;
- counting and logging (rate limited) of every copy that was skipped or failed.

Nothing here touches the client's exchange: the primary's response, status, latency and
metrics are the same with or without mirrors.  Mirrored copies are not counted in
``istio_requests_total`` (Istio's client-side proxy does not count them either).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nodeproxy.codec.message import (
    Body,
    BodyError,
    ReplayableBody,
    RequestHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
)
from nodeproxy.http.body_tap import BodyTap
from nodeproxy.http.circuit_breaker import Overflow
from nodeproxy.http.pool import abort_exchange
from nodeproxy.http.routes import CompiledRule, Mirror, apply_modifier
from nodeproxy.mesh.destinations import Backend
from nodeproxy.mesh.upstream import Refused
from nodeproxy.telemetry.request_metrics import RequestMetrics

if TYPE_CHECKING:
    from nodeproxy.http.clusters import Cluster
    from nodeproxy.http.context import RequestContext
    from nodeproxy.http.pool import Endpoint

log = logging.getLogger(__name__)

SHADOW_SUFFIX = "-shadow"
# Copies in flight per shadow service; past it a copy is skipped (reason "overloaded").
MAX_IN_FLIGHT = 1024
# One log line per (service, result, reason) per this many seconds, with the count since.
LOG_INTERVAL_SECONDS = 10.0

SENT, FAILED, SKIPPED = "sent", "failed", "skipped"
_FLAG_REASON = {"UF": "connect_failure", "UC": "reset", "UT": "timeout"}


def shadow_authority(authority: str) -> str:
    """The authority a mirrored copy carries: ``-shadow`` after the host, before any port
    (Envoy's rule since it stopped appending after the port): ``web:8080`` gives
    ``web-shadow:8080``, ``web.default.svc.cluster.local`` gives
    ``web.default.svc.cluster.local-shadow``, ``[fd00::1]:80`` gives ``[fd00::1]-shadow:80``."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            return authority[:end + 1] + SHADOW_SUFFIX + authority[end + 1:]
        return authority + SHADOW_SUFFIX
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return f"{host}{SHADOW_SUFFIX}:{port}"
    return authority + SHADOW_SUFFIX


def chosen(mirrors: tuple[Mirror, ...], rng: random.Random) -> list[Mirror]:
    """The mirrors one request is copied to: each draws on its own percentage."""
    return [m for m in mirrors if m.percentage >= 100.0 or rng.random() * 100.0 < m.percentage]


# What Mirrors needs of the request path, all public: clusters.Clusters.get,
# clusters.Clusters.hash_key, authorize.RequestAuthorizer.allows, clusters.Clusters.connect.
ClusterLookup = Callable[[str, int, int], "Cluster | None"]
HashKey = Callable[["Cluster", "RequestContext", RequestHead], "str | None"]
Authorize = Callable[["RequestContext", Backend, RequestHead], bool]
Connect = Callable[["RequestContext", "Endpoint", "Cluster"], Awaitable[UpstreamConnection]]


class Mirrors:
    """Starts and tracks the mirrored copies of requests, node-wide."""

    def __init__(self, metrics: RequestMetrics, rng: random.Random, *,
                 cluster: ClusterLookup, hash_key: HashKey, authorized: Authorize,
                 connect: Connect, max_in_flight: int = MAX_IN_FLIGHT):
        self._metrics = metrics
        self._random = rng
        self._cluster = cluster
        self._hash_key = hash_key
        self._authorized = authorized
        self._connect = connect
        self._max_in_flight = max_in_flight
        self.in_flight: Counter[str] = Counter()  # per shadow service fqdn
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}

    def start(self, ctx: RequestContext, head: RequestHead, body: Body, rule: CompiledRule,
              limit: int) -> BodyTap | None:
        """Start the copies of one request (call once, before the primary reads the body).
        Returns the tap the primary must read the body through, or None if no copy was
        started (the primary then reads the body directly)."""
        tap: BodyTap | None = None
        for mirror in chosen(rule.mirrors, self._random):
            cluster = self._cluster(mirror.service, mirror.port or ctx.entry.port, ctx.version)
            if cluster is None:
                self._count(mirror.service, SKIPPED, "unknown_port")
                continue
            service = cluster.entry.fqdn
            if not cluster.endpoints:
                self._count(service, SKIPPED, "no_endpoints")
                continue
            if self.in_flight[service] >= self._max_in_flight:
                self._count(service, SKIPPED, "overloaded")
                continue
            # The copy goes with its whole body at once: no Expect: 100-continue.
            headers = [(n, v) for n, v in apply_modifier(head.headers, rule.request_headers)
                       if n != "expect"]
            shadow = RequestHead(head.method, head.path, shadow_authority(head.authority),
                                 headers, head.scheme, "2" if ctx.http2_upstream else "1.1")
            endpoints = cluster.endpoints if cluster.outlier is None \
                else cluster.outlier.available  # not to ejected endpoints
            if not endpoints:
                self._count(service, SKIPPED, "no_endpoints")
                continue
            endpoint = cluster.balancer.pick(endpoints, self._hash_key(cluster, ctx, shadow))
            if not self._authorized(ctx, endpoint.backend, shadow):
                self._count(service, SKIPPED, "denied")
                continue
            if tap is None:
                tap = BodyTap(body, limit, _content_length(head))
            self.in_flight[service] += 1
            task = asyncio.get_running_loop().create_task(
                self._run(ctx, shadow, rule, cluster, endpoint, tap, service))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return tap

    async def _run(self, ctx: RequestContext, head: RequestHead, rule: CompiledRule,
                   cluster: Cluster, endpoint: Endpoint, tap: BodyTap, service: str) -> None:
        try:
            body = await tap.copy()  # settled by the primary's end at the latest
            if isinstance(body, str):
                self._count(service, SKIPPED, body)
                return
            result, reason = await self._send(ctx, head, rule, cluster, endpoint, body)
            self._count(service, result, reason)
        except Exception:  # a bug here must not go unnoticed, nor reach the client
            log.exception("mirror to %s failed unexpectedly", service)
            self._count(service, FAILED, "error")
        finally:
            self.in_flight[service] -= 1
            if self.in_flight[service] <= 0:
                del self.in_flight[service]

    async def _send(self, ctx: RequestContext, head: RequestHead, rule: CompiledRule,
                    cluster: Cluster, endpoint: Endpoint, body: Body) -> tuple[str, str]:
        """Send one copy and read its response to the end: (result, reason)."""
        status: int | None = None
        connection: UpstreamConnection | None = None
        response: UpstreamResponse | None = None
        started = endpoint.stats.begin()
        try:
            async with asyncio.timeout(rule.timeouts.request_seconds or None):
                connection = await self._connect(ctx, endpoint, cluster)
                response = await connection.send(head, ReplayableBody(body, 0).reader())
                status = response.head.status
                while await response.body.read():
                    pass
            return SENT, str(status)
        except Refused:
            return FAILED, "connect_failure"
        except Overflow:  # the shadow service's circuit breaker: no connection for it
            return SKIPPED, "overloaded"
        except UpstreamError as e:
            return FAILED, _FLAG_REASON.get(e.flag, "reset")
        except (TimeoutError, BodyError, ConnectionError, OSError) as e:
            if connection is not None:
                abort_exchange(connection, response)
            if status is not None:
                return SENT, str(status)  # the shadow got it and answered; the rest is lost
            return FAILED, "timeout" if isinstance(e, TimeoutError) else "reset"
        finally:
            endpoint.stats.end(started, ok=status is not None and status < 500)

    def _count(self, service: str, result: str, reason: str) -> None:
        self._metrics.count_mirror(service, result, reason)
        if result == SENT:
            return
        key = (service, result, reason)
        now = time.monotonic()
        last, suppressed = self._logged.get(key, (-LOG_INTERVAL_SECONDS, 0))
        if now - last < LOG_INTERVAL_SECONDS:
            self._logged[key] = (last, suppressed + 1)
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[key] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("mirror to %s %s: %s%s", service, result, reason, more)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _content_length(head: RequestHead) -> int | None:
    value = head.header("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


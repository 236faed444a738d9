"""How a request ends in telemetry: one metric observation (Istio's request series), one
live-figure sample (``nodeproxy top`` / ``stat``), one access-log line if the source
workload asks for it, and one span if the request was sampled.

Labels are built once per (source pod, destination, service, gRPC or not) and cached
(at most 4096 sets; the cache is emptied past that).  An upgraded connection's L4 flow
writes its own access-log line when it ends (upgrade_flow.py calls ``log``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from nodeproxy.codec.message import Exchange, RequestHead
from nodeproxy.http.access_log import AccessLog, AccessLogEntry, trace_id
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.mesh.destinations import WorkloadRef
from nodeproxy.telemetry.labels import UNKNOWN, RequestLabels, TcpLabels
from nodeproxy.telemetry.live_stats import LiveStats, route_name
from nodeproxy.telemetry.request_metrics import RequestMetrics, istio_request_protocol

if TYPE_CHECKING:
    from nodeproxy.telemetry.request_spans import RequestSpan

MAX_CACHED_LABELS = 4096


class Recorder:
    def __init__(self, *, metrics: RequestMetrics, live: LiveStats | None,
                 access_log: AccessLog | None, trust_domain: str):
        self._metrics = metrics
        self._live = live
        self._access_log = access_log
        self._trust_domain = trust_domain
        self._labels: dict[tuple[object, ...], RequestLabels] = {}
        self._principals: dict[WorkloadRef, str] = {}
        # The last request's key objects, its labels and destination principal: compared
        # by identity, so a hit is always the same key (a miss takes the dicts above).
        self._last: tuple[object, ...] | None = None

    def principal(self, dest: WorkloadRef | None) -> str:
        """The destination's SPIFFE ID, or "unknown" outside the mesh (remembered per
        destination: spiffe_id validates its parts, too much to do per request)."""
        if dest is None:
            return UNKNOWN
        principal = self._principals.get(dest)
        if principal is None:
            if len(self._principals) > MAX_CACHED_LABELS:
                self._principals.clear()
            principal = self._principals[dest] = spiffe_id(
                self._trust_domain, dest.namespace, dest.service_account)
        return principal

    def record(self, ctx: RequestContext, exchange: Exchange, outcome: Outcome,
               start: float, started_at: float, request_id: str,
               span: RequestSpan | None = None) -> None:
        """The request ended (start: monotonic, started_at: wall clock)."""
        duration = time.monotonic() - start
        head = exchange.request
        dest = outcome.destination
        request_bytes = exchange.body.received
        pod, service, grpc = ctx.pod, outcome.service, head.is_grpc
        last = self._last
        if last is not None and last[0] is pod and last[1] is pod.principal \
                and last[2] is dest and last[3] is service and last[4] is grpc:
            # The same objects as the request before (one client pod, one destination):
            # its labels, without hashing the key again.
            labels, dest_principal = cast(RequestLabels, last[5]), cast(str, last[6])
        else:
            dest_principal = self.principal(dest)
            label_key = (pod.key, pod.principal, dest, service, grpc)
            cached = self._labels.get(label_key)
            if cached is None:
                if len(self._labels) > MAX_CACHED_LABELS:
                    self._labels.clear()
                cached = self._labels[label_key] = _request_labels(ctx, dest, dest_principal,
                                                                   service, head)
            labels = cached
            self._last = (pod, pod.principal, dest, service, grpc, labels, dest_principal)
        self._metrics.observe(labels, code=outcome.status, grpc_status=outcome.grpc_status,
                              flags=outcome.flag_text, duration_s=duration,
                              request_bytes=request_bytes, response_bytes=outcome.bytes_sent)
        if self._live is not None:
            self._live.request(ctx.entry.service, route_name(outcome.route), labels,
                               outcome.status, outcome.grpc_status, duration, start + duration)
        self.log(ctx, head, outcome, started_at, duration, request_bytes, request_id,
                 dest, dest_principal)
        if span is not None:  # sampled (an unsampled request has none)
            endpoint = outcome.endpoint
            span.finish(status=outcome.status, grpc_status=outcome.grpc_status,
                        flags=outcome.flag_text, attempts=outcome.attempts,
                        upstream=(str(endpoint.backend.address), endpoint.backend.port)
                        if endpoint else None, service=outcome.service,
                        source=(ctx.pod.ref.workload, ctx.pod.workload.namespace),
                        destination=(dest.workload, dest.namespace) if dest else None,
                        end_ns=int((started_at + duration) * 1e9))

    def log(self, ctx: RequestContext, head: RequestHead, outcome: Outcome,
            started_at: float, duration: float, request_bytes: int, request_id: str,
            dest: WorkloadRef | None, dest_principal: str, *,
            protocol: str | None = None) -> None:
        """One access-log line, if the source workload asks for them."""
        if self._access_log is not None and ctx.access_log:
            self._access_log.write(AccessLogEntry(
                start_time=started_at, method=head.method, authority=head.authority,
                path=head.path, protocol=protocol or head.protocol, status=outcome.status,
                grpc_status=outcome.grpc_status, response_flags=outcome.flag_text,
                bytes_received=request_bytes, bytes_sent=outcome.bytes_sent,
                duration_ms=duration * 1000.0,
                upstream_host=outcome.endpoint.key if outcome.endpoint else None,
                attempts=outcome.attempts, request_id=request_id,
                trace_id=trace_id(head.headers),
                source_principal=ctx.pod.principal, source_workload=ctx.pod.ref.workload,
                source_namespace=ctx.pod.workload.namespace,
                destination_principal=dest_principal if dest else None,
                destination_workload=dest.workload if dest else None,
                destination_namespace=dest.namespace if dest else None,
                destination_service=outcome.service))


def _request_labels(ctx: RequestContext, dest: WorkloadRef | None, dest_principal: str,
                    service: str, head: RequestHead) -> RequestLabels:
    return RequestLabels.from_tcp(TcpLabels(
        reporter="source",
        source_workload=ctx.pod.ref.workload,
        source_workload_namespace=ctx.pod.workload.namespace,
        source_principal=ctx.pod.principal or UNKNOWN,
        destination_workload=dest.workload if dest else UNKNOWN,
        destination_workload_namespace=dest.namespace if dest else UNKNOWN,
        destination_principal=dest_principal,
        destination_service=service,
        connection_security_policy="mutual_tls" if dest else "none",
    ), istio_request_protocol(head))

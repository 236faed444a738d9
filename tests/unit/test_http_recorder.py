"""The recorder's labels per request: whatever order requests of different pods,
destinations and services come in, each is counted under its own Istio labels (the
recorder remembers the last request's labels by the identity of its key's objects)."""

from __future__ import annotations

import random
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import Body, RequestHead
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.recorder import Recorder
from nodeproxy.mesh.destinations import WorkloadRef
from nodeproxy.telemetry.request_metrics import RequestMetrics


def pod(name: str, principal: str) -> SimpleNamespace:
    return SimpleNamespace(key=f"default/{name}", principal=principal,
                           ref=SimpleNamespace(workload=name),
                           workload=SimpleNamespace(namespace="default"))


def test_requests_in_any_order_are_counted_under_their_own_labels() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(metrics=RequestMetrics(registry), live=None, access_log=None,
                        trust_domain="cluster.local")
    pods = [pod("a", "spiffe://cluster.local/ns/default/sa/a"),
            pod("b", "spiffe://cluster.local/ns/default/sa/b")]
    dests = [WorkloadRef("web-0", "prod", "web", "web", None),
             WorkloadRef("api-0", "prod", "api", "api", None), None]
    services = ["web.prod.svc.cluster.local", "api.prod.svc.cluster.local"]
    rng = random.Random(3)
    want: dict[tuple[str, str, str, str, str], int] = {}
    for i in range(3000):
        p, dest = rng.choice(pods), rng.choice(dests)
        # An equal service string that is another object half the time (a miss by
        # identity must still find the same labels).
        service = rng.choice(services)
        service = service if rng.random() < 0.5 else "".join(service)
        grpc = rng.random() < 0.3
        if i in (2000, 2001):  # the same request twice, the pod's identity changed between
            p, dest, service, grpc = pods[0], dests[0], services[0], False
            if i == 2001:
                pods[0].principal = "spiffe://cluster.local/ns/default/sa/a2"
        head = RequestHead("GET", "/", "web", [("content-type", "application/grpc")]
                           if grpc else [])
        ctx = RequestContext(pod=p, entry=SimpleNamespace(service=service),  # type: ignore[arg-type]
                             version=4, http2_upstream=False, access_log=False)
        outcome = Outcome(status=200, destination=dest, service=service)
        recorder.record(ctx, SimpleNamespace(request=head, body=Body.of(b"")),  # type: ignore[arg-type]
                        outcome, 0.0, 0.0, "id")
        key = (p.ref.workload, p.principal, dest.workload if dest else "unknown", service,
               "grpc" if grpc else "http")
        want[key] = want.get(key, 0) + 1
    got: dict[tuple[str, str, str, str, str], int] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == "istio_requests_total":
                labels = s.labels
                key = (labels["source_workload"], labels["source_principal"],
                       labels["destination_workload"], labels["destination_service"],
                       labels["request_protocol"])
                got[key] = got.get(key, 0) + int(s.value)
                assert labels["destination_principal"] == (
                    "unknown" if labels["destination_workload"] == "unknown" else
                    f"spiffe://cluster.local/ns/prod/sa/{labels['destination_workload']}")
    assert got == want
    assert len(want) > 30

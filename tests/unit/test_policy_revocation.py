"""Connections judged again when the mesh state changes: Admitter.admitted_as and
still_allows (policy/admission.py), ConnectionTracker.revoke (tcp/tracker.py) and the
daemon's watcher (daemon/revocation.py).  What a new configuration resets must be exactly
what it would refuse as a new connection (an upgraded HTTP connection: as a new request),
and judging counts and logs nothing."""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections.abc import Hashable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import Workload
from nodeproxy.policy.admission import AdmissionMetrics, AdmittedAs, AdmittedRequest, Admitter
from nodeproxy.tcp.tracker import ConnectionTracker
from tests.unit.test_policy import FRONTEND, allow, config_with, deny, src
from tests.unit.test_policy_l7 import CART, op, when

IPS = [ipaddress.ip_address(a) for a in ("10.244.1.10", "10.244.3.7", "fd00::5")]
PRINCIPALS = [FRONTEND, CART, None]
PORTS = [8080, 9000]

POLICY_SETS: list[list[dict[str, Any]]] = [
    [],
    [allow(src(principals=["cluster.local/ns/shop/sa/frontend"]))],
    [deny(src(principals=["cluster.local/ns/shop/sa/cart"]))],
    [deny(src(ipBlocks=["10.244.3.0/24"]))],
    [allow({**src(namespaces=["shop"]), **op(ports=["8080"])})],
    [allow({**src(principals=["cluster.local/ns/shop/sa/frontend"]),
            **op(methods=["GET"])})],  # rules on HTTP: fails closed unless l7_checked
    [deny(when({"key": "destination.port", "values": ["9000"]}))],
    [allow(op(ports=["8080"])), deny(src(notPrincipals=["cluster.local/ns/shop/sa/cart"]))],
]
PEER_SETS: list[list[dict[str, Any]]] = [[], [{"name": "mesh", "mode": "STRICT"}]]


def build(policies: list[dict[str, Any]], peers: list[dict[str, Any]] | None = None
          ) -> tuple[Admitter, CollectorRegistry, Workload]:
    config = config_with(
        workloads=[{"name": "web", "namespace": "shop", "node": "node-b",
                    "labels": {"app": "web"}, "ips": ["10.244.2.20"]}],
        authorization_policies=policies, peer_authentications=peers or [])
    registry = CollectorRegistry()
    return Admitter(config, AdmissionMetrics(registry)), registry, config.workloads[0]


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]


@pytest.mark.parametrize("before", range(len(POLICY_SETS)))
def test_still_allows_is_what_a_new_connection_would_get_and_counts_nothing(
        before: int, caplog: pytest.LogCaptureFixture) -> None:
    """Admitted under one configuration, judged by every other: the verdict equals what
    admit() answers there for the same inputs, and judging leaves the counters and the
    log alone."""
    old, _, web_old = build(POLICY_SETS[before])
    caplog.set_level(logging.DEBUG, "nodeproxy.policy.admission")
    for policies, peers in itertools.product(POLICY_SETS, PEER_SETS):
        new, registry, web = build(policies, peers)
        for principal, ip, port, l7 in itertools.product(PRINCIPALS, IPS, PORTS,
                                                         (False, True)):
            record = old.admitted_as(web_old, principal, ip, port, l7_checked=l7)
            counted, logged = samples(registry), len(caplog.records)
            judged = new.still_allows(record, web)
            assert samples(registry) == counted and len(caplog.records) == logged
            fresh = new.admit(web, principal, ip, port, l7_checked=l7)
            assert (judged.allowed, judged.policy) == (fresh.allowed, fresh.policy), (
                policies, peers, principal, ip, port, l7)


def test_plaintext_under_strict_is_revoked() -> None:
    old, _, web = build([])
    record = old.admitted_as(web, None, IPS[0], 8080)
    assert old.still_allows(record, web).allowed
    strict, _, web = build([], [{"name": "mesh", "mode": "STRICT"}])
    verdict = strict.still_allows(record, web)
    assert not verdict.allowed and "STRICT" in verdict.reason


def test_the_same_inputs_are_one_record() -> None:
    adm, _, web = build([])
    a = adm.admitted_as(web, FRONTEND, IPS[0], 8080)
    assert adm.admitted_as(web, FRONTEND, ipaddress.ip_address("10.244.1.10"), 8080) is a
    assert adm.admitted_as(web, FRONTEND, IPS[0], 8080, l7_checked=True) is not a
    assert a == AdmittedAs("shop/web", FRONTEND, IPS[0], 8080, False)


class FakeRelay:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def test_revoke_resets_exactly_the_refused_and_asks_once_per_admission() -> None:
    tracker = ConnectionTracker()
    a = AdmittedAs("shop/web", FRONTEND, IPS[0], 8080, False)
    b = AdmittedAs("shop/web", CART, IPS[1], 8080, False)
    relays = {name: FakeRelay() for name in ("a1", "a2", "b1", "none")}
    for name, admitted in (("a1", a), ("a2", a), ("b1", b), ("none", None)):
        tracker.add(relays[name], "shop/client", "shop/web",  # type: ignore[arg-type]
                    admitted=admitted)
    asked: list[Hashable] = []

    def judge(admitted: Hashable) -> bool:
        asked.append(admitted)
        return admitted is not b

    assert tracker.revoke(judge) == [b]
    assert sorted(asked, key=str) == sorted([a, b], key=str)  # once each
    assert {n: r.aborted for n, r in relays.items()} == {"a1": 0, "a2": 0, "b1": 1, "none": 0}
    # A connection with the same pods and admission shares one tracked value.
    values = list(tracker.relays.values())
    assert values[0] is values[1]
    # abort_pod still finds its pods
    tracker.abort_pod("shop/client")
    assert all(r.aborted >= 1 for r in relays.values())


def test_the_watcher_resets_what_the_new_snapshot_refuses_and_leaves_vanished_pods_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """daemon/revocation.py on a snapshot whose admitter denies the cart: its connection
    is reset, counted and logged with the policy; a connection to a pod the snapshot no
    longer has is left to that pod's unenrollment; the frontend's goes on."""
    from types import SimpleNamespace

    from nodeproxy.daemon.revocation import Revocation

    old, _, web = build([])
    new, _, web_now = build([deny(src(principals=["cluster.local/ns/shop/sa/cart"]))])
    tracker = ConnectionTracker()
    relays = {name: FakeRelay() for name in ("cart", "frontend", "gone")}
    tracker.add(relays["cart"], "shop/web",  # type: ignore[arg-type]
                admitted=old.admitted_as(web, CART, IPS[0], 8080))
    tracker.add(relays["frontend"], "shop/web",  # type: ignore[arg-type]
                admitted=old.admitted_as(web, FRONTEND, IPS[0], 8080))
    tracker.add(relays["gone"], "shop/other",  # type: ignore[arg-type]
                admitted=AdmittedAs("shop/other", CART, IPS[0], 8080, False))
    registry = CollectorRegistry()
    watcher = Revocation(tracker, registry)
    snapshot = SimpleNamespace(admitter=new, inputs=SimpleNamespace(
        local_pods=(SimpleNamespace(workload=web_now),)))
    caplog.set_level(logging.WARNING, "nodeproxy.daemon.revocation")
    watcher(snapshot)  # type: ignore[arg-type]
    assert {n: r.aborted for n, r in relays.items()} == {"cart": 1, "frontend": 0, "gone": 0}
    assert registry.get_sample_value("nodeproxy_connections_revoked_total") == 1
    [record] = caplog.records
    assert CART in record.getMessage() and "shop/web:8080" in record.getMessage()
    assert "by policy shop/d" in record.getMessage()


# --- upgraded HTTP connections (WebSocket): judged again as their request ----------------

REQUEST_POLICY_SETS: list[list[dict[str, Any]]] = [
    [],
    [deny(op(paths=["/chat/*"]))],
    [deny({**src(principals=["cluster.local/ns/shop/sa/cart"]), **op(paths=["/chat/*"])})],
    [allow(op(paths=["/public/*"], methods=["GET"]))],
    [allow(op(hosts=["shop.example"]))],
    [deny(when({"key": "request.headers[x-tenant]", "values": ["blocked"]}))],
    [deny(when({"key": "request.headers[x-tenant]", "notValues": ["a, b"]}))],
    [allow(src(principals=["cluster.local/ns/shop/sa/frontend"]))],
    [deny(op(notMethods=["GET"]))],
]
HEADS = [
    RequestHead("GET", "/chat/ws", "shop.example", [("upgrade", "websocket")]),
    RequestHead("GET", "/public/ws", "shop.example", [("x-tenant", "blocked")]),
    RequestHead("GET", "/public/ws", "other.example", [("x-tenant", "a"), ("x-tenant", "b")]),
    RequestHead("POST", "/public/ws", "shop.example"),
]


@pytest.mark.parametrize("policies", range(len(REQUEST_POLICY_SETS)))
def test_an_upgraded_request_is_judged_again_as_a_new_request_would_be(
        policies: int, caplog: pytest.LogCaptureFixture) -> None:
    """still_allows on an AdmittedRequest answers what admit_request answers for the same
    request under the new configuration (peer authentication included), and counts and
    logs nothing; a header given twice is read joined, as admit_request reads it."""
    caplog.set_level(logging.DEBUG, "nodeproxy.policy.admission")
    for peers in PEER_SETS:
        new, registry, web = build(REQUEST_POLICY_SETS[policies], peers)
        for head, principal, ip in itertools.product(HEADS, PRINCIPALS, IPS):
            record = AdmittedRequest.of(web.key, principal, ip, 8080, head)
            counted, logged = samples(registry), len(caplog.records)
            judged = new.still_allows(record, web)
            assert samples(registry) == counted and len(caplog.records) == logged
            fresh = new.admit_request(web, principal, ip, 8080, head)
            assert (judged.allowed, judged.policy) == (fresh.allowed, fresh.policy), (
                REQUEST_POLICY_SETS[policies], peers, head.path, principal, ip)


def test_the_admitted_request_is_a_copy_of_what_was_judged() -> None:
    """Rewriting the head after the decision (as the route's header modifier does for the
    upstream) does not change what is judged again; two records of the same request are
    two connections, never merged."""
    new, _, web = build([deny(op(paths=["/chat/*"]))])
    head = RequestHead("GET", "/public/ws", "shop.example", [("x-tenant", "a")])
    record = AdmittedRequest.of(web.key, FRONTEND, IPS[0], 8080, head)
    head.path, head.headers[0] = "/chat/ws", ("x-tenant", "blocked")
    assert new.still_allows(record, web).allowed
    assert record.request.header("x-tenant") == "a"
    twin = AdmittedRequest.of(web.key, FRONTEND, IPS[0], 8080, head)
    assert twin != AdmittedRequest.of(web.key, FRONTEND, IPS[0], 8080, head)
    assert not new.still_allows(twin, web).allowed


def test_the_watcher_resets_upgraded_connections_to_local_and_remote_destinations(
        caplog: pytest.LogCaptureFixture) -> None:
    """An upgraded connection's destination may be on another node (the source judges the
    destination's policies): it is found in the workload table.  A destination in neither
    is left alone.  The log names the request."""
    from types import SimpleNamespace

    from nodeproxy.daemon.revocation import Revocation

    new, _, web = build([deny(op(paths=["/chat/*"]))])
    chat = RequestHead("GET", "/chat/ws", "shop.example")
    public = RequestHead("GET", "/public/ws", "shop.example")
    tracker = ConnectionTracker()
    relays = {name: FakeRelay() for name in ("remote-chat", "remote-public", "local-chat",
                                             "unknown-chat")}
    for name, key, head in (("remote-chat", web.key, chat), ("remote-public", web.key, public),
                            ("local-chat", "shop/local", chat),
                            ("unknown-chat", "shop/gone", chat)):
        tracker.add(relays[name], "shop/client",  # type: ignore[arg-type]
                    admitted=AdmittedRequest.of(key, FRONTEND, IPS[0], 8080, head))
    local = Workload.model_validate({"name": "local", "namespace": "shop", "node": "node-a",
                                     "labels": {"app": "web"}, "ips": ["10.244.1.30"]})
    registry = CollectorRegistry()
    snapshot = SimpleNamespace(
        admitter=new, table=SimpleNamespace(workloads={web.key: web}),
        inputs=SimpleNamespace(local_pods=(SimpleNamespace(workload=local),)))
    caplog.set_level(logging.WARNING, "nodeproxy.daemon.revocation")
    Revocation(tracker, registry)(snapshot)  # type: ignore[arg-type]
    assert {n: r.aborted for n, r in relays.items()} == {
        "remote-chat": 1, "remote-public": 0, "local-chat": 1, "unknown-chat": 0}
    assert registry.get_sample_value("nodeproxy_connections_revoked_total") == 2
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 2
    assert all("(upgraded GET /chat/ws)" in m and "by policy shop/d" in m for m in messages)
    assert "shop/local:8080" in messages[0] and "shop/web:8080" in messages[1]

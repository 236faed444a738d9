"""The source-side request check (nodeproxy/http/authorize.py) across mesh snapshots: the
destination workload and whether a policy selects it are remembered per snapshot, so a
configuration change is seen by the very next request, for the same backend object."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.loader import parse_config
from nodeproxy.http.authorize import RequestAuthorizer
from nodeproxy.http.context import RequestContext
from nodeproxy.mesh.destinations import Backend, WorkloadRef
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.mesh.snapshot import MeshInputs, MeshSnapshot, build_snapshot
from nodeproxy.policy.admission import AdmissionMetrics

NODE = """
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node: {name: n1}
workloads:
  - {name: client, node: n1, netns: /run/netns/c, cgroup: /sys/fs/cgroup/c,
     ips: [10.244.1.2], labels: {app: client}, serviceAccount: client}
  - {name: web-1, node: n2, ips: [10.244.2.9], labels: {app: web}, serviceAccount: web}
"""
ONLY_PUBLIC = """
authorizationPolicies:
  - name: web-public
    namespace: default
    action: ALLOW
    selector: {app: web}
    rules:
      - to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
"""
NOTHING = """
authorizationPolicies:
  - name: web-closed
    namespace: default
    action: DENY
    selector: {app: web}
    rules:
      - to: [{operation: {paths: ["*"]}}]
"""
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def snapshot(extra: str = "") -> MeshSnapshot:
    return build_snapshot(MeshInputs(parse_config(NODE + extra).config),
                          admission_metrics=AdmissionMetrics(CollectorRegistry()),
                          balancer=PortRoundRobin())


def ctx() -> Any:
    # The two things the check reads of the source pod: its principal and addresses (a
    # real RequestContext: the compiled build checks its arguments' classes).
    return RequestContext(pod=SimpleNamespace(  # type: ignore[arg-type]
        principal=CLIENT, workload=SimpleNamespace(ips=[ipaddress.ip_address("10.244.1.2")])),
        entry=SimpleNamespace(), version=4, http2_upstream=False, access_log=False)


def test_each_snapshot_is_judged_by_its_own_policies_for_the_same_backend() -> None:
    first = snapshot()  # no policy selects web: not checked, and that is remembered
    state = MeshState(first)
    check = RequestAuthorizer(state)
    web = next(w for w in first.config.workloads if w.name == "web-1")
    backend = Backend(ipaddress.ip_address("10.244.2.9"), 8080, WorkloadRef.of(web))

    def allows(path: str) -> bool:
        return check.allows(ctx(), backend, RequestHead("GET", path, "web:8080", []))

    for _ in range(3):
        assert allows("/private") and allows("/public/a")
    # A policy now selects it: what the last snapshot said (not policed) must not be kept.
    state.replace(snapshot(ONLY_PUBLIC))
    for _ in range(3):  # remembered, and the same answers
        assert allows("/public/a") and not allows("/private")
    state.replace(snapshot(NOTHING))
    assert not allows("/public/a") and not allows("/private")
    state.replace(snapshot())
    assert allows("/private") and allows("/public/a")


def test_a_backend_outside_the_snapshot_or_the_mesh_is_not_checked() -> None:
    check = RequestAuthorizer(MeshState(snapshot(NOTHING)))
    head = RequestHead("GET", "/", "web:8080", [])
    gone = WorkloadRef("web-9", "default", "web", "web", "n2")  # not in the table
    assert check.allows(ctx(), Backend(ipaddress.ip_address("10.244.2.10"), 80, gone), head)
    assert check.allows(ctx(), Backend(ipaddress.ip_address("192.0.2.1"), 80, None), head)


# The remembered verdicts (http/authorize.py): every input of the decision is part of
# what is remembered, so a request that differs in any of them is judged again.
BY_HEADER_AND_SOURCE = """
authorizationPolicies:
  - name: web-team
    namespace: default
    action: ALLOW
    selector: {app: web}
    rules:
      - from: [{source: {ipBlocks: ["10.244.1.0/24"]}}]
        to: [{operation: {methods: [GET], paths: ["/public/*"], hosts: ["web:8080"]}}]
        when: [{key: "request.headers[x-team]", values: ["blue"]}]
"""


def decisions(state: MeshState) -> dict[tuple[str, str, str], int]:
    return dict(state.current.admitter.request_counts)


def test_a_remembered_verdict_is_counted_per_request_and_never_lent_to_another_request(
        ) -> None:
    state = MeshState(snapshot(BY_HEADER_AND_SOURCE))
    check = RequestAuthorizer(state)
    web = next(w for w in state.current.config.workloads if w.name == "web-1")
    backend = Backend(ipaddress.ip_address("10.244.2.9"), 8080, WorkloadRef.of(web))
    source = ctx()

    def allows(method: str = "GET", path: str = "/public/a", host: str = "web:8080",
               team: str | None = "blue", pod: Any = None) -> bool:
        headers = [("x-team", team)] if team is not None else []
        return check.allows(pod or source, backend, RequestHead(method, path, host, headers))

    # Count the admitter's judgements: a repeat must not reach it (the point of the memo).
    admitter = state.current.admitter
    judged: list[str] = []
    judge = admitter.judge_request

    def counting_judge(*args: Any) -> Any:
        judged.append(args[4].path)
        return judge(*args)
    admitter.judge_request = counting_judge  # type: ignore[method-assign]
    for _ in range(5):
        assert allows()
    assert judged == ["/public/a"]  # judged once, remembered after
    assert decisions(state) == {("default/web-team", "ALLOW", "allowed"): 5}  # each one counted
    # Each input changed alone is judged on its own, before and after the allowed one.
    for _ in range(2):
        assert not allows(method="POST")
        assert not allows(path="/private")
        assert not allows(host="admin:8080")
        assert not allows(team="red")
        assert not allows(team=None)
        assert allows()
    counts = decisions(state)
    assert counts[("default/web-team", "ALLOW", "allowed")] == 7
    assert len(judged) == 11  # each denial judged (and logged) by the admitter, each time
    assert sum(n for labels, n in counts.items() if labels[2] == "denied") == 10
    # Another source pod (same principal, an address outside the ipBlocks) is judged
    # for itself, and so is the same pod object once its workload's addresses change.
    outside = RequestContext(pod=SimpleNamespace(  # type: ignore[arg-type]
        principal=CLIENT, workload=SimpleNamespace(ips=[ipaddress.ip_address("10.9.1.2")])),
        entry=SimpleNamespace(), version=4, http2_upstream=False, access_log=False)
    assert not allows(pod=outside) and allows()
    source.pod.workload = SimpleNamespace(ips=[ipaddress.ip_address("10.9.1.3")])
    assert not allows()
    # A header's lines are joined as the policies read them: two lines are not "blue".
    source.pod.workload = SimpleNamespace(ips=[ipaddress.ip_address("10.244.1.2")])
    assert allows()
    assert not check.allows(source, backend, RequestHead(
        "GET", "/public/a", "web:8080", [("x-team", "blue"), ("x-team", "red")]))


def test_a_verdict_of_policies_that_read_no_header_is_keyed_on_the_rest() -> None:
    """The key without header values (http/authorize.py makes no list then): the method,
    path and authority still tell requests apart, and a header nobody reads does not."""
    state = MeshState(snapshot(ONLY_PUBLIC))
    check = RequestAuthorizer(state)
    web = next(w for w in state.current.config.workloads if w.name == "web-1")
    backend = Backend(ipaddress.ip_address("10.244.2.9"), 8080, WorkloadRef.of(web))
    source = ctx()
    admitter = state.current.admitter
    judged: list[tuple[str, str, str]] = []
    judge = admitter.judge_request

    def counting_judge(*args: Any) -> Any:
        judged.append((args[4].method, args[4].path, args[4].authority))
        return judge(*args)
    admitter.judge_request = counting_judge  # type: ignore[method-assign]

    def allows(method: str = "GET", path: str = "/public/a", host: str = "web:8080",
               headers: list[tuple[str, str]] | None = None) -> bool:
        return check.allows(source, backend, RequestHead(method, path, host, headers or []))

    for _ in range(4):
        assert allows() and allows(headers=[("x-team", "red")])
    assert judged == [("GET", "/public/a", "web:8080")]
    for _ in range(2):
        assert not allows(method="POST")
        assert not allows(path="/private")
        assert allows(path="/public/b")
        assert allows(host="other:8080")  # the policy names no host
    assert judged.count(("POST", "/public/a", "web:8080")) == 2  # denials each time
    assert judged.count(("GET", "/private", "web:8080")) == 2
    assert judged.count(("GET", "/public/b", "web:8080")) == 1  # allowed: remembered
    assert judged.count(("GET", "/public/a", "other:8080")) == 1
    counts = decisions(state)
    assert counts[("default/web-public", "ALLOW", "allowed")] == 12

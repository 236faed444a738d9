"""Differential test of the remembered authorization verdicts: http/authorize.py's
RequestAuthorizer (allowed verdicts, by pod, backend, snapshot, method, path, authority
and the policy-read header values) and policy/admission.py's Admitter (every request
decision, by scope, principal, source address, port and the same request parts) against
a fresh, unremembering judge of the same inputs.

Each seed draws a random (bounded) policy set, then judges a random sample of
(source pod, backend, request head) through one long-lived RequestAuthorizer, each case
asked twice in a row (cold, then warm), mixed with repeats in random order, and compares
every answer with ``Authorizer.decide`` (compiled afresh) and with a fresh Admitter's
``admit_request`` on the same inputs.  It also asserts that every judged request is
counted once (``nodeproxy_authorization_decisions_total``) and that an allowed repeat
is answered from memory (the cache's hit path is kept, not just its answers).

Variants:

- policies: 1-4 per set, ALLOW and DENY, mesh-wide or namespaced, selector {app: web},
  {tier: admin} or none, no rules or 1-2 rules; ``from``: principals, notPrincipals,
  namespaces, notNamespaces, ipBlocks, notIpBlocks (IPv4 and IPv6); ``to``: methods,
  notMethods, paths, notPaths, hosts, notHosts (exact, ``prefix*``, ``*suffix``, ``*``,
  with and without port, IPv6 literals), ports, notPorts; ``when``:
  ``request.headers[...]`` under name spellings X-Team / x-team / COOKIE / User-Agent /
  host, values and notValues (``*`` presence too), source.ip, source.namespace,
  source.principal, destination.port.
- sources: a pod (IPv4 and IPv6), a hostile pod in another namespace, a second pod
  object sharing the first one's workload and principal objects, an IPv4-only pod
  sending to an IPv6 backend (source address falls back to its IPv4 one); mid-run, the
  first pod's service account and labels changed in place as Enrollment.update does
  (workload, ref and principal replaced), changed back (spiffe_id's cache hands back the
  same principal object), and its workload replaced by one with other addresses.
- backends: ports 8080 and 9090, the IPv6 address, an equal Backend object that is not
  the same object, a workload in another namespace, a ref the snapshot does not know.
- snapshots: a reload with equal policies (a new snapshot, an equal configuration), a
  reload with other policies, the destination relabelled (app: web -> tier: admin).
- requests: methods GET/POST/HEAD/get; paths with and without query, case, ``//``,
  ``/./``, ``..``, percent-escapes (``%61``, ``%2F``), trailing slash, ``*``, lengths
  that put the verdict key just under, at and over MAX_VERDICT_KEY_CHARS and the
  admitter's DECISION_KEY_CHARS; authorities with and without port, upper case, trailing
  dot, IPv6 literals, empty; headers absent, present, empty, sent twice (once empty),
  repeated cookie lines, an upper-case name (which a codec never hands over), a
  ``host`` line among the fields, values differing only by case or trailing space.

Conditions whose keys the policy model does not support (request.auth.*,
connection.sni, experimental.*, destination.ip, ...) are refused when the configuration
is loaded (test at the end), so no verdict can depend on them.
"""

from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.header_fields import joined_value
from nodeproxy.codec.message import RequestHead
from nodeproxy.config import ConfigError, parse_config
from nodeproxy.config.model import NodeConfig, Workload
from nodeproxy.http import authorize
from nodeproxy.http.authorize import MAX_VERDICT_KEY_CHARS, RequestAuthorizer
from nodeproxy.http.context import RequestContext
from nodeproxy.identity.spiffe import parse_spiffe_id, spiffe_id
from nodeproxy.mesh.destinations import Backend, WorkloadRef
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.mesh.snapshot import MeshInputs, MeshSnapshot, build_snapshot
from nodeproxy.policy.admission import DECISION_KEY_CHARS, AdmissionMetrics, Admitter
from nodeproxy.policy.authorization import (
    Authorizer,
    ConnectionAttributes,
    DestinationWorkload,
    RequestAttributes,
)

TD = "cluster.local"
ip = ipaddress.ip_address

# --- the cluster -------------------------------------------------------------------------


def workloads(web_labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": "web-1", "node": "n2", "ips": ["10.244.2.9", "fd00::2:9"],
         "labels": web_labels, "serviceAccount": "web"},
        {"name": "api-1", "namespace": "shop", "node": "n2", "ips": ["10.244.3.4"],
         "labels": {"app": "web"}, "serviceAccount": "api"},
    ]


def node_config(policies: list[dict[str, Any]], web_labels: dict[str, str] | None = None
                ) -> NodeConfig:
    document = {"apiVersion": "nodeproxy.io/v1alpha1", "kind": "NodeProxyConfig",
                "node": {"name": "n1"},
                "workloads": workloads(web_labels or {"app": "web"}),
                "authorizationPolicies": policies}
    return parse_config(json.dumps(document)).config  # JSON is YAML


def snapshot_of(config: NodeConfig) -> MeshSnapshot:
    return build_snapshot(MeshInputs(config),
                          admission_metrics=AdmissionMetrics(CollectorRegistry()),
                          balancer=PortRoundRobin())


def pod(name: str, namespace: str, sa: str, ips: list[str], pod_id: int) -> EnrolledPod:
    workload = Workload(name=name, namespace=namespace, service_account=sa,
                        ips=[ip(a) for a in ips], labels={"app": name})
    return EnrolledPod(workload=workload, ref=WorkloadRef.of(workload),
                       principal=spiffe_id(TD, namespace, sa), pod_id=pod_id,
                       netns=None, netns_cookie=pod_id, source="runtime")  # type: ignore[arg-type]


def update_in_place(enrolled: EnrolledPod, sa: str, labels: dict[str, str],
                    ips: list[str] | None = None) -> None:
    """What Enrollment.update does to a pod whose settings changed (ips: what it refuses,
    done anyway: the cache must not care how the pod object changed)."""
    old = enrolled.workload
    workload = old.model_copy(update={"service_account": sa, "labels": labels,
                                      "ips": [ip(a) for a in ips] if ips else old.ips})
    enrolled.workload = workload
    enrolled.ref = WorkloadRef.of(workload)
    enrolled.principal = spiffe_id(TD, workload.namespace, sa)


def context(enrolled: EnrolledPod) -> RequestContext:
    return RequestContext(pod=enrolled, entry=SimpleNamespace(),  # type: ignore[arg-type]
                          version=4, http2_upstream=False, access_log=False)


# --- random policies ---------------------------------------------------------------------

PRINCIPALS = [f"{TD}/ns/default/sa/client", f"spiffe://{TD}/ns/evil/sa/intruder",
              f"{TD}/ns/default/sa/*", "*/sa/admin", "*"]
NAMESPACES = ["default", "evil", "def*", "*il", "*"]
BLOCKS = ["10.244.1.0/24", "10.244.1.2/32", "fd00::1:0/112", "10.244.1.3", "0.0.0.0/0"]
METHODS = ["GET", "POST", "HEAD", "DELETE"]
PATHS = ["/public/*", "/public/a", "/admin*", "*/a", "/", "*", "/a/b", "*.json",
         "/Public/a"]
HOSTS = ["web", "web:8080", "web:*", "WEB*", "*.svc.cluster.local", "[fd00::2:9]:8080",
         "*", "admin*", "web.default.svc.cluster.local:8080"]
HEADER_KEYS = ["request.headers[X-Team]", "request.headers[x-team]",
               "request.headers[COOKIE]", "request.headers[User-Agent]",
               "request.headers[host]"]
HEADER_VALUES = ["blue", "Blue", "*", "bl*", "*ue", "a=1", "a=1; b=2", "curl*", "web*",
                 "blue, "]


def pick(rng: random.Random, pool: list[str]) -> list[str]:
    return rng.sample(pool, min(len(pool), rng.randint(1, 2)))


def random_condition(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(5)
    if kind == 0:
        key, pool = rng.choice(HEADER_KEYS), HEADER_VALUES
    elif kind == 1:
        key, pool = "source.ip", BLOCKS
    elif kind == 2:
        key, pool = "source.namespace", NAMESPACES
    elif kind == 3:
        key, pool = "source.principal", PRINCIPALS
    else:
        key, pool = "destination.port", ["8080", "9090"]
    field = rng.choice(["values", "notValues", "both"])
    condition: dict[str, Any] = {"key": key}
    if field in ("values", "both"):
        condition["values"] = pick(rng, pool)
    if field in ("notValues", "both"):
        condition["notValues"] = pick(rng, pool)
    return condition


def random_fields(rng: random.Random, fields: dict[str, list[str]]) -> dict[str, list[str]]:
    chosen = rng.sample(sorted(fields), rng.randint(1, 2))
    return {name: pick(rng, fields[name]) for name in chosen}


def random_rule(rng: random.Random) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if rng.random() < 0.4:
        rule["from"] = [{"source": random_fields(rng, {
            "principals": PRINCIPALS, "notPrincipals": PRINCIPALS,
            "namespaces": NAMESPACES, "notNamespaces": NAMESPACES,
            "ipBlocks": BLOCKS, "notIpBlocks": BLOCKS})}]
    if rng.random() < 0.8:
        rule["to"] = [{"operation": random_fields(rng, {
            "methods": METHODS, "notMethods": METHODS, "paths": PATHS, "notPaths": PATHS,
            "hosts": HOSTS, "notHosts": HOSTS, "ports": ["8080", "9090"],
            "notPorts": ["9090"]})} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.6:
        rule["when"] = [random_condition(rng) for _ in range(rng.randint(1, 2))]
    return rule


def random_policy(rng: random.Random, index: int) -> dict[str, Any]:
    policy: dict[str, Any] = {"name": f"p{index}", "action": rng.choice(["ALLOW", "DENY"])}
    namespace = rng.choice([None, "default", "default", "shop"])
    if namespace is not None:
        policy["namespace"] = namespace
    selector = rng.choice([None, {"app": "web"}, {"app": "web"}, {"tier": "admin"}])
    if selector is not None:
        policy["selector"] = selector
    if rng.random() < 0.9:
        policy["rules"] = [random_rule(rng) for _ in range(rng.randint(1, 2))]
    return policy


def random_policies(rng: random.Random) -> list[dict[str, Any]]:
    return [random_policy(rng, i) for i in range(rng.randint(1, 4))]


# --- request variants --------------------------------------------------------------------

REQ_METHODS = ["GET", "POST", "HEAD", "get"]
# Key chars: method + path + authority + header values; a few paths put the verdict key
# just under, at and over the limits (authority "web:8080", no header).
_FILL = MAX_VERDICT_KEY_CHARS - len("GET") - len("web:8080") - len("/public/")
REQ_PATHS = [
    "/public/a", "/public/a?x=1", "/Public/a", "/public//a", "/public/./a", "/public/../admin",
    "/%61dmin", "/public%2Fa", "/admin", "/admin/", "/", "*", "/a/b", "/x.json",
    "/public/" + "a" * (_FILL - 1), "/public/" + "a" * _FILL, "/public/" + "a" * (_FILL + 1),
    "/public/" + "b" * (DECISION_KEY_CHARS - 20), "/public/" + "b" * DECISION_KEY_CHARS,
]
REQ_AUTHORITIES = ["web", "web:8080", "WEB:8080", "web.", "web.:8080", "admin.internal",
                   "web.default.svc.cluster.local:8080", "[fd00::2:9]:8080", "[FD00::2:9]",
                   "[fd00::2:9]", ""]
REQ_HEADERS: list[list[tuple[str, str]]] = [
    [], [("x-team", "blue")], [("x-team", "Blue")], [("x-team", "blue ")],
    [("x-team", "")], [("x-team", "blue"), ("x-team", "")], [("x-team", ""), ("x-team", "blue")],
    [("x-team", "blue"), ("x-team", "blue")], [("X-Team", "blue")],
    [("cookie", "a=1"), ("cookie", "b=2")], [("cookie", "a=1; b=2")], [("cookie", "a=1")],
    [("user-agent", "curl/8")], [("user-agent", "")], [("host", "admin.internal")],
    [("x-team", "blue"), ("user-agent", "curl/8"), ("cookie", "a=1")],
]


def random_head(rng: random.Random) -> RequestHead:
    return RequestHead(rng.choice(REQ_METHODS), rng.choice(REQ_PATHS),
                       rng.choice(REQ_AUTHORITIES), list(rng.choice(REQ_HEADERS)))


# --- the fresh judges --------------------------------------------------------------------


def source_ip(enrolled: EnrolledPod, destination: Any) -> Any:
    """The pod's address of the destination's family, else its first (upstream.py)."""
    return next((a for a in enrolled.workload.ips if a.version == destination.version),
                enrolled.workload.ips[0])


@dataclass
class Fresh:
    allowed: bool
    policed: bool  # does a policy select the destination (is the request counted)?
    key_chars: int = 0  # the characters of the verdict's key (what _short measures)


def fresh_verdict(snapshot: MeshSnapshot, enrolled: EnrolledPod, backend: Backend,
                  head: RequestHead) -> Fresh:
    """Judged from scratch: a newly compiled Authorizer's decide, and a new Admitter."""
    ref = backend.workload
    assert ref is not None
    workload = snapshot.table.workloads.get(f"{ref.namespace}/{ref.name}")
    if workload is None:
        return Fresh(True, False)
    principal = enrolled.principal
    address, port = source_ip(enrolled, backend.address), backend.port
    # Copies of the head's parts: nothing the caches hold is shared with the judges.
    copy = RequestHead(head.method, head.path, head.authority, list(head.headers))
    authorizer = Authorizer(list(snapshot.config.authorization_policies), ())
    dest = DestinationWorkload.of(workload)
    decided = authorizer.decide(dest, ConnectionAttributes(
        source_principal=principal, source_namespace=parse_spiffe_id(principal).namespace,
        source_ip=address, destination_port=port), RequestAttributes.of(copy))
    admitter = Admitter(snapshot.config, AdmissionMetrics(CollectorRegistry()))
    admitted = admitter.admit_request(workload, principal, address, port,
                                      RequestAttributes.of(copy))
    assert admitted.allowed == decided.allowed, (head.method, head.path, head.authority)
    key_chars = len(head.method) + len(head.path) + len(head.authority) + sum(
        len(joined_value(head.headers, name) or "") for name in authorizer.headers_read(dest))
    return Fresh(decided.allowed, bool(authorizer.applicable(dest)), key_chars)


class Judged:
    """Counts the admitter's judgements: an allowed repeat must not reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def watch(self, snapshot: MeshSnapshot) -> MeshSnapshot:
        admitter = snapshot.admitter
        judge = admitter.judge_request

        def counting(*args: Any) -> Any:
            self.calls += 1
            return judge(*args)
        admitter.judge_request = counting  # type: ignore[method-assign,assignment]
        return snapshot


# --- the differential test ---------------------------------------------------------------

SEEDS = 16
BASES_PER_SEED = 2
CASES_PER_SEED = 70
REPEATS_PER_SEED = 150
EVENTS = ("reload_equal", "principal_only", "principal_back", "workload_only", "update_pod",
          "relabel_destination", "update_back", "other_policies")
Case = tuple[EnrolledPod, Backend, RequestHead]


def base_case(rng: random.Random, snapshot: MeshSnapshot, pods: list[EnrolledPod],
              backends: list[Backend]) -> Case:
    """A random request, one the policies allow when one of a few draws is (so that its
    neighbours below could be lent its remembered verdict)."""
    drawn = [(rng.choice(pods), rng.choice(backends), random_head(rng)) for _ in range(12)]
    for case in drawn:
        verdict = fresh_verdict(snapshot, *case)
        if verdict.allowed and verdict.policed:
            return case
    return drawn[0]


def neighbours(case: Case, pods: list[EnrolledPod], backends: list[Backend]) -> list[Case]:
    """The case first, then every variant that differs from it in exactly one input."""
    enrolled, backend, head = case

    def head_with(method: str = head.method, path: str = head.path,
                  authority: str = head.authority,
                  headers: list[tuple[str, str]] | None = None) -> RequestHead:
        return RequestHead(method, path, authority,
                           list(head.headers if headers is None else headers))
    return [case,
            *[(enrolled, backend, head_with(method=m)) for m in REQ_METHODS],
            *[(enrolled, backend, head_with(path=p)) for p in REQ_PATHS],
            *[(enrolled, backend, head_with(authority=a)) for a in REQ_AUTHORITIES],
            *[(enrolled, backend, head_with(headers=h)) for h in REQ_HEADERS],
            *[(other, backend, head) for other in pods],
            *[(enrolled, other, head) for other in backends]]


def counted(snapshot: MeshSnapshot) -> int:
    return sum(snapshot.admitter.request_counts.values())


def web_policy(action: str, rule: dict[str, Any], *more: dict[str, Any]
               ) -> dict[str, Any]:
    return {"name": f"{action.lower()}-{len(more)}", "namespace": "default", "action": action,
            "selector": {"app": "web"}, "rules": [rule, *more]}


# One policy set per input of the decision, so each input surely decides some verdict
# (the random sets reach them less often).
CURATED: list[list[dict[str, Any]]] = [
    [web_policy("ALLOW", {"from": [{"source": {"principals": [f"{TD}/ns/default/sa/client"]}}],
                          "to": [{"operation": {"paths": ["/public/*"]}}]})],
    [web_policy("ALLOW", {"when": [{"key": "source.principal", "notValues": ["*/sa/admin"]}]})],
    [web_policy("ALLOW", {"from": [{"source": {"ipBlocks": ["10.244.1.2/32",
                                                           "fd00::1:2/128"]}}]})],
    [web_policy("ALLOW", {"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]})],
    [web_policy("ALLOW", {"to": [{"operation": {"hosts": ["web", "web:8080"]}}]})],
    [web_policy("ALLOW", {"when": [{"key": "request.headers[x-team]", "values": ["blue"]}]}),
     web_policy("DENY", {"when": [{"key": "request.headers[cookie]",
                                   "values": ["*b=2"]}]})],
    [web_policy("ALLOW", {"to": [{"operation": {"notPaths": ["/admin*", "*/"],
                                                "notMethods": ["POST"],
                                                "notHosts": ["admin*"]}}]})],
    [web_policy("ALLOW", {"when": [{"key": "source.namespace", "values": ["default"]},
                                   {"key": "destination.port", "notValues": ["9090"]}]})],
    [web_policy("ALLOW", {}),
     web_policy("DENY", {"when": [{"key": "request.headers[user-agent]", "values": ["*"]}]})],
    [web_policy("ALLOW", {}),
     web_policy("DENY", {"when": [{"key": "request.headers[host]", "values": ["admin*"]}]})],
]


@pytest.mark.parametrize("seed", [*range(SEEDS), *[-1 - i for i in range(len(CURATED))]])
def test_remembered_verdicts_equal_fresh_ones(seed: int) -> None:
    """Seeds >= 0: random policy sets; below 0: CURATED[-1 - seed] (then random ones)."""
    rng = random.Random(seed)
    policies = random_policies(rng) if seed >= 0 else CURATED[-1 - seed]
    judged = Judged()
    state = MeshState(judged.watch(snapshot_of(node_config(policies))))
    check = RequestAuthorizer(state)

    client = pod("client", "default", "client", ["10.244.1.2", "fd00::1:2"], 1)
    intruder = pod("intruder", "evil", "intruder", ["10.244.1.3"], 2)
    twin = EnrolledPod(workload=client.workload, ref=client.ref, principal=client.principal,
                       pod_id=3, netns=None, netns_cookie=3,  # type: ignore[arg-type]
                       source="runtime")
    v4_only = pod("v4only", "default", "client", ["10.244.1.4"], 4)
    pods = [client, intruder, twin, v4_only]

    config = state.current.config
    web = next(w for w in config.workloads if w.name == "web-1")
    api = next(w for w in config.workloads if w.name == "api-1")
    web_ref, api_ref = WorkloadRef.of(web), WorkloadRef.of(api)
    backends = [
        Backend(ip("10.244.2.9"), 8080, web_ref), Backend(ip("10.244.2.9"), 9090, web_ref),
        Backend(ip("fd00::2:9"), 8080, web_ref),
        Backend(ip("10.244.2.9"), 8080, web_ref),  # equal to the first, another object
        Backend(ip("10.244.3.4"), 8080, api_ref),
        Backend(ip("10.244.2.10"), 8080, WorkloadRef("web-9", "default", "web", "web", "n2")),
    ]
    cases: list[Case] = []
    for _ in range(BASES_PER_SEED):
        cases += neighbours(base_case(rng, state.current, pods, backends), pods, backends)
    # Each case in turn, then repeats in random order; then, after each change of state
    # below, every case again (its remembered verdict, if any, was made before).
    phases: list[tuple[str, list[Case]]] = [
        ("start", [*cases, *rng.choices(cases, k=REPEATS_PER_SEED)])]
    phases += [(event, cases) for event in EVENTS]
    for event, order in phases:
        if event == "reload_equal":
            state.replace(judged.watch(snapshot_of(node_config(policies))))
        elif event == "principal_only":  # the same workload object, another identity
            client.principal = spiffe_id(TD, "default", "admin")
        elif event == "principal_back":  # spiffe_id's cache: the first principal object
            client.principal = spiffe_id(TD, "default", "client")
        elif event == "workload_only":  # other addresses, the same principal object
            client.workload = client.workload.model_copy(
                update={"ips": [ip("10.244.9.2"), ip("fd00::9:2")]})
        elif event == "update_pod":
            update_in_place(client, "admin", {"app": "client", "v": "2"})
        elif event == "relabel_destination":
            state.replace(judged.watch(snapshot_of(
                node_config(policies, {"app": "admin-web", "tier": "admin"}))))
        elif event == "update_back":
            update_in_place(client, "client", {"app": "client"}, ["10.244.1.2", "fd00::1:2"])
        elif event == "other_policies":
            policies = random_policies(rng)
            state.replace(judged.watch(snapshot_of(node_config(policies))))
        snapshot = state.current
        for step, (enrolled, backend, head) in enumerate(order):
            want = fresh_verdict(snapshot, enrolled, backend, head)
            for attempt in ("cold", "warm"):
                before_counted, before_calls = counted(snapshot), judged.calls
                got = check.allows(context(enrolled), backend, head)
                assert got == want.allowed, (seed, event, step, attempt, policies,
                                             enrolled.principal, enrolled.workload.ips,
                                             backend, head.method, head.path,
                                             head.authority, head.headers)
                # Each request to a policed destination is counted once, remembered or not.
                assert counted(snapshot) - before_counted == (1 if want.policed else 0)
                if attempt == "warm" and got and want.policed \
                        and want.key_chars <= MAX_VERDICT_KEY_CHARS:
                    # An allowed repeat is answered from memory (the hit path is kept).
                    assert judged.calls == before_calls, (seed, event, step, head.path)
    assert len(check._verdicts) <= authorize.MAX_REMEMBERED_VERDICTS


def test_the_random_policies_reach_every_kind_of_verdict() -> None:
    """The seeds are worth running: across them, requests are allowed and denied by
    ALLOW and DENY policies, remembered and not."""
    seen: set[tuple[bool, bool]] = set()
    for seed in range(SEEDS):
        rng = random.Random(seed)
        policies = random_policies(rng)
        snapshot = snapshot_of(node_config(policies))
        client = pod("client", "default", "client", ["10.244.1.2", "fd00::1:2"], 1)
        web = next(w for w in snapshot.config.workloads if w.name == "web-1")
        backend = Backend(ip("10.244.2.9"), 8080, WorkloadRef.of(web))
        for _ in range(CASES_PER_SEED):
            fresh = fresh_verdict(snapshot, client, backend, random_head(rng))
            seen.add((fresh.allowed, fresh.policed))
    assert seen == {(True, True), (False, True), (True, False)}


# --- cache flooding ----------------------------------------------------------------------


def test_a_hostile_pod_flooding_the_memory_changes_no_one_else_s_verdict() -> None:
    """A pod sending more distinct allowed requests than are remembered (every one
    allowed, each with a key near the limit) empties the memory now and then: the
    memory stays bounded and another pod's verdicts stay its own, allowed and denied."""
    policies = [{"name": "open-public", "namespace": "default", "selector": {"app": "web"},
                 "rules": [{"to": [{"operation": {"paths": ["/public/*"]}}],
                            "when": [{"key": "source.namespace", "values": ["evil"]}]},
                           {"from": [{"source": {"principals": [f"{TD}/ns/default/sa/client"]}}],
                            "to": [{"operation": {"paths": ["/own/*"]}}]}]}]
    state = MeshState(snapshot_of(node_config(policies)))
    check = RequestAuthorizer(state)
    intruder = pod("intruder", "evil", "intruder", ["10.244.1.3"], 2)
    client = pod("client", "default", "client", ["10.244.1.2"], 1)
    web = next(w for w in state.current.config.workloads if w.name == "web-1")
    backend = Backend(ip("10.244.2.9"), 8080, WorkloadRef.of(web))
    filler = "f" * (MAX_VERDICT_KEY_CHARS - 40)
    for i in range(authorize.MAX_REMEMBERED_VERDICTS * 2 + 7):
        assert check.allows(context(intruder), backend,
                            RequestHead("GET", f"/public/{i}/{filler}", "web", []))
        if i % 512 == 0:
            assert check.allows(context(client), backend, RequestHead("GET", "/own/a", "web"))
            assert not check.allows(context(client), backend,
                                    RequestHead("GET", "/public/a", "web"))
            assert not check.allows(context(intruder), backend,
                                    RequestHead("GET", "/own/a", "web"))
        assert len(check._verdicts) <= authorize.MAX_REMEMBERED_VERDICTS
    held = sum(len(part) for key in check._verdicts for part in key if isinstance(part, str))
    assert held <= authorize.MAX_REMEMBERED_VERDICTS * MAX_VERDICT_KEY_CHARS


# --- what no verdict can depend on -------------------------------------------------------


@pytest.mark.parametrize("key", ["request.auth.principal", "request.auth.claims[iss]",
                                 "connection.sni", "experimental.envoy.filters.a[b]",
                                 "destination.ip", "remote.ip", "source.port",
                                 "request.headers[:authority]", "request.headers[]"])
def test_condition_keys_the_model_does_not_judge_are_refused(key: str) -> None:
    with pytest.raises(ConfigError):
        node_config([{"name": "p", "rules": [{"when": [{"key": key, "values": ["x"]}]}]}])

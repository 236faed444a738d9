"""Unit tests for L7 authorization: HTTP operations and `when` conditions in
AuthorizationPolicy, how a connection is judged by rules on HTTP requests, and the kernel
compiler leaving those rules to the proxy."""

from __future__ import annotations

import ipaddress
import logging
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.codec.message import RequestHead
from nodeproxy.config import ConfigError, parse_config
from nodeproxy.config.model import Condition, NodeConfig, Operation, Workload
from nodeproxy.policy import (
    L7_CHECKED_UPSTREAM,
    ConnectionAttributes,
    DestinationWorkload,
    RequestAttributes,
)
from nodeproxy.policy.admission import AdmissionMetrics, Admitter
from tests.unit.test_policy import (
    FRONTEND,
    HEAD,
    WEB,
    allow,
    attrs,
    authorizer,
    config_with,
    deny,
    kernel_denies,
    src,
)

# --- the model ---------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + textwrap.dedent(text), "node.yaml")
    return info.value.problems


def test_operation_http_fields_parse() -> None:
    op = Operation.model_validate({
        "hosts": ["Shop.example.com", "*.example.com"], "notHosts": ["admin.*"],
        "methods": ["GET", "PROPFIND"], "notMethods": ["DELETE"],
        "paths": ["/api/*", "*.css", "/"], "notPaths": ["/api/admin*"],
        "ports": [8080]})
    assert op.methods == ["GET", "PROPFIND"] and op.ports == ["8080"]
    assert op.uses_l7
    assert not Operation(ports=["80"]).uses_l7
    assert Operation(not_paths=["/x"]).uses_l7


def test_when_conditions_parse() -> None:
    config = config_with(authorization_policies=[{
        "name": "p", "rules": [{"when": [
            {"key": "request.headers[X-Token]", "values": ["abc*"]},
            {"key": "source.ip", "values": ["10.0.0.0/8", "fd00::1"]},
            {"key": "source.namespace", "notValues": ["test-*"]},
            {"key": "source.principal", "values": ["spiffe://cluster.local/ns/a/sa/b"]},
            {"key": "destination.port", "values": [8080, "9090"], "notValues": ["22"]},
        ]}]}])
    when = config.authorization_policies[0].rules[0].when
    assert when is not None and [c.key for c in when][0] == "request.headers[X-Token]"
    assert when[4].values == ["8080", "9090"]
    assert config.authorization_policies[0].rules[0].uses_l7
    assert not Condition(key="source.ip", values=["10.0.0.1"]).uses_l7


def test_bad_methods_are_refused() -> None:
    assert problems("""\
        authorizationPolicies:
          - name: a
            rules:
              - to:
                  - operation:
                      methods: [get, "G*", ""]
                      notMethods: ["GET POST"]
        """) == [
        "node.yaml:10: authorizationPolicies[0].rules[0].to[0].operation.methods[0]: 'get' is "
        "not an HTTP method: methods match exactly and are upper-case tokens such as 'GET' "
        "(did you mean 'GET'?)",
        "node.yaml:10: authorizationPolicies[0].rules[0].to[0].operation.methods[1]: 'G*' is "
        "not an HTTP method: methods match exactly and are upper-case tokens such as 'GET'",
        "node.yaml:10: authorizationPolicies[0].rules[0].to[0].operation.methods[2]: '' is "
        "not an HTTP method: methods match exactly and are upper-case tokens such as 'GET'",
        "node.yaml:11: authorizationPolicies[0].rules[0].to[0].operation.notMethods[0]: "
        "'GET POST' is not an HTTP method: methods match exactly and are upper-case tokens "
        "such as 'GET'",
    ]


def test_bad_hosts_and_paths_are_refused() -> None:
    assert problems("""\
        authorizationPolicies:
          - name: a
            rules:
              - to:
                  - operation:
                      hosts: ["a*b"]
                      notPaths: [""]
        """) == [
        "node.yaml:10: authorizationPolicies[0].rules[0].to[0].operation.hosts[0]: '*' is "
        "allowed only alone, at the start or at the end (got 'a*b')",
        "node.yaml:11: authorizationPolicies[0].rules[0].to[0].operation.notPaths[0]: "
        "must not be empty",
    ]


def test_bad_conditions_are_refused() -> None:
    assert problems("""\
        authorizationPolicies:
          - name: a
            rules:
              - when:
                  - key: request.auth.claims[iss]
                    values: [x]
                  - key: source.ip
                  - key: source.ip
                    values: []
                    notValues: [10.0.0.1/8]
                  - key: destination.port
                    values: ["http"]
                  - key: request.headers[bad header]
                    values: [x]
                  - key: source.principal
                    notValues: ["a*b"]
              - when: []
        """) == [
        "node.yaml:9: authorizationPolicies[0].rules[0].when[0].key: unknown condition key "
        "'request.auth.claims[iss]' (supported: request.headers[<name>], source.ip, "
        "source.namespace, source.principal, destination.port)",
        "node.yaml:11: authorizationPolicies[0].rules[0].when[1]: a condition must set "
        "values or notValues",
        "node.yaml:14: authorizationPolicies[0].rules[0].when[2].notValues: '10.0.0.1/8' has "
        "host bits set (did you mean 10.0.0.0/8?)",
        "node.yaml:16: authorizationPolicies[0].rules[0].when[3].values: must be a port "
        "number from 1 to 65535 (got 'http')",
        "node.yaml:17: authorizationPolicies[0].rules[0].when[4].key: 'bad header' is not a "
        "valid header name",
        "node.yaml:20: authorizationPolicies[0].rules[0].when[5].notValues: '*' is allowed "
        "only alone, at the start or at the end (got 'a*b')",
        "node.yaml:21: authorizationPolicies[0].rules[1].when: must not be empty (omit it to "
        "match anything)",
    ]


def test_l7_policy_config_round_trips() -> None:
    config = config_with(authorization_policies=[{
        "name": "p", "namespace": "shop",
        "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/a*"],
                                         "hosts": ["x:*"], "notPaths": ["/a/b"]}}],
                   "when": [{"key": "request.headers[x-a]", "notValues": ["1"]},
                            {"key": "destination.port", "values": ["80"]}]}]}])
    assert NodeConfig.model_validate(config.model_dump(by_alias=True)) == config
    assert NodeConfig.model_validate_json(config.model_dump_json(by_alias=True)) == config


# --- evaluation -------------------------------------------------------------------------------


def req(method: str = "GET", path: str = "/", host: str = "web.shop:8080",
        **headers: str) -> RequestAttributes:
    return RequestAttributes(method, path, host,
                             {k.replace("_", "-"): v for k, v in headers.items()})


def op(**operation: Any) -> dict[str, Any]:
    return {"to": [{"operation": operation}]}


def when(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"when": list(conditions)}


@dataclass(frozen=True)
class L7Case:
    id: str
    policies: tuple[dict[str, Any], ...]
    request: RequestAttributes
    allowed: bool
    policy: str | None
    conn: ConnectionAttributes = attrs()


CART = "spiffe://cluster.local/ns/shop/sa/cart"

L7_CASES = [
    # methods: exact, case-sensitive
    L7Case("method", (allow(op(methods=["GET", "HEAD"])),), req("GET"), True, "shop/p"),
    L7Case("method-miss", (allow(op(methods=["GET"])),), req("POST"), False, None),
    L7Case("method-case", (allow(op(methods=["GET"])),), req("get"), False, None),
    L7Case("not-methods", (deny(op(notMethods=["GET", "HEAD"])),), req("DELETE"), False,
           "shop/d"),
    L7Case("not-methods-spares", (deny(op(notMethods=["GET"])),), req("GET"), True, None),
    # paths: exact, prefix, suffix, presence; the query string is not part of the path
    L7Case("path-exact", (allow(op(paths=["/info"])),), req(path="/info"), True, "shop/p"),
    L7Case("path-exact-query", (allow(op(paths=["/info"])),), req(path="/info?x=1#f"), True,
           "shop/p"),
    L7Case("path-exact-miss", (allow(op(paths=["/info"])),), req(path="/info/x"), False, None),
    L7Case("path-prefix", (allow(op(paths=["/api/*"])),), req(path="/api/v1/items"), True,
           "shop/p"),
    L7Case("path-prefix-miss", (allow(op(paths=["/api/*"])),), req(path="/apis"), False, None),
    L7Case("path-suffix", (allow(op(paths=["*.css"])),), req(path="/s/site.css?v=2"), True,
           "shop/p"),
    L7Case("path-suffix-miss", (allow(op(paths=["*.css"])),), req(path="/site.css.map"), False,
           None),
    L7Case("path-presence", (allow(op(paths=["*"])),), req(path="/"), True, "shop/p"),
    L7Case("not-paths", (deny(op(notPaths=["/public/*"])),), req(path="/private"), False,
           "shop/d"),
    L7Case("not-paths-spares", (deny(op(notPaths=["/public/*"])),), req(path="/public/a"),
           True, None),
    # paths arrive normalized (tests/unit/test_request_target.py): policies match them as
    # they are, so a path the proxy would not forward is not rewritten here either
    L7Case("path-as-given", (deny(op(paths=["/admin*"])),), req(path="/public/../admin"),
           True, None),
    # hosts: case-insensitive, the Host header as sent (port included, as in Istio)
    L7Case("host-exact", (allow(op(hosts=["web.shop"])),), req(host="Web.Shop"), True,
           "shop/p"),
    L7Case("host-exact-port", (allow(op(hosts=["web.shop"])),), req(host="web.shop:8080"),
           False, None),
    L7Case("host-prefix-port", (allow(op(hosts=["web.shop:*"])),), req(host="web.shop:8080"),
           True, "shop/p"),
    L7Case("host-suffix", (allow(op(hosts=["*.Example.com"])),), req(host="a.example.COM"),
           True, "shop/p"),
    L7Case("not-hosts", (deny(op(notHosts=["web.shop", "web.shop:*"])),), req(host="evil"),
           False, "shop/d"),
    L7Case("not-hosts-spares", (deny(op(notHosts=["web.shop:*"])),), req(host="WEB.shop:80"),
           True, None),
    # ports and HTTP fields in one operation: all must match; operations are OR'ed
    L7Case("port-and-method", (allow(op(ports=["8080"], methods=["GET"])),), req("GET"), True,
           "shop/p"),
    L7Case("port-and-method-wrong-port", (allow(op(ports=["9090"], methods=["GET"])),),
           req("GET"), False, None),
    L7Case("operations-or", (allow({"to": [{"operation": {"methods": ["POST"]}},
                                           {"operation": {"paths": ["/x"]}}]}),),
           req("GET", "/x"), True, "shop/p"),
    # request headers: name case-insensitive, values are string matches
    L7Case("header", (allow(when({"key": "request.headers[X-Token]", "values": ["abc*"]})),),
           req(x_token="abcdef"), True, "shop/p"),
    L7Case("header-mapping-case", (allow(when({"key": "request.headers[x-token]",
                                                "values": ["abc"]})),),
           RequestAttributes("GET", "/", "h", {"X-Token": "abc"}), True, "shop/p"),
    L7Case("header-miss", (allow(when({"key": "request.headers[x-token]", "values": ["a"]})),),
           req(x_token="b"), False, None),
    L7Case("header-absent", (allow(when({"key": "request.headers[x-token]", "values": ["*"]})),),
           req(), False, None),
    L7Case("header-empty-presence", (allow(when({"key": "request.headers[x-a]",
                                                 "values": ["*"]})),),
           req(x_a=""), True, "shop/p"),
    L7Case("header-empty-not-presence", (deny(when({"key": "request.headers[x-a]",
                                                    "notValues": ["*"]})),),
           req(x_a=""), True, None),
    L7Case("header-empty-prefix", (allow(when({"key": "request.headers[x-a]",
                                               "values": ["a*"]})),),
           req(x_a=""), False, None),
    L7Case("header-not-values", (deny(when({"key": "request.headers[user-agent]",
                                            "notValues": ["curl/*"]})),),
           req(user_agent="wget"), False, "shop/d"),
    L7Case("header-not-values-absent", (deny(when({"key": "request.headers[x-a]",
                                                   "notValues": ["1"]})),),
           req(), False, "shop/d"),
    L7Case("header-values-and-not-values",
           (allow(when({"key": "request.headers[x-env]", "values": ["prod-*"],
                        "notValues": ["prod-eu"]})),),
           req(x_env="prod-eu"), False, None),
    L7Case("header-callable", (allow(when({"key": "request.headers[x-a]", "values": ["1"]})),),
           RequestAttributes("GET", "/", "h", {"x-a": "1"}.get), True, "shop/p"),
    # L4 conditions
    L7Case("cond-source-ip", (allow(when({"key": "source.ip", "values": ["10.244.1.0/24"]})),),
           req(), True, "shop/p"),
    L7Case("cond-source-ip-not", (allow(when({"key": "source.ip",
                                              "notValues": ["10.244.1.10"]})),),
           req(), False, None),
    L7Case("cond-namespace", (allow(when({"key": "source.namespace", "values": ["sh*"]})),),
           req(), True, "shop/p"),
    L7Case("cond-principal", (allow(when({"key": "source.principal", "values": [FRONTEND]})),),
           req(), True, "shop/p"),
    L7Case("cond-principal-plaintext", (allow(when({"key": "source.principal",
                                                    "values": ["*"]})),),
           req(), False, None, attrs(principal=None, namespace=None)),
    L7Case("cond-port", (deny(when({"key": "destination.port", "values": ["8080"]})),), req(),
           False, "shop/d"),
    L7Case("cond-port-not", (deny(when({"key": "destination.port", "notValues": ["8080"]})),),
           req(), True, None),
    # combined with principals: every part of a rule must match
    L7Case("principal-and-method", (allow({**src(principals=[FRONTEND]),
                                          **op(methods=["GET"])}),), req("GET"), True, "shop/p"),
    L7Case("principal-and-method-other-source",
           (allow({**src(principals=[FRONTEND]), **op(methods=["GET"])}),), req("GET"), False,
           None, attrs(principal=CART)),
    L7Case("deny-principal-and-path",
           (allow({}), deny({**src(principals=[CART]), **op(paths=["/admin*"])})),
           req(path="/admin/users"), False, "shop/d", attrs(principal=CART)),
    L7Case("deny-principal-and-path-other-source",
           (allow({}), deny({**src(principals=[CART]), **op(paths=["/admin*"])})),
           req(path="/admin/users"), True, "shop/p"),
    L7Case("deny-wins", (allow(op(methods=["GET"])), deny(op(paths=["/secret"]))),
           req("GET", "/secret"), False, "shop/d"),
]


@pytest.mark.parametrize("case", L7_CASES, ids=[c.id for c in L7_CASES])
def test_l7_authorization_table(case: L7Case) -> None:
    az = authorizer(*case.policies)
    decision = az.decide(WEB, case.conn, case.request)
    assert (decision.allowed, decision.policy) == (case.allowed, case.policy), decision.reason


def test_request_attributes_of_a_request_head() -> None:
    head = RequestHead("GET", "/a?b", "Web.Shop", [("x-a", "1"), ("x-a", "2"), ("y", "3")])
    attributes = RequestAttributes.of(head)
    assert (attributes.method, attributes.path, attributes.host) == ("GET", "/a?b", "Web.Shop")
    assert attributes.header("x-a") == "1, 2" and attributes.header("z") is None
    az = authorizer(allow(when({"key": "request.headers[X-A]", "values": ["1, 2"]})))
    assert az.decide(WEB, attrs(), attributes).allowed


# --- rules on HTTP judged without the requests -------------------------------------------------


L4 = None  # decide(..., request=None): a connection whose requests the proxy does not see


def test_l4_allow_rule_with_http_fields_does_not_match() -> None:
    az = authorizer(allow({**src(principals=[FRONTEND]), **op(methods=["GET"])}))
    decision = az.decide(WEB, attrs(), L4)
    assert (decision.allowed, decision.policy) == (False, None)
    assert "rules on HTTP requests" in decision.reason
    # An L4-only rule of the same policy still matches.
    az = authorizer(allow(op(methods=["GET"]), src(principals=[FRONTEND])))
    assert az.decide(WEB, attrs(), L4).policy == "shop/p"
    # A header condition makes a rule L7 just as an operation field does.
    az = authorizer(allow(when({"key": "request.headers[x-a]", "values": ["1"]})))
    assert not az.decide(WEB, attrs(), L4).allowed


def test_l4_deny_rule_with_http_fields_matches_on_its_other_parts() -> None:
    az = authorizer(allow({}), deny({**src(principals=[CART]), **op(ports=["8080"],
                                                                      paths=["/admin*"])}))
    denied = az.decide(WEB, attrs(principal=CART), L4)
    assert (denied.allowed, denied.policy) == (False, "shop/d")
    assert "applied to the whole connection" in denied.reason
    # Its L4 parts still decide whom it denies: another source, another port.
    assert az.decide(WEB, attrs(), L4).allowed
    assert az.decide(WEB, attrs(principal=CART, port=9090), L4).allowed
    # A header condition counts as matched too; the L4 conditions are still evaluated.
    az = authorizer(deny(when({"key": "request.headers[x-a]", "values": ["1"]},
                              {"key": "source.namespace", "values": ["other"]})))
    assert az.decide(WEB, attrs(namespace="other"), L4).policy == "shop/d"
    assert az.decide(WEB, attrs(), L4).allowed


def test_l7_checked_upstream() -> None:
    rules = (allow({**src(principals=[FRONTEND]), **op(methods=["GET"])}),
             deny({**src(principals=[FRONTEND]), **op(paths=["/admin*"])}, name="d"),
             deny(op(ports=["22"]), name="e"))
    az = authorizer(*rules)
    # The per-request check at the source applied the HTTP parts: the stream is allowed by
    # the ALLOW rule's other parts, and the L7 DENY rule does not match the stream.
    allowed = az.decide(WEB, attrs(), L7_CHECKED_UPSTREAM)
    assert (allowed.allowed, allowed.policy) == (True, "shop/p")
    # The other parts of every rule still hold: sources, ports, L4-only DENY rules.
    assert not az.decide(WEB, attrs(principal=CART), L7_CHECKED_UPSTREAM).allowed
    assert az.decide(WEB, attrs(port=22), L7_CHECKED_UPSTREAM).policy == "shop/e"
    # Unmarked, the same stream fails closed.
    assert az.decide(WEB, attrs(), L4).policy == "shop/d"
    # Header conditions too.
    az = authorizer(allow(when({"key": "request.headers[x-a]", "values": ["1"]},
                               {"key": "source.namespace", "values": ["shop"]})))
    assert az.decide(WEB, attrs(), L7_CHECKED_UPSTREAM).allowed
    assert not az.decide(WEB, attrs(namespace="other"), L7_CHECKED_UPSTREAM).allowed


def test_l4_only_policies_ignore_the_mode() -> None:
    az = authorizer(allow(src(principals=[FRONTEND])), deny(op(ports=["22"])))
    for request in (L4, L7_CHECKED_UPSTREAM, req()):
        assert az.decide(WEB, attrs(), request).policy == "shop/p"
        assert az.decide(WEB, attrs(port=22), request).policy == "shop/d"
        assert not az.decide(WEB, attrs(principal=CART), request).allowed


def test_has_l7_rules_per_destination() -> None:
    az = authorizer(allow(op(paths=["/a"]), selector={"app": "web"}),
                    deny(op(ports=["22"]), name="e"),
                    deny(when({"key": "request.headers[x]", "values": ["1"]}), name="f",
                         namespace="other"))
    assert az.has_l7_rules(WEB)
    assert not az.has_l7_rules(DestinationWorkload("shop", {"app": "db"}))
    assert az.has_l7_rules(DestinationWorkload("other", {}))
    assert not az.has_l7_rules(DestinationWorkload("third", {}))


# --- kernel denies -----------------------------------------------------------------------------


def test_kernel_never_compiles_rules_on_http() -> None:
    block = src(ipBlocks=["10.244.1.0/24"])
    for http in ({"methods": ["POST"]}, {"notMethods": ["GET"]}, {"paths": ["/admin"]},
                 {"notPaths": ["/"]}, {"hosts": ["x"]}, {"notHosts": ["x"]}):
        named, compiled = kernel_denies(
            deny({**block, **op(ports=["8080"], **http)}, selector={"app": "web"}))
        assert named == set() and compiled.policy_names == [], http
    named, _ = kernel_denies(deny({**block, **op(ports=["8080"]),
                                   **when({"key": "request.headers[x-a]", "values": ["1"]})},
                                  selector={"app": "web"}))
    assert named == set()
    # The same rule without its HTTP part compiles (the fixture is sound).
    named, _ = kernel_denies(deny({**block, **op(ports=["8080"])}, selector={"app": "web"}))
    assert (1, "10.244.2.20", 8080, "shop/d") in named


def test_kernel_conditions() -> None:
    block = src(ipBlocks=["10.244.1.0/24"])
    # Identity conditions leave the policy to the proxy.
    named, _ = kernel_denies(deny({**op(ports=["8080"]),
                                   **when({"key": "source.namespace", "values": ["shop"]})}))
    assert named == set()
    # source.ip conditions narrow the sources, destination.port conditions the ports.
    named, _ = kernel_denies(deny({**op(ports=["8080", "9000"]),
                                   **when({"key": "source.ip", "notValues": ["10.244.3.0/24"]},
                                          {"key": "destination.port", "values": ["9000"]})},
                                  selector={"app": "web"}))
    assert {(pod, port) for pod, _, port, _ in named} == {(1, 9000)}
    # Unchanged when the conditions accept everything the rule names.
    named, _ = kernel_denies(deny({**block, **op(ports=["8080"]),
                                   **when({"key": "destination.port", "notValues": ["22"]})},
                                  selector={"app": "web"}))
    assert (1, "10.244.2.20", 8080, "shop/d") in named


# --- admission ---------------------------------------------------------------------------------


def admitter(*policies: dict[str, Any]) -> tuple[Admitter, CollectorRegistry, Workload]:
    config = config_with(
        workloads=[{"name": "web", "namespace": "shop", "node": "node-b",
                    "labels": {"app": "web", "tier": "front"}, "ips": ["10.244.2.20"]}],
        authorization_policies=list(policies))
    registry = CollectorRegistry()
    return Admitter(config, AdmissionMetrics(registry)), registry, config.workloads[0]


def decisions(registry: CollectorRegistry, policy: str, action: str, result: str) -> float:
    value = registry.get_sample_value("nodeproxy_authorization_decisions_total",
                                      {"policy": policy, "action": action, "result": result})
    return value or 0.0


SOURCE_IP = ipaddress.ip_address("10.244.1.10")


def test_admit_request_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    adm, registry, web = admitter(allow({**src(principals=[FRONTEND]), **op(methods=["GET"])}),
                                  deny(op(paths=["/admin*"])))
    ok = adm.admit_request(web, FRONTEND, SOURCE_IP, 8080, req("GET", "/a"))
    assert (ok.allowed, ok.policy) == (True, "shop/p")
    assert decisions(registry, "shop/p", "ALLOW", "allowed") == 1
    caplog.set_level(logging.DEBUG, "nodeproxy.policy.admission")
    for _ in range(3):
        denied = adm.admit_request(web, FRONTEND, SOURCE_IP, 8080, req("GET", "/admin\n"))
        assert (denied.allowed, denied.policy) == (False, "shop/d")
    assert decisions(registry, "shop/d", "DENY", "denied") == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited; the rest at debug
    message = warnings[0].getMessage()
    assert FRONTEND in message and "shop/web:8080" in message and "GET /admin\\n" in message
    assert "shop/d" in message
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2
    unmatched = adm.admit_request(web, FRONTEND, SOURCE_IP, 8080, req("POST", "/a"))
    assert (unmatched.allowed, unmatched.policy) == (False, "")
    assert decisions(registry, "", "ALLOW", "denied") == 1


def test_admit_with_and_without_l7_checked() -> None:
    adm, registry, web = admitter(allow({**src(principals=[FRONTEND]), **op(methods=["GET"])}))
    assert adm.authorizer.has_l7_rules(DestinationWorkload.of(web))
    assert not adm.admit(web, FRONTEND, SOURCE_IP, 8080).allowed  # fails closed
    marked = adm.admit(web, FRONTEND, SOURCE_IP, 8080, l7_checked=True)
    assert (marked.allowed, marked.policy) == (True, "shop/p")
    assert not adm.admit(web, CART, SOURCE_IP, 8080, l7_checked=True).allowed
    assert decisions(registry, "", "ALLOW", "denied") == 2
    assert decisions(registry, "shop/p", "ALLOW", "allowed") == 1


def test_request_denial_log_warns_again_after_the_interval(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeproxy.policy import admission

    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    denials = admission._RequestDenialLog(interval=10)
    caplog.set_level(logging.WARNING, "nodeproxy.policy.admission")
    for t in (100.0, 101.0, 102.0, 111.0):
        now[0] = t
        denials.denied(("shop/web", "shop/d"), "denied %s", "x")
    denials.denied(("shop/web", "shop/e"), "denied %s", "y")  # another policy: its own limit
    assert [r.getMessage() for r in caplog.records] == [
        "denied x", "denied x (and 2 more denied by it since the last warning)", "denied y"]


def test_a_workload_s_policy_view_is_remembered_per_workload_object_not_per_name() -> None:
    """The admitter keeps each workload's policy view between requests; a workload of the
    same name with other labels (a pod re-enrolled, relabelled) is judged by its own."""
    adm, registry, web = admitter(allow({**src(principals=[FRONTEND]), **op(methods=["GET"])},
                                        selector={"app": "web"}))
    for _ in range(3):
        assert adm.admit_request(web, FRONTEND, SOURCE_IP, 8080, req("POST", "/a")).allowed \
            is False
    relabelled = web.model_copy(update={"labels": {"app": "api"}})
    assert relabelled.key == web.key
    assert adm.admit_request(relabelled, FRONTEND, SOURCE_IP, 8080, req("POST", "/a")).allowed
    assert decisions(registry, "", "ALLOW", "denied") == 3
    assert decisions(registry, "", "ALLOW", "allowed") == 1


def test_remembered_request_decisions_equal_fresh_ones_for_every_input() -> None:
    """The admitter remembers request decisions (admit_request); every input a decision
    depends on -- principal, source address, port, method, path, host, the headers the
    policies read -- changes the remembered verdict as it changes a fresh one, and every
    request is counted, remembered or not."""
    import itertools
    import random

    policies = (
        allow({**src(principals=[FRONTEND], ipBlocks=["10.244.1.0/24"]),
               **op(methods=["GET"], paths=["/public*"], hosts=["web.shop*"]),
               **when({"key": "request.headers[x-tenant]", "values": ["blue"]},
                      {"key": "destination.port", "values": ["8080"]})}),
        deny({**op(paths=["/public/secret*"]),
              **when({"key": "request.headers[x-debug]", "values": ["*"]})}),
    )
    cached, registry, web = admitter(*policies)
    sources = [(FRONTEND, "10.244.1.10"), (CART, "10.244.1.10"), (FRONTEND, "10.244.9.9"),
               (None, "10.244.1.10")]
    requests = [
        ("GET", "/public/a", "web.shop:8080", {"x-tenant": "blue"}),
        ("GET", "/public/a", "web.shop:8080", {"x-tenant": "red"}),
        ("GET", "/public/a", "web.shop:8080", {}),
        ("GET", "/public/a", "evil:8080", {"x-tenant": "blue"}),
        ("POST", "/public/a", "web.shop:8080", {"x-tenant": "blue"}),
        ("GET", "/private", "web.shop:8080", {"x-tenant": "blue"}),
        ("GET", "/public/secret", "web.shop:8080", {"x-tenant": "blue"}),
        ("GET", "/public/secret", "web.shop:8080", {"x-tenant": "blue", "x-debug": ""}),
        ("GET", "/public/secret", "web.shop:8080", {"x-tenant": "blue", "x-debug": "1"}),
        ("GET", "/public/" + "a" * 2000, "web.shop:8080", {"x-tenant": "blue"}),
    ]
    cases = list(itertools.product(sources, (8080, 9090), requests))
    order = [*cases, *random.Random(7).choices(cases, k=600)]  # each seen first, then repeats
    outcomes = set()
    for (principal, ip), port, (method, path, host, headers) in order:
        request = RequestAttributes(method, path, host, headers)
        got = cached.admit_request(web, principal, ipaddress.ip_address(ip), port, request)
        fresh, _, _ = admitter(*policies)
        want = fresh.admit_request(web, principal, ipaddress.ip_address(ip), port, request)
        assert (got.allowed, got.policy, got.reason) == (want.allowed, want.policy,
                                                         want.reason), (principal, ip, port,
                                                                        method, path, headers)
        outcomes.add((got.allowed, got.policy))
    assert outcomes == {(True, "shop/p"), (False, "shop/d"), (False, "")}
    counted = sum(decisions(registry, policy, action, result) for policy, action, result in (
        ("shop/p", "ALLOW", "allowed"), ("shop/d", "DENY", "denied"), ("", "ALLOW", "denied")))
    assert counted == len(order)  # plaintext too: peer authentication is PERMISSIVE here


def test_a_request_head_is_judged_as_its_attributes_remembered_or_not() -> None:
    """The proxy hands admit_request the parsed head itself (no RequestAttributes made
    when the decision is remembered): the verdict is RequestAttributes.of(head)'s, a
    header sent twice included (joined, as the policies see it)."""
    policies = (allow({**src(principals=[FRONTEND]), **op(paths=["/p*"]),
                       **when({"key": "request.headers[x-tenant]", "values": ["blue"]})}),)
    cached, registry, web = admitter(*policies)
    heads = [
        [("x-tenant", "blue")], [("x-tenant", "red")], [],
        [("x-tenant", "blue"), ("x-tenant", "blue")],  # "blue, blue": not "blue"
        [("x-tenant", "red"), ("x-tenant", "blue")],
        [("x-other", "1"), ("x-tenant", "blue")],
    ]
    verdicts = []
    for _ in range(3):
        for fields in heads:
            for path in ("/p/1", "/q"):
                head = RequestHead("GET", path, "web.shop", list(fields))
                got = cached.admit_request(web, FRONTEND, SOURCE_IP, 8080, head)
                fresh, _, _ = admitter(*policies)
                want = fresh.admit_request(web, FRONTEND, SOURCE_IP, 8080,
                                           RequestAttributes.of(head))
                assert (got.allowed, got.policy) == (want.allowed, want.policy), (fields, path)
                verdicts.append(got.allowed)
    assert verdicts[:12] == [True, False, False, False, False, False, False, False,
                             False, False, True, False]
    assert decisions(registry, "shop/p", "ALLOW", "allowed") == 6
    assert decisions(registry, "", "ALLOW", "denied") == 30


def test_a_host_header_condition_reads_the_authority_the_upstream_gets() -> None:
    """The codecs take Host (HTTP/1.1) and :authority (HTTP/2) out of a head's fields into
    its authority (codec/h1.py on_headers_complete, codec/h2.py), and the upstream gets
    that authority as its Host.  A ``request.headers[host]`` condition reads it too: a
    DENY on it matched nothing before, whatever the Host, and an ALLOW on it nothing."""
    policies = (deny(when({"key": "request.headers[host]", "values": ["admin*"]})),
                allow(when({"key": "request.headers[Host]", "values": ["web.shop*"]})))
    cached, _, web = admitter(*policies)
    cases = [("admin.internal", False), ("ADMIN.internal:80", False),
             ("web.shop", True), ("web.shop:8080", True), ("other", False), ("", False)]
    for _ in range(2):  # fresh, then remembered
        for authority, allowed in cases:
            head = RequestHead("GET", "/", authority, [])  # as a codec makes it
            got = cached.admit_request(web, FRONTEND, SOURCE_IP, 8080, head)
            fresh, _, _ = admitter(*policies)
            attributes = RequestAttributes("GET", "/", authority, {})
            want = fresh.admit_request(web, FRONTEND, SOURCE_IP, 8080, attributes)
            assert got.allowed == want.allowed == allowed, authority
    # A "host" field among the others (no codec leaves one) is not what goes upstream.
    head = RequestHead("GET", "/", "admin.internal", [("host", "web.shop")])
    assert not cached.admit_request(web, FRONTEND, SOURCE_IP, 8080, head).allowed
    # Present but empty (an HTTP/1.0 request without Host): absent, as no Host goes up.
    only_absent = (allow(when({"key": "request.headers[host]", "notValues": ["*"]})),)
    absent, _, _ = admitter(*only_absent)
    assert absent.admit_request(web, FRONTEND, SOURCE_IP, 8080,
                                RequestHead("GET", "/", "", [], version="1.0")).allowed
    assert not absent.admit_request(web, FRONTEND, SOURCE_IP, 8080,
                                    RequestHead("GET", "/", "a", [])).allowed

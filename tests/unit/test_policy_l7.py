"""Unit tests for L7 authorization: HTTP operations and `when` conditions in
AuthorizationPolicy, how a connection is judged by rules on HTTP requests, and the kernel
compiler leaving those rules to the proxy."""

from __future__ import annotations

import textwrap

import pytest

from nodeproxy.config import ConfigError, parse_config
from nodeproxy.config.model import Condition, NodeConfig, Operation
from tests.unit.test_policy import HEAD, config_with

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

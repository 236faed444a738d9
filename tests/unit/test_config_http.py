"""L7 config: bad routes and traffic policies are refused at load, with file:line."""

from __future__ import annotations

import textwrap

import pytest

from nodeproxy.config.loader import ConfigError, parse_config
from tests.unit.test_config import VALID


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "node.yaml")
    return info.value.problems


def routes(body: str) -> str:
    return VALID + "httpRoutes:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_a_valid_route_loads() -> None:
    loaded = parse_config(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - matches: [{path: {type: RegularExpression, value: "/v[0-9]+/.*"}}]
              backendRefs: [{name: web, weight: 3}]
        """), "node.yaml")
    assert loaded.config.http_routes[0].rules[0].backend_refs[0].weight == 3


def test_invalid_regex_names_its_line() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - matches:
                - path: {type: RegularExpression, value: "/v[0-9+"}
        """))
    assert len(found) == 1
    assert found[0].startswith("node.yaml:30: httpRoutes[0].rules[0].matches[0].path:")
    assert "invalid regular expression '/v[0-9+'" in found[0]


def test_invalid_header_regex() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - matches:
                - headers: [{type: RegularExpression, name: x-a, value: "(("}]
        """))
    assert "httpRoutes[0].rules[0].matches[0].headers[0]" in found[0]


def test_weights_summing_to_zero() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - backendRefs:
                - {name: web, weight: 0}
        """))
    assert found == ["node.yaml:29: httpRoutes[0].rules[0]: the backendRefs' weights sum to "
                     "0: no request could be routed"]


def test_route_to_an_unknown_service() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - backendRefs:
                - name: nowhere
        """))
    assert found == ["node.yaml:30: httpRoutes[0].rules[0].backendRefs[0].name: "
                     "no service shop/nowhere"]


def test_route_on_an_unknown_service_and_port() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: cart
          rules: [{}]
        - name: web2
          namespace: shop
          service: web
          port: 81
          rules: [{}]
        """))
    assert found == ["node.yaml:27: httpRoutes[0].service: no service shop/cart",
                     "node.yaml:32: httpRoutes[1].port: service shop/web has no port 81"]



def rule_problems(body: str) -> list[str]:
    """The load problems of one route rule (body: its YAML flow mapping) on shop/web."""
    return problems(routes(f"""\
        - name: web
          namespace: shop
          service: web
          rules:
            - {body}
        """))

@pytest.mark.parametrize("body,expected", [
    ("retry: {retryOn: [sometimes]}", "retryOn[0]"),
    ("retry: {attempts: -1}", "retry.attempts"),
    ("retry: {backoff: {baseSeconds: 1, maxSeconds: 0.5}}", "maxSeconds must not be below"),
    ("timeouts: {requestSeconds: -1}", "timeouts.requestSeconds"),
    ("matches: [{method: FETCH}]", "unknown method 'FETCH'"),
    ("matches: [{path: {value: no-slash}}]", "a path must start with '/'"),
    ("requestHeaders: {set: [{name: 'bad header', value: x}]}", "not a valid header name"),
])
def test_bad_rule_fields(body: str, expected: str) -> None:
    found = rule_problems(body)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("node.yaml:")


@pytest.mark.parametrize("policy,expected", [
    ("{policy: RING_HASH}", "RING_HASH needs exactly one of hashHeader, hashSourceIdentity"),
    ("{policy: LEAST_REQUEST, hashHeader: x}", "belong to policy RING_HASH"),
    ("{policy: FASTEST}", "loadBalancer.policy"),
])
def test_bad_load_balancer(policy: str, expected: str) -> None:
    text = VALID + f"    trafficPolicy:\n      loadBalancer: {policy}\n"
    found = problems(text)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("node.yaml:2")


def test_bad_app_protocol() -> None:
    text = VALID.replace("        targetPort: 8080\n",
                         "        targetPort: 8080\n        appProtocol: mysql\n")
    found = problems(text)
    assert len(found) == 1 and "services[0].ports[0].appProtocol" in found[0]


def test_a_mirror_loads_with_istios_default_percentage() -> None:
    loaded = parse_config(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - mirrors: [{backendRef: {name: web, port: 80}}]
        """), "node.yaml")
    mirror = loaded.config.http_routes[0].rules[0].mirrors[0]
    assert (mirror.backend_ref.name, mirror.backend_ref.port, mirror.percentage) == \
        ("web", 80, 100.0)


def test_a_mirror_to_an_unknown_service_or_port_names_its_line() -> None:
    found = problems(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - mirrors:
                - backendRef: {name: shadow}
                - backendRef:
                    name: web
                    port: 81
        """))
    assert found == [
        "node.yaml:30: httpRoutes[0].rules[0].mirrors[0].backendRef.name: "
        "no service to mirror to: shop/shadow",
        "node.yaml:33: httpRoutes[0].rules[0].mirrors[1].backendRef.port: "
        "service shop/web has no port 81"]


@pytest.mark.parametrize("mirror,expected", [
    ("{backendRef: {name: web}, percentage: 101}", "mirrors[0].percentage"),
    ("{backendRef: {name: web}, percentage: -1}", "mirrors[0].percentage"),
    ("{backendRef: {name: Web}}", "is not a valid name"),
    ("{backendRef: {name: web, weight: 3}}", "mirrors[0].backendRef.weight"),
    ("{percentage: 50}", "mirrors[0].backendRef"),
])
def test_bad_mirror_fields(mirror: str, expected: str) -> None:
    found = problems(routes(f"""\
        - name: web
          namespace: shop
          service: web
          rules:
            - mirrors: [{mirror}]
        """))
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("node.yaml:29: ")


@pytest.mark.parametrize("body,expected", [
    ("rateLimit: {requestsPerSecond: -5}", "rateLimit.requestsPerSecond"),
    ("rateLimit: {requestsPerSecond: 0}", "rateLimit.requestsPerSecond"),
    ("rateLimit: {requestsPerSecond: 5, burst: -1}", "rateLimit.burst"),
    ("rateLimit: {requestsPerSecond: 5, burst: 0}", "rateLimit.burst"),
    ("rateLimit: {burst: 3}", "rateLimit.requestsPerSecond"),
    ("fault: {abort: {httpStatus: 503, percentage: 101}}", "fault.abort.percentage"),
    ("fault: {delay: {fixedDelaySeconds: 1, percentage: -0.5}}", "fault.delay.percentage"),
    ("fault: {delay: {fixedDelaySeconds: -1}}", "fault.delay.fixedDelaySeconds"),
    ("fault: {abort: {httpStatus: 99}}", "fault.abort.httpStatus"),
    ("fault: {abort: {grpcStatus: SOMETIMES}}", "unknown gRPC status 'SOMETIMES'"),
    ("fault: {abort: {grpcStatus: 17}}", "fault.abort.grpcStatus"),
    ("fault: {abort: {httpStatus: 503, grpcStatus: 14}}", "exactly one of httpStatus"),
    ("fault: {abort: {percentage: 5}}", "exactly one of httpStatus"),
    ("fault: {headers: [{name: x-f, value: y}]}", "a fault needs a delay, an abort"),
])
def test_bad_limits_and_faults(body: str, expected: str) -> None:
    found = rule_problems(body)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("node.yaml:29: "), found


def test_limits_and_faults_load() -> None:
    loaded = parse_config(routes("""\
        - name: web
          namespace: shop
          service: web
          rules:
            - rateLimit: {requestsPerSecond: 2.5, burst: 4, perSourceIdentity: true}
              fault:
                delay: {fixedDelaySeconds: 0.2, percentage: 10}
                abort: {grpcStatus: unavailable, percentage: 5}
                headers: [{name: X-Fault, value: "on"}]
        """), "node.yaml")
    rule = loaded.config.http_routes[0].rules[0]
    assert rule.rate_limit is not None and rule.rate_limit.burst == 4
    assert rule.fault is not None and rule.fault.abort is not None
    assert rule.fault.abort.grpc_status == 14 and rule.fault.headers[0].name == "x-fault"


def test_bad_workload_rate_limit_names_its_line() -> None:
    text = VALID.replace("    labels: {app: web}\n",
                         "    labels: {app: web}\n    rateLimit: {requestsPerSecond: -1}\n")
    found = problems(text)
    assert len(found) == 1 and "workloads[0].rateLimit.requestsPerSecond" in found[0], found
    assert found[0].startswith("node.yaml:")


@pytest.mark.parametrize("policy,expected", [
    ("connectionPool: {maxConnections: -1}", "trafficPolicy.connectionPool.maxConnections"),
    ("connectionPool: {maxRequests: 0}", "trafficPolicy.connectionPool.maxRequests"),
    ("connectionPool: {maxPendingRequests: -5}",
     "trafficPolicy.connectionPool.maxPendingRequests"),
    ("connectionPool: {maxRetries: -1}", "trafficPolicy.connectionPool.maxRetries"),
    ("connectionPool: {maxRequest: 4}", "connectionPool.maxRequest"),
    ("outlierDetection: {consecutive5xxErrors: -1}",
     "trafficPolicy.outlierDetection.consecutive5xxErrors"),
    ("outlierDetection: {intervalSeconds: 0}", "outlierDetection.intervalSeconds"),
    ("outlierDetection: {baseEjectionTimeSeconds: -3}",
     "outlierDetection.baseEjectionTimeSeconds"),
    ("outlierDetection: {maxEjectionPercent: 120}", "outlierDetection.maxEjectionPercent"),
])
def test_bad_resilience_settings(policy: str, expected: str) -> None:
    text = VALID + f"    trafficPolicy:\n      {policy}\n"
    found = problems(text)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("node.yaml:2"), found


def test_resilience_settings_load() -> None:
    text = VALID + ("    trafficPolicy:\n      connectionPool: {maxRequests: 4}\n"
                    "      outlierDetection: {consecutive5xxErrors: 2}\n")
    policy = parse_config(text, "node.yaml").config.services[0].traffic_policy
    assert policy.connection_pool.max_requests == 4
    assert policy.connection_pool.max_connections == 1024
    assert policy.outlier_detection is not None
    assert policy.outlier_detection.consecutive_5xx_errors == 2
    assert policy.outlier_detection.base_ejection_time_seconds == 30.0
    assert parse_config(VALID, "node.yaml").config.services[0].traffic_policy \
        .outlier_detection is None

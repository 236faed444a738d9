"""The configurations compared: each says how a client reaches a given server.

A configuration is a named object with ``route(bench, kind, path)`` (which client
pod, which address, which proxy processes are on the way) and optional hooks.
``CONFIGURATIONS`` is the list a run alternates over, in this order.

Plugging in a new one (the kernel fast paths, when they exist):

- subclass ``Configuration``; ``route`` usually returns the meshed client and the
  service VIP, like ``NodeProxy``;
- if it needs the daemons set up differently, return the node-YAML overrides from
  ``daemon_overrides()``: before each of the configuration's measurements the
  suite applies them if the daemons run with other settings
  (``BenchCluster.ensure_daemon_overrides``: a hot reload for live sections such as
  fastPath, a restart for restart-only ones such as capture; ``direct`` and
  ``haproxy`` do not care); the suite measures the configurations of one
  restart-only setting as a block within a round, so the daemons restart about once
  per round, not once per scenario;
- ``http_app_protocol`` is what the daemons declare the benchmark's HTTP services as
  (``tcp``: relayed as bytes, L4; ``http``: parsed, L7); ``http_only`` configurations
  are measured in the HTTP scenarios only;
- ``unavailable()`` returns why it cannot run on this build or machine (or None);
- replace its ``Planned`` placeholder in ``CONFIGURATIONS``.

A ``Planned`` placeholder is reported as "not available in this build" with the
reason, in the JSON and the markdown, so an absent configuration is visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeproxy.capture import iptables
from nodeproxy_dev.bench import haproxy
from nodeproxy_dev.bench.topology import (
    DIRECT_CLIENT,
    HAPROXY_POD,
    HTTP_VIP_PORT,
    MESH_CLIENT,
    MESH_CLIENT_ACCOUNT,
    NODES,
    OTLP_PORT,
    BenchCluster,
    server_pod,
    service_name,
)
from nodeproxy_dev.bench.vocabulary import NetPath, ProxyProcess, RequestCounter, Route, ServerKind


class Configuration:
    """How clients reach servers in one setup; subclasses implement ``route``."""

    name = ""
    summary = ""
    has_proxy = True
    uses_mesh = True  # False: the daemons' settings do not matter to it
    http_only = False  # True: measured in the HTTP scenarios only (an L7 configuration)
    # What the daemons declare the HTTP services' port as (appProtocol) for this
    # configuration: "tcp" relays the requests as bytes, "http" parses each one.
    http_app_protocol: str | None = None
    # The HTTP services' trafficPolicy for this configuration (None: the defaults).
    http_traffic_policy: Mapping[str, Any] | None = None

    def unavailable(self) -> str | None:
        """Why this configuration cannot run in this build, or None."""
        return None

    def daemon_overrides(self) -> Mapping[str, Any]:
        """Node-YAML overrides the daemons must run with for this configuration."""
        return {}

    @property
    def capture_mode(self) -> str:
        """The daemons' capture.mode this configuration measures."""
        return str(self.daemon_overrides().get("capture", {}).get("mode", "ebpf"))

    def prepare(self, bench: BenchCluster) -> None:
        """Called before each measurement of this configuration."""
        if self.uses_mesh:
            bench.ensure_daemon_overrides(self.daemon_overrides(), self.http_app_protocol,
                                          self.http_traffic_policy)

    def route(self, bench: BenchCluster, kind: ServerKind, path: NetPath) -> Route:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        reason = self.unavailable()
        return {"name": self.name, "summary": self.summary, "available": reason is None,
                "reason": reason, "daemon_overrides": dict(self.daemon_overrides()),
                "http_app_protocol": self.http_app_protocol, "http_only": self.http_only}


class Direct(Configuration):
    """The baseline: a pod outside the mesh connects to the server pod's IP."""

    name = "direct"
    summary = "unenrolled client -> server pod IP (no proxy)"
    has_proxy = False
    uses_mesh = False

    def route(self, bench: BenchCluster, kind: ServerKind, path: NetPath) -> Route:
        server = bench.pod(server_pod(path.node, meshed=False))
        return Route(DIRECT_CLIENT, server.ip4, kind.port)


class NodeProxy(Configuration):
    """The product as shipped, at L4: meshed client -> service VIP, captured by eBPF.

    Same node: the proxy decides, then splices the flow in the kernel (sk_skb).
    Cross node: HBONE (HTTP/2 CONNECT over mutual TLS) to node1's daemon.  The HTTP
    service's port is declared ``appProtocol: tcp``: left undeclared, the proxy would
    sniff the first bytes, see HTTP and parse it (L7), and these rows would not be L4.
    """

    name = "nodeproxy-splice"
    summary = ("meshed client -> service VIP, eBPF capture; same node: kernel splice "
               "after the proxy's decision, cross node: HBONE mTLS; HTTP relayed as bytes "
               "(appProtocol: tcp)")
    http_app_protocol = "tcp"

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {"fastPath": {"splice": True}}

    def route(self, bench: BenchCluster, kind: ServerKind, path: NetPath) -> Route:
        service = bench.service(path, kind)
        assert service.vip4 is not None
        port = HTTP_VIP_PORT if kind is ServerKind.HTTP else kind.port
        proxies = [ProxyProcess("nodeproxy-node0", bench.daemon_pid("node0"))]
        if path is NetPath.CROSS_NODE:
            proxies.append(ProxyProcess("nodeproxy-node1", bench.daemon_pid("node1")))
        # The client's node parses (or, at L4, must not parse) the requests: its count
        # says which the run measured.
        # The gRPC service is declared grpc whatever the configuration: always parsed.
        counter = None
        if kind is ServerKind.HTTP:
            counter = RequestCounter("node0", service_name(path.node, kind),
                                     parsed=self.http_app_protocol == "http")
        elif kind is ServerKind.GRPC:
            counter = RequestCounter("node0", service_name(path.node, kind), parsed=True)
        return Route(MESH_CLIENT, service.vip4, port, tuple(proxies), counter)


class NodeProxyNoSplice(NodeProxy):
    """The same with the splice switched off: every byte goes through the Python relay."""

    name = "nodeproxy-nosplice"
    summary = ("as nodeproxy-splice with fastPath.splice off: same-node bytes go through "
               "the userspace (uvloop) relay")

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {"fastPath": {"splice": False}}


def http_routes() -> list[dict[str, Any]]:
    """nodeproxy-l7's HTTPRoutes, one per HTTP service: a rule for a path no request of
    the benchmark takes, then the rule wrk's requests match (a path prefix) with a retry
    policy and a request header filter.  No catch-all rule: a request no rule matches
    gets 404, which wrk counts as an error, so every measured request was routed."""
    header, value = haproxy.ROUTE_HEADER
    return [
        {"name": f"{service_name(node, ServerKind.HTTP)}-bench",
         "service": service_name(node, ServerKind.HTTP),
         "port": HTTP_VIP_PORT,
         "rules": [
             {"matches": [{"path": {"type": "Exact", "value": "/healthz"}, "method": "GET"}],
              "retry": {"attempts": 0}},
             {"matches": [{"path": {"type": "PathPrefix",
                                    "value": haproxy.ROUTE_PATH_PREFIX}}],
              "retry": {"attempts": haproxy.RETRIES,
                        "retryOn": ["5xx", "connect-failure"]},
              "requestHeaders": {"set": [{"name": header, "value": value}]}},
         ]}
        for node in NODES
    ]


class NodeProxyL7(NodeProxy):
    """nodeproxy's L7 path: the HTTP services declared ``appProtocol: http`` and an
    HTTPRoute on each, so every request is parsed, matched to a rule, given a header,
    sent over a pooled upstream connection with a retry policy, and counted in Istio's
    request metrics (always on).  Otherwise as nodeproxy-nosplice; a hot reload."""

    name = "nodeproxy-l7"
    summary = ("as nodeproxy-nosplice, but the HTTP service is appProtocol: http with an "
               "HTTPRoute (path match, retries: 2 on 5xx/connect-failure, a request header "
               "set): every request parsed, routed, retried if it fails, counted in "
               "istio_requests_total; HTTP scenarios only")
    http_only = True
    http_app_protocol = "http"

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {"fastPath": {"splice": False}, "httpRoutes": http_routes()}


FAULT_HEADER = "x-bench-fault"  # no benchmark request carries it: the fault never fires


def full_routes() -> list[dict[str, Any]]:
    """nodeproxy-l7's routes, with a rate limit and a fault on the measured rule, set so
    that neither ever acts: what they cost is the check on every request."""
    routes = http_routes()
    for route in routes:
        rule = route["rules"][1]
        rule["rateLimit"] = {"requestsPerSecond": 1_000_000, "burst": 1_000_000}
        rule["fault"] = {"headers": [{"name": FAULT_HEADER, "value": "on"}],
                         "abort": {"httpStatus": 503, "percentage": 100}}
    return routes


def l7_authorization() -> list[dict[str, Any]]:
    """An HTTP AuthorizationPolicy on the servers' namespace: the benchmark's client may
    GET under the benchmark's path prefix, nothing else; checked on every request."""
    return [{
        "name": "bench-l7", "namespace": "default", "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": [
                      f"cluster.local/ns/default/sa/{MESH_CLIENT_ACCOUNT}"]}}],
                   "to": [{"operation": {"methods": ["GET"],
                                         "paths": [f"{haproxy.ROUTE_PATH_PREFIX}/*"]}}]}],
    }]


class NodeProxyL7Full(NodeProxyL7):
    """nodeproxy-l7 with everything a demanding mesh user turns on, none of it tripping:
    what the features cost per request, beside nodeproxy-l7 in the same run."""

    name = "nodeproxy-l7-full"
    summary = ("as nodeproxy-l7, plus an HTTP AuthorizationPolicy (principal, method, path), "
               "a route rate limit and a header-gated fault that never act, outlier "
               "detection, the circuit breakers' defaults, and tracing sampled at 1% to an "
               "OTLP/HTTP receiver on the node; HTTP scenarios only")
    http_traffic_policy: Mapping[str, Any] | None = {"outlierDetection": {}}

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {"fastPath": {"splice": False}, "httpRoutes": full_routes(),
                "authorizationPolicies": l7_authorization(),
                "tracing": {"enabled": True, "samplingPercent": 1,
                            "endpoint": f"http://127.0.0.1:{OTLP_PORT}/v1/traces"}}

    def prepare(self, bench: BenchCluster) -> None:
        bench.ensure_collectors()
        super().prepare(bench)


class NodeProxyIptables(NodeProxy):
    """The userspace pump of ``nodeproxy-nosplice``, captured by iptables instead of eBPF:
    NAT REDIRECT rules in each pod's netns, the original destination from
    SO_ORIGINAL_DST."""

    name = "nodeproxy-iptables"
    summary = ("as nodeproxy-nosplice, but captured by iptables REDIRECT rules in each pod's "
               "netns (capture.mode: iptables) instead of cgroup/connect4 and sk_lookup")

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {"capture": {"mode": "iptables"}, "fastPath": {"splice": False}}

    def unavailable(self) -> str | None:
        missing = iptables.missing_binaries()
        if missing:
            return f"iptables capture needs {', '.join(missing)} (apt install iptables)"
        return None


class HAProxy(Configuration):
    """HAProxy as an L4 node proxy: mode tcp for everything, HTTP included."""

    name = "haproxy"
    summary = ("unenrolled client -> HAProxy pod on node0 (1 thread), mode tcp: HTTP "
               "relayed as bytes")
    uses_mesh = False

    def port(self, kind: ServerKind, node_index: int) -> int:
        return haproxy.frontend_port(node_index, kind)

    def route(self, bench: BenchCluster, kind: ServerKind, path: NetPath) -> Route:
        pod = bench.pod(HAPROXY_POD)
        return Route(DIRECT_CLIENT, pod.ip4, self.port(kind, NODES.index(path.node)),
                     (ProxyProcess("haproxy", bench.haproxy_pid()),))


class HAProxyHttp(HAProxy):
    """HAProxy as an L7 node proxy, nodeproxy-l7's reference: mode http."""

    name = "haproxy-http"
    summary = ("the same HAProxy, mode http: a path ACL routes the request, a header set, "
               "retries 2 on conn-failure/5xx, keep-alive to the backend (http-reuse always); "
               "HTTP scenarios only")
    http_only = True

    def port(self, kind: ServerKind, node_index: int) -> int:
        if kind is ServerKind.GRPC:
            return haproxy.grpc_mode_port(node_index)
        if kind is not ServerKind.HTTP:
            raise ValueError(f"{self.name} proxies HTTP and gRPC only, not {kind.value}")
        return haproxy.http_mode_port(node_index)


def server_policies() -> list[dict[str, Any]]:
    """An ALLOW policy with a rule on HTTP on every meshed server: only the benchmark's
    client, only GET under the benchmark's path prefix.  Its requests all pass; what is
    measured is who checks them."""
    return [{"name": f"bench-srv{index}", "namespace": "default",
             "selector": {"app": f"srv{index}"}, "action": "ALLOW",
             "rules": [{"from": [{"source": {"principals": [
                 f"cluster.local/ns/default/sa/{MESH_CLIENT_ACCOUNT}"]}}],
                        "to": [{"operation": {"methods": ["GET"],
                                              "paths": [f"{haproxy.ROUTE_PATH_PREFIX}/*"]}}]}]}
            for index, _node in enumerate(NODES)]


class NodeProxyL7Authz(NodeProxyL7):
    """nodeproxy-l7 with an L7 AuthorizationPolicy on the servers, as shipped: the source
    node authorizes each request, and across nodes the destination parses the HBONE
    stream and authorizes each request again (tunnel.trustSourceL7Authorization off)."""

    name = "nodeproxy-l7-authz"
    summary = ("as nodeproxy-l7, with an ALLOW policy on HTTP (GET /bench/* from the "
               "client) on the servers; cross node the destination judges every request "
               "again; HTTP scenarios only")

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {**super().daemon_overrides(), "authorizationPolicies": server_policies()}


class NodeProxyL7AuthzTrusted(NodeProxyL7Authz):
    """The same, with the source's marker believed: the destination relays the stream's
    bytes without parsing them (the trust docs/security.md describes)."""

    name = "nodeproxy-l7-authz-trusted"
    summary = ("as nodeproxy-l7-authz with tunnel.trustSourceL7Authorization: the "
               "destination believes the source node's check; HTTP scenarios only")

    def daemon_overrides(self) -> Mapping[str, Any]:
        return {**super().daemon_overrides(),
                "tunnel": {"trustSourceL7Authorization": True}}


class Planned(Configuration):
    """A configuration this build cannot run yet; reported, never silently missing."""

    def __init__(self, name: str, summary: str, missing: str):
        self.name, self.summary, self.missing = name, summary, missing

    def unavailable(self) -> str | None:
        return f"not available in this build: {self.missing}"

    def route(self, bench: BenchCluster, kind: ServerKind, path: NetPath) -> Route:
        raise RuntimeError(self.unavailable())


CONFIGURATIONS: list[Configuration] = [
    Direct(),
    NodeProxy(),
    HAProxy(),
    NodeProxyNoSplice(),
    NodeProxyL7(),
    NodeProxyL7Full(),
    NodeProxyL7Authz(),  # the authorization policy alone, beside the whole bundle
    HAProxyHttp(),
    NodeProxyIptables(),
]


# Measured only when asked for by name (nodeproxy bench --configuration NAME).
OPTIONAL_CONFIGURATIONS: list[Configuration] = [
    NodeProxyL7AuthzTrusted(),
]


def by_names(names: list[str]) -> list[Configuration]:
    """The configurations named, from both lists, in the order given; ValueError names an
    unknown one."""
    known = {c.name: c for c in (*CONFIGURATIONS, *OPTIONAL_CONFIGURATIONS)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: "
                         f"{', '.join(known)}")
    return [known[n] for n in names]


def available(configurations: list[Configuration]) -> list[Configuration]:
    return [c for c in configurations if c.unavailable() is None]

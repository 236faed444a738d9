"""HAProxy as the reference node proxy: one listener per (server node, server kind) in
``mode tcp``, and per server node one more for HTTP in ``mode http``.

The ``mode http`` listener also answers HTTP/2 with prior knowledge (HAProxy sees the
preface), forwarding HTTP/1.1 to nginx as nodeproxy-l7 does (the HTTP/2 scenario).  For
gRPC a third listener per server node takes HTTP/2 only (``proto h2``) and talks HTTP/2 to
the gRPC server (``server ... proto h2``), pooled (``http-reuse always``): nodeproxy-l7's
work on an ``appProtocol: grpc`` service, which has no HTTPRoute.

``mode tcp`` is the L4 reference (the ``haproxy`` configuration, every scenario, HTTP
included: bytes relayed unparsed, like nodeproxy's L4 configurations).  The ``mode http``
listener is the L7 reference (``haproxy-http``, the HTTP scenarios): HAProxy parses each
request and does what ``nodeproxy-l7``'s HTTPRoute asks of nodeproxy: a path match
(``use_backend`` on a path ACL; a request no rule matches gets 503 — nodeproxy's 404),
a request header set, and up to 2 retries on 5xx or a failed connect; connections kept
alive on both sides (``http-reuse always``).  HAProxy's per-frontend/backend counters
are always on, as nodeproxy's request metrics are.

HAProxy gets one thread, like nodeproxy's one event loop, so the two are compared core
for core.
"""

from __future__ import annotations

from collections.abc import Mapping

from nodeproxy_dev.bench.vocabulary import ServerKind

BASE_PORT = 20000
_OFFSETS = {ServerKind.SOCKPERF: 1, ServerKind.IPERF3: 2, ServerKind.HTTP: 3, ServerKind.ECHO: 4,
            ServerKind.GRPC: 6}
_HTTP_MODE_OFFSET = 5
_GRPC_MODE_OFFSET = 7
ATTACK_PORT = BASE_PORT + 90  # mode http, to the attack nginx of node0's plain server pod
MAXCONN = 40000  # at most; fewer when the open-file limit is lower (two per connection)

# The L7 work both proxies do per request (nodeproxy-l7's HTTPRoute says the same).
ROUTE_PATH_PREFIX = "/bench"  # the benchmark's file is under it (topology.HTTP_FILE)
ROUTE_HEADER = ("x-bench-route", "l7")
RETRIES = 2


def frontend_port(node_index: int, kind: ServerKind) -> int:
    """The HAProxy port (mode tcp) that leads to ``kind`` on the server pod of node
    ``node_index``."""
    return BASE_PORT + 100 * node_index + _OFFSETS[kind]


def http_mode_port(node_index: int) -> int:
    """The HAProxy port (mode http) that leads to nginx on the server pod of the node."""
    return BASE_PORT + 100 * node_index + _HTTP_MODE_OFFSET


def grpc_mode_port(node_index: int) -> int:
    """The HAProxy port (mode http, HTTP/2 only) that leads to the gRPC server of the
    server pod of the node, over HTTP/2 (``proto h2``)."""
    return BASE_PORT + 100 * node_index + _GRPC_MODE_OFFSET


def maxconn(nofile: int) -> int:
    """Connections HAProxy can hold with this open-file limit (two descriptors each)."""
    return max(100, min(MAXCONN, (nofile - 200) // 2))


def config(backends: Mapping[int, str], directory: str, max_connections: int,
           attack_backend: str | None = None) -> str:
    """haproxy.cfg for server pods by node index (their IPv4 addresses); with
    ``attack_backend`` (HOST:PORT) also the noisy-neighbour scenario's attack target, a
    ``mode http`` frontend on ATTACK_PORT (HTTP/1.1, or HTTP/2 when the client sends the
    prior-knowledge preface), as nodeproxy's ``attack-target`` service is."""
    lines = [
        "global",
        "    nbthread 1",
        f"    maxconn {max_connections}",
        f"    pidfile {directory}/haproxy.pid",
        "    log stderr format short local0 notice",
        "",
        "defaults",
        "    log global",
        "    option dontlognull",
        "    timeout connect 5s",
        "    timeout client 300s",
        "    timeout server 300s",
        f"    maxconn {max_connections}",
        "",
    ]
    for index, address in sorted(backends.items()):
        for kind in ServerKind:
            name = f"{kind.value}-node{index}"
            lines += [
                f"listen {name}",
                f"    bind 0.0.0.0:{frontend_port(index, kind)}",
                "    mode tcp",
                f"    server {name} {address}:{kind.port}",
                "",
            ]
        name = f"http-l7-node{index}"
        header, value = ROUTE_HEADER
        lines += [
            f"frontend {name}",
            f"    bind 0.0.0.0:{http_mode_port(index)}",
            "    mode http",
            "    option http-keep-alive",
            f"    acl routed path_beg {ROUTE_PATH_PREFIX}/",
            f"    use_backend {name} if routed",
            "",
            f"backend {name}",
            "    mode http",
            "    http-reuse always",
            f"    http-request set-header {header} {value}",
            f"    retries {RETRIES}",
            "    retry-on conn-failure 500 501 502 503 504",
            f"    server {name} {address}:{ServerKind.HTTP.port}",
            "",
            f"frontend grpc-l7-node{index}",
            f"    bind 0.0.0.0:{grpc_mode_port(index)} proto h2",
            "    mode http",
            f"    default_backend grpc-l7-node{index}",
            "",
            f"backend grpc-l7-node{index}",
            "    mode http",
            "    http-reuse always",
            f"    server grpc-l7-node{index} {address}:{ServerKind.GRPC.port} proto h2",
            "",
        ]
    if attack_backend is not None:
        lines += [
            "frontend attack",
            f"    bind 0.0.0.0:{ATTACK_PORT}",
            "    mode http",
            "    option http-keep-alive",
            "    default_backend attack",
            "",
            "backend attack",
            "    mode http",
            "    http-reuse always",
            f"    server attack {attack_backend}",
            "",
        ]
    return "\n".join(lines)

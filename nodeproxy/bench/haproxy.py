"""HAProxy as the reference node proxy: one frontend per (server node, server kind).

HTTP is proxied in ``mode http`` (HAProxy parses and forwards each request, keeping
connections alive on both sides), everything else in ``mode tcp``.  HAProxy gets one
thread, like nodeproxy's one event loop, so the two are compared core for core.
"""

from __future__ import annotations

from collections.abc import Mapping

from nodeproxy.bench.model import ServerKind

BASE_PORT = 20000
_OFFSETS = {ServerKind.SOCKPERF: 1, ServerKind.IPERF3: 2, ServerKind.HTTP: 3, ServerKind.ECHO: 4}
MAXCONN = 40000  # at most; fewer when the open-file limit is lower (two per connection)


def frontend_port(node_index: int, kind: ServerKind) -> int:
    """The HAProxy port that leads to ``kind`` on the server pod of node ``node_index``."""
    return BASE_PORT + 100 * node_index + _OFFSETS[kind]


def maxconn(nofile: int) -> int:
    """Connections HAProxy can hold with this open-file limit (two descriptors each)."""
    return max(100, min(MAXCONN, (nofile - 200) // 2))


def config(backends: Mapping[int, str], directory: str, max_connections: int) -> str:
    """haproxy.cfg for server pods by node index (their IPv4 addresses)."""
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
                f"    mode {'http' if kind is ServerKind.HTTP else 'tcp'}",
            ]
            if kind is ServerKind.HTTP:
                lines += ["    option http-keep-alive", "    http-reuse always"]
            lines += [f"    server {name} {address}:{kind.port}", ""]
    return "\n".join(lines)

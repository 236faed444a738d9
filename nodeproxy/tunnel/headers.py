"""The CONNECT request's headers: :authority and Forwarded (RFC 7239) address it; the
L7-authorized marker says how the destination should judge it."""

from __future__ import annotations

import functools
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# On a CONNECT request: every HTTP request this stream will carry was authorized by the
# source node's proxy (nodeproxy.policy.authorization, L7_CHECKED_UPSTREAM).  Per stream,
# since one pooled connection carries streams of both kinds.  Only node proxies send CONNECT
# requests (they alone hold mesh certificates), so workloads cannot set it.
L7_AUTHORIZED = "x-nodeproxy-l7-authorized"

# On a CONNECT request: the client's own source port, so the destination node's dial into
# the pod can keep it instead of searching a free port (nodeproxy.tcp.dial).  A hint only:
# absent (ztunnel) or bad, the destination searches one as before.
SOURCE_PORT = "x-nodeproxy-source-port"

# The parsers below are pure and see the same few values on every stream to a pod: the
# last few thousand answers are kept (a HeaderError is raised again, not kept).
PARSED_KEPT = 4096

_FOR = re.compile(r'(?:^|[;,]\s*)for="?\[?([0-9a-fA-F:.]+)\]?(?::\d+)?"?', re.IGNORECASE)


class HeaderError(ValueError):
    pass


def authority(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@functools.lru_cache(maxsize=PARSED_KEPT)
def parse_authority(value: str) -> tuple[IPAddress, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise HeaderError(f"authority {value!r} has no port")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError as e:
        raise HeaderError(f"authority {value!r} is not IP:port") from e
    if not 0 < number < 65536:
        raise HeaderError(f"authority {value!r} has a bad port")
    return ip, number


def forwarded(ip: IPAddress) -> str:
    return f'for="[{ip}]"' if ip.version == 6 else f"for={ip}"


def parse_source_port(value: str | None) -> int:
    """The SOURCE_PORT header's port, or 0 when it is absent or not a port."""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 5:
        return 0
    number = int(value)
    return number if 0 < number < 65536 else 0


@functools.lru_cache(maxsize=PARSED_KEPT)
def parse_forwarded(value: str | None) -> IPAddress | None:
    if not value:
        return None
    match = _FOR.search(value)
    if not match:
        return None
    try:
        return ipaddress.ip_address(match.group(1))
    except ValueError:
        return None

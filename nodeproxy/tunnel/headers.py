"""The CONNECT request's addressing: :authority and the Forwarded header (RFC 7239)."""

from __future__ import annotations

import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_FOR = re.compile(r'(?:^|[;,]\s*)for="?\[?([0-9a-fA-F:.]+)\]?(?::\d+)?"?', re.IGNORECASE)


class HeaderError(ValueError):
    pass


def authority(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


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

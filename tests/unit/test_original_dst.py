"""Reading SO_ORIGINAL_DST's answer: struct sockaddr_in / sockaddr_in6 as the kernel writes."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from nodeproxy.capture.original_dst import Destination, parse_sockaddr


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4) + \
        socket.inet_pton(socket.AF_INET6, ip) + bytes(4)


def test_ipv4_and_ipv6():
    assert parse_sockaddr(sockaddr_in("10.96.0.10", 80)) == Destination(
        ipaddress.ip_address("10.96.0.10"), 80)
    assert parse_sockaddr(sockaddr_in6("fd00:10:96::a", 8443)) == Destination(
        ipaddress.ip_address("fd00:10:96::a"), 8443)


def test_an_ipv4_mapped_destination_is_the_ipv4_address():
    assert parse_sockaddr(sockaddr_in6("::ffff:10.96.0.10", 80)).ip == (
        ipaddress.ip_address("10.96.0.10"))


def test_truncated_or_foreign_answers_are_refused():
    with pytest.raises(ValueError, match="not a sockaddr_in"):
        parse_sockaddr(sockaddr_in("10.0.0.1", 1)[:8])
    with pytest.raises(ValueError, match="family 1"):
        parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + bytes(14))

"""Which client source port a transparent dial keeps (nodeproxy.tcp.dial.kept_port) and the
HBONE hint that carries it across nodes (nodeproxy.tunnel.headers.parse_source_port).  The
dial itself against the kernel: tests/integration/test_transparent_dial.py."""

from __future__ import annotations

import pytest

from nodeproxy.tcp.dial import kept_port
from nodeproxy.tunnel.headers import parse_source_port

EPHEMERAL = range(32768, 61000)


@pytest.mark.parametrize("port,kept", [
    (32768, 32768), (45123, 45123), (60999, 60999),  # the pod's own ephemeral ports
    (32767, 0), (61000, 0),  # just outside
    (80, 0), (8080, 0), (15001, 0),  # ports an application or the proxy listens on
    (0, 0),  # unknown
])
def test_only_a_port_of_the_pods_ephemeral_range_is_kept(port, kept):
    assert kept_port(port, EPHEMERAL) == kept


def test_a_narrowed_range_is_honoured():
    assert kept_port(45123, range(50000, 50100)) == 0
    assert kept_port(50050, range(50000, 50100)) == 50050


@pytest.mark.parametrize("value,port", [
    ("45123", 45123), ("1", 1), ("65535", 65535),
    (None, 0), ("", 0), ("0", 0), ("65536", 0), ("-1", 0), ("+80", 0), (" 80", 0),
    ("80 ", 0), ("0x50", 0), ("1e3", 0), ("٣٤", 0), ("000000045123", 0), ("80,81", 0),
])
def test_the_source_port_hint_is_a_port_or_nothing(value, port):
    assert parse_source_port(value) == port

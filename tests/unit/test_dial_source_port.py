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
    (0, 0),  # unknown: the kernel searches
])
def test_a_port_of_the_pods_ephemeral_range_is_kept(port, kept):
    assert kept_port(port, EPHEMERAL) == kept


@pytest.mark.parametrize("port", [32767, 61000, 80, 8080, 15001, 10000, 65000, 1])
def test_any_other_port_is_folded_into_the_range_never_left_outside(port):
    """Ports an application or the proxy listens on, and the wider client range of
    10000-65000, all land inside the pod's ephemeral range."""
    folded = kept_port(port, EPHEMERAL)
    assert folded in EPHEMERAL
    assert folded == kept_port(port, EPHEMERAL)  # the same client port, the same port
    assert folded != port


def test_folding_spreads_a_wide_client_range_without_collapsing_it():
    client_range = range(10000, 65001)
    folded = {kept_port(p, EPHEMERAL) for p in client_range}
    assert folded == set(EPHEMERAL)  # every pod port used, each by at most two client ports
    assert kept_port(61000, EPHEMERAL) == 32768 and kept_port(32767, EPHEMERAL) == 60999


def test_a_narrowed_range_is_honoured():
    assert kept_port(45123, range(50000, 50100)) in range(50000, 50100)
    assert kept_port(50050, range(50000, 50100)) == 50050
    assert kept_port(45123, range(50000, 50000)) == 0  # an empty range: search


@pytest.mark.parametrize("value,port", [
    ("45123", 45123), ("1", 1), ("65535", 65535),
    (None, 0), ("", 0), ("0", 0), ("65536", 0), ("-1", 0), ("+80", 0), (" 80", 0),
    ("80 ", 0), ("0x50", 0), ("1e3", 0), ("٣٤", 0), ("000000045123", 0), ("80,81", 0),
])
def test_the_source_port_hint_is_a_port_or_nothing(value, port):
    assert parse_source_port(value) == port

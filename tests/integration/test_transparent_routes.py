"""The rules and routes the transparent dial needs in a pod's netns
(nodeproxy.capture.transparent.prepare/undo, made with nodeproxy.capture.rtnetlink), read
back with iproute2's `ip` as an operator would: exactly what `ip rule add fwmark ...
lookup ...` and `ip route add local default dev lo table ...` make, once however often
prepare runs, recognised and removed when another tool (an older daemon, iproute2) made them, and
gone after undo, which a pod that left or a second undo does not upset."""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from nodeproxy.capture import transparent
from nodeproxy.capture.constants import TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE
from nodeproxy.capture.namespaces import Netns, entered
from nodeproxy.capture.rtnetlink import RouteSocket
from nodeproxy_dev.testbed import netns as testbed_netns

pytestmark = pytest.mark.privileged

TABLE = str(TRANSPARENT_ROUTE_TABLE)


@pytest.fixture
def pod_netns() -> Iterator[Netns]:
    name = f"np-rt-{uuid.uuid4().hex[:8]}"
    testbed_netns.add(name)
    netns = Netns.open(testbed_netns.path_of(name))
    try:
        yield netns
    finally:
        netns.close()
        testbed_netns.delete(name)


def ip(netns: Netns, *argv: str) -> list[str]:
    out = testbed_netns.run(netns.path, ["ip", *argv]).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def marked_rules(netns: Netns, family: str) -> list[str]:
    return [r for r in ip(netns, family, "rule", "show") if f"lookup {TABLE}" in r]


def table_routes(netns: Netns, family: str) -> list[str]:
    """The table's routes; none where the kernel has no such table (IPv4 says so)."""
    result = testbed_netns.run(netns.path, ["ip", family, "route", "show", "table", TABLE],
                               check=False)
    if result.returncode != 0:
        assert "FIB table does not exist" in result.stderr, result.stderr
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def assert_prepared(netns: Netns) -> None:
    for family in ("-4", "-6"):
        assert marked_rules(netns, family) == [
            f"{transparent.RULE_PRIORITY}:\tfrom all fwmark {TRANSPARENT_MARK:#x} lookup {TABLE}"
        ]
        routes = table_routes(netns, family)
        assert len(routes) == 1 and routes[0].startswith("local default dev lo"), routes


def assert_clean(netns: Netns) -> None:
    for family in ("-4", "-6"):
        assert marked_rules(netns, family) == []
        assert table_routes(netns, family) == []


def test_prepare_makes_one_rule_and_route_per_family_and_undo_removes_them(
        pod_netns: Netns) -> None:
    assert_clean(pod_netns)
    transparent.prepare(pod_netns)
    assert_prepared(pod_netns)
    # Idempotent: a re-enrollment, or the new daemon of an upgrade, prepares again.
    transparent.prepare(pod_netns)
    transparent.prepare(pod_netns)
    assert_prepared(pod_netns)
    transparent.undo(pod_netns)
    assert_clean(pod_netns)
    transparent.undo(pod_netns)  # nothing left to delete: no error
    assert_clean(pod_netns)


def test_what_ip_made_is_recognised_and_removed(pod_netns: Netns) -> None:
    """Rules and routes made by someone else (iproute2 here; an older daemon used pyroute2,
    which sends the same requests) are the same objects to the kernel: prepare adds no
    duplicate, undo removes them whatever protocol the route was added with."""
    for family in ("-4", "-6"):
        ip(pod_netns, family, "rule", "add", "fwmark", hex(TRANSPARENT_MARK), "lookup", TABLE,
           "priority", str(transparent.RULE_PRIORITY))
        ip(pod_netns, family, "route", "add", "local", "default", "dev", "lo", "table", TABLE,
           "proto", "static")
    transparent.prepare(pod_netns)
    assert_prepared(pod_netns)
    transparent.undo(pod_netns)
    assert_clean(pod_netns)


def test_marked_packets_are_delivered_locally_and_others_are_not(pod_netns: Netns) -> None:
    """What the rules are for: a lookup carrying the mark resolves to the local table, one
    without it does not (the pod's own traffic is routed as before)."""
    transparent.prepare(pod_netns)
    for family, dst in (("-4", "192.0.2.1"), ("-6", "2001:db8::1")):
        marked = ip(pod_netns, family, "route", "get", dst, "mark", hex(TRANSPARENT_MARK))
        assert marked[0].startswith(f"local {dst} ") and f" dev lo table {TABLE}" in marked[0]
        unmarked = testbed_netns.run(pod_netns.path, ["ip", family, "route", "get", dst],
                                     check=False)
        assert "local" not in unmarked.stdout


def test_errors_carry_the_kernels_errno(pod_netns: Netns) -> None:
    """A refused request is an OSError with the kernel's reason, not silence: an exclusive
    add of what exists, a delete of what does not, and a table the kernel rejects."""
    with entered(pod_netns.fd), RouteSocket() as rtnl:
        rtnl.rule(True, socket.AF_INET, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE, 15999)
        with pytest.raises(OSError) as exists:
            rtnl.rule(True, socket.AF_INET, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE, 15999)
        assert exists.value.errno == errno.EEXIST
        rtnl.rule(False, socket.AF_INET, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE, 15999)
        with pytest.raises(OSError) as gone:
            rtnl.rule(False, socket.AF_INET, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE, 15999)
        assert gone.value.errno == errno.ENOENT
        with pytest.raises(OSError) as no_device:
            rtnl.local_default_route(True, socket.AF_INET, TRANSPARENT_ROUTE_TABLE, 999)
        assert no_device.value.errno == errno.ENODEV
    assert marked_rules(pod_netns, "-4") == []
    # The socket was made in the pod's netns, not the test's own.
    assert os.stat("/proc/thread-self/ns/net").st_ino != pod_netns.inode

"""The iptables capture rules on a real kernel, in two scratch network namespaces.

A "pod" netns and a "peer" netns joined by a veth pair: the rules are installed in the
pod, and plain sockets show what they do (outbound redirected to 15001 with the original
destination readable, inbound redirected to 15006, the proxy's marked sockets and loopback
left alone, a deny refused at once), that installing twice or over a crashed instance's
leftovers gives one clean set, and that removing leaves the netns as it was.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from nodeproxy.capture import iptables
from nodeproxy.capture.constants import SOCKET_MARK
from nodeproxy.capture.iptables import IPV4, IPV6, DenyRule, Ports
from nodeproxy.capture.namespaces import Netns
from nodeproxy.capture.original_dst import Destination, original_destination
from nodeproxy_dev.testbed import netns

pytestmark = pytest.mark.privileged

POD4, PEER4 = "10.77.0.2", "10.77.0.1"
POD6, PEER6 = "fd00:77::2", "fd00:77::1"
PORTS = Ports()


class Scratch:
    def __init__(self, pod: Netns, peer: Netns):
        self.pod, self.peer = pod, peer

    def save(self, tool: str = "iptables-save") -> str:
        return netns.run(self.pod.path, [tool]).stdout

    def nft(self) -> str:
        return netns.run(self.pod.path, ["nft", "list", "ruleset"]).stdout


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    names = [f"npipt-{os.getpid()}-{end}" for end in ("pod", "peer")]
    opened: list[Netns] = []
    try:
        for name in names:
            netns.add(name)
        pod_name, peer_name = names
        subprocess.run(["ip", "-n", pod_name, "link", "add", "eth0", "type", "veth", "peer",
                        "name", "eth0", "netns", peer_name], check=True)
        for name, ip4, ip6 in ((pod_name, POD4, POD6), (peer_name, PEER4, PEER6)):
            for args in (["addr", "add", f"{ip4}/24", "dev", "eth0"],
                         ["-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"],
                         ["link", "set", "eth0", "up"]):
                subprocess.run(["ip", "-n", name, *args], check=True)
        opened = [Netns.open(netns.path_of(name)) for name in names]
        yield Scratch(*opened)
    finally:
        for handle in opened:
            handle.close()
        for name in names:
            netns.delete(name)


def listen(ns: Netns, family: int, host: str, port: int, mark: bool = False) -> socket.socket:
    sock = ns.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
    sock.bind((host, port))
    sock.listen(16)
    sock.settimeout(3)
    return sock


def dial(ns: Netns, host: str, port: int, mark: int = 0) -> socket.socket | str:
    """A connected socket, or the errno name of the failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ns.socket(family)
    sock.settimeout(3)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    try:
        sock.connect((host, port))
    except OSError as e:
        sock.close()
        return errno.errorcode.get(e.errno or 0, str(e))
    return sock


def accepted_destination(listener: socket.socket) -> Destination | None:
    conn, _ = listener.accept()
    with conn:
        return original_destination(conn)


def test_outbound_inbound_marks_loopback_and_denies(scratch: Scratch):
    pod, peer = scratch.pod, scratch.peer
    iptables.install(pod.fd, "pod scratch", PORTS, denies=[
        DenyRule(ipaddress.ip_address(PEER4), 9000, "default/no-9000"),
        DenyRule(ipaddress.ip_address(PEER6), 9000, "default/no-9000")])
    outbound = {socket.AF_INET: listen(pod, socket.AF_INET, "127.0.0.1", PORTS.outbound, mark=True),
                socket.AF_INET6: listen(pod, socket.AF_INET6, "::1", PORTS.outbound, mark=True)}
    inbound = {socket.AF_INET: listen(pod, socket.AF_INET, "0.0.0.0", PORTS.inbound, mark=True),
               socket.AF_INET6: listen(pod, socket.AF_INET6, "::", PORTS.inbound, mark=True)}
    servers = {socket.AF_INET: listen(peer, socket.AF_INET, PEER4, 80),
               socket.AF_INET6: listen(peer, socket.AF_INET6, PEER6, 80)}
    hbone = listen(pod, socket.AF_INET, POD4, PORTS.hbone)
    local = listen(pod, socket.AF_INET, "127.0.0.1", 9100)
    try:
        for family, peer_ip, pod_ip in ((socket.AF_INET, PEER4, POD4),
                                        (socket.AF_INET6, PEER6, POD6)):
            # The pod's outbound TCP reaches the proxy's loopback listener; SO_ORIGINAL_DST
            # says where it was going.
            client = dial(pod, peer_ip, 80)
            assert isinstance(client, socket.socket), client
            assert accepted_destination(outbound[family]) == Destination(
                ipaddress.ip_address(peer_ip), 80)
            assert client.getpeername()[:2] == (peer_ip, 80)  # the app sees what it dialled
            client.close()
            # The proxy's own (marked) sockets go where they dial.
            client = dial(pod, peer_ip, 80, mark=SOCKET_MARK)
            assert isinstance(client, socket.socket), client
            conn, _ = servers[family].accept()
            conn.close()
            client.close()
            # A deny is refused in the pod's kernel at connect(), before any proxy.
            assert dial(pod, peer_ip, 9000) == "ECONNREFUSED"
            # TCP arriving for the pod reaches the inbound listener with its destination.
            client = dial(peer, pod_ip, 7000)
            assert isinstance(client, socket.socket), client
            assert accepted_destination(inbound[family]) == Destination(
                ipaddress.ip_address(pod_ip), 7000)
            client.close()
        # HBONE's port is not redirected.
        client = dial(peer, POD4, PORTS.hbone)
        assert isinstance(client, socket.socket), client
        conn, _ = hbone.accept()
        assert conn.getsockname() == (POD4, PORTS.hbone)
        conn.close()
        client.close()
        # Loopback stays loopback.
        client = dial(pod, "127.0.0.1", 9100)
        assert isinstance(client, socket.socket), client
        conn, _ = local.accept()
        conn.close()
        client.close()
    finally:
        for sock in (*outbound.values(), *inbound.values(), *servers.values(), hbone, local):
            sock.close()


def test_install_is_idempotent_and_replaces_leftovers_then_removal_is_exact(scratch: Scratch):
    pod = scratch.pod
    # Somebody else's rules in each IPv4 table we write to (nat, raw, filter); IPv6 has
    # none, so there every table is ours alone and must go away again.
    foreign = "-A OUTPUT -d 192.0.2.1/32 -p udp -j ACCEPT"
    netns.run(pod.path, ["iptables", "-t", "nat", *foreign.split()])
    netns.run(pod.path, ["iptables", "-t", "raw", "-A", "PREROUTING", "-s", "192.0.2.2/32",
                         "-j", "ACCEPT"])
    netns.run(pod.path, ["iptables", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.3/32",
                         "-j", "ACCEPT"])
    before_v4, before_v6 = scratch.save(), scratch.save("ip6tables-save")
    before_tables = nft_tables(scratch)
    assert sorted(before_tables) == ["table ip filter {", "table ip nat {", "table ip raw {"]
    # A crashed instance with other ports left its rules; a new one installs twice.
    iptables.install(pod.fd, "pod scratch", Ports(outbound=16001, inbound=16006))
    iptables.install(pod.fd, "pod scratch", PORTS)
    iptables.install(pod.fd, "pod scratch", PORTS)
    for family in (IPV4, IPV6):
        chains = iptables.installed_chains(pod.fd, "pod scratch", family)
        assert sorted(chains) == ["NODEPROXY_DENY", "NODEPROXY_NOTRACK", "NODEPROXY_OUTPUT",
                                  "NODEPROXY_PREROUTING"]
        assert chains["NODEPROXY_OUTPUT"][-1] == f"-p tcp -j REDIRECT --to-ports {PORTS.outbound}"
        assert not [r for rules in chains.values() for r in rules if "1600" in r]
    saved = scratch.save()
    for jump in ("-A OUTPUT -j NODEPROXY_NOTRACK", "-A OUTPUT -p tcp -j NODEPROXY_OUTPUT",
                 "-A PREROUTING -p tcp -j NODEPROXY_PREROUTING",
                 "-A OUTPUT -p tcp -j NODEPROXY_DENY"):
        assert saved.count(jump + "\n") == 1, (jump, saved)
    # The jump is first in nat OUTPUT, before the rule that was there.
    nat_output = [line for line in saved.splitlines() if line.startswith("-A OUTPUT")
                  and ("NODEPROXY_OUTPUT" in line or "192.0.2.1" in line)]
    assert nat_output[0].endswith("NODEPROXY_OUTPUT") and "192.0.2.1" in nat_output[1]
    # The deny set is replaced as a whole.
    deny = DenyRule(ipaddress.ip_address(PEER4), 9000, "default/no-9000")
    iptables.set_denies(pod.fd, "pod scratch", [deny])
    assert len(iptables.installed_chains(pod.fd, "pod scratch", IPV4)["NODEPROXY_DENY"]) == 1
    assert iptables.installed_chains(pod.fd, "pod scratch", IPV6)["NODEPROXY_DENY"] == []
    iptables.set_denies(pod.fd, "pod scratch", [])
    assert iptables.installed_chains(pod.fd, "pod scratch", IPV4)["NODEPROXY_DENY"] == []

    iptables.remove(pod.fd, "pod scratch")
    iptables.remove(pod.fd, "pod scratch")  # idempotent

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    # Every table somebody else uses is as it was, their rules in place; the IPv6 tables
    # only we used are dropped, not left empty.
    assert body(scratch.save()) == body(before_v4)
    assert body(scratch.save("ip6tables-save")) == body(before_v6) == []
    assert nft_tables(scratch) == before_tables


def nft_tables(scratch: Scratch) -> list[str]:
    """The nf_tables tables of the pod netns, as `nft list ruleset` opens them."""
    return [line for line in scratch.nft().splitlines() if line.startswith("table")]


def test_a_failing_rule_names_the_pod(scratch: Scratch):
    with pytest.raises(iptables.IptablesError, match=r"^pod shop/web: iptables-restore .*failed"):
        iptables.install(scratch.pod.fd, "pod shop/web", Ports(outbound=70000))

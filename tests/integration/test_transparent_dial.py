"""The transparent dial into a pod (nodeproxy.tcp.dial.dial_transparent) against the real
kernel: it keeps the client's own source port where it can and falls back to a port the
kernel searches where it cannot, and every 4-tuple it connects from is the one it announced
to inbound capture before the SYN.

The dial-level tests call dial_transparent on a real pod netns (testbed, real CNI) with a
peer server inside, as the daemon does; the announcer records what inbound capture would be
told.  The mesh tests check the same through the daemons: the application sees the client's
own address and port, same node and over HBONE."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Iterator

import pytest

from nodeproxy.capture import transparent
from nodeproxy.capture.namespaces import Netns
from nodeproxy.tcp.dial import dial_transparent, kept_port
from nodeproxy_dev.testbed import netns as testbed_netns
from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.meshes import two_zone_mesh

pytestmark = pytest.mark.privileged

PORT = 7000
CLIENT4 = ipaddress.ip_address("10.99.0.7")  # a client elsewhere (no route needed: marked)
CLIENT6 = ipaddress.ip_address("fd00:99::7")
KEPT = 45123  # in the default ephemeral range 32768-60999
LOW = 7100  # below it: a port the pod's application might listen on


class Recorder:
    """What inbound capture is told (CaptureMaps.expect_dial/forget_dial)."""

    def __init__(self) -> None:
        self.expected: list[tuple[tuple[str, int], tuple[str, int]]] = []
        self.live: set[tuple[tuple[str, int], tuple[str, int]]] = set()

    def expect_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        self.expected.append((source, dest))
        self.live.add((source, dest))

    def forget_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        self.live.discard((source, dest))


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = b""
        self.line: asyncio.Future[dict] = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.line.done():
            self.line.set_result(json.loads(self.data.split(b"\n", 1)[0]))


@pytest.fixture(scope="module")
def pod() -> Iterator[tuple[Cluster, Netns]]:
    with Cluster(1) as c:
        c.add_pod("node0", "web", enroll=False)
        c.serve_peer("web", PORT)
        netns = Netns.open(c.pods["web"].netns_path)
        try:
            transparent.prepare(netns)
            yield c, netns
        finally:
            netns.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def whoami(netns: Netns, source, dest, source_port: int, recorder: Recorder,
                 hold: bool = False) -> tuple[dict, Collect]:
    """One transparent dial; the peer's whoami answer (it sees the dial's source)."""
    up = await dial_transparent(netns, source, dest, PORT, 5.0, recorder, Collect(),
                                source_port=source_port)
    assert up.transport is not None
    up.transport.write(b"W")
    answer = await up.line
    local = up.transport.get_extra_info("sockname")
    # The tuple the kernel used is the one announced, and the announcement is gone.
    assert ((local[0], local[1]), (str(dest), PORT)) in recorder.expected
    assert not recorder.live
    if not hold:
        up.transport.close()
    return answer, up


def peer_port(answer: dict) -> int:
    return int(answer["peer"].rsplit(":", 1)[1])


def peer_ip(answer: dict) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(answer["peer"].rsplit(":", 1)[0].strip("[]"))
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_the_application_sees_the_clients_own_port(pod, client):
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4 if client.version == 4 else c.pods["web"].ip6)
    answer, _ = run(whoami(netns, client, dest, KEPT + client.version, Recorder()))
    assert peer_ip(answer) == client
    assert peer_port(answer) == KEPT + client.version


def test_one_client_port_twice_to_the_same_pod_port_falls_back_for_the_second(pod):
    """As a client's one source port dialled to two VIPs that map to the same pod port:
    the second 4-tuple is taken, so the second dial gets a searched port, and both work."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4)

    async def both() -> tuple[dict, dict]:
        recorder = Recorder()
        first, held = await whoami(netns, CLIENT4, dest, KEPT + 10, recorder, hold=True)
        try:
            second, _ = await whoami(netns, CLIENT4, dest, KEPT + 10, recorder)
        finally:
            assert held.transport is not None
            held.transport.close()
        return first, second

    first, second = run(both())
    assert peer_ip(first) == peer_ip(second) == CLIENT4
    assert peer_port(first) == KEPT + 10
    assert peer_port(second) != KEPT + 10


def test_a_port_in_use_in_the_pod_is_not_taken_from_it(pod):
    c, netns = pod
    busy = KEPT + 20
    c.serve_peer("web", busy)  # a listener on [::]:busy, as an application's
    dest = ipaddress.ip_address(c.pods["web"].ip4)
    answer, _ = run(whoami(netns, CLIENT4, dest, busy, Recorder()))
    assert peer_ip(answer) == CLIENT4
    assert peer_port(answer) != busy
    # The application's listener still answers on its port.
    again = c.peer("web", "whoami", "--to", f"127.0.0.1:{busy}")
    assert again["exit_code"] == 0 and again["local"].endswith(f":{busy}")


def test_a_port_outside_the_pods_ephemeral_range_is_never_kept(pod):
    """A client picks its source port: one the pod's application may want to listen on is
    not occupied in the pod (the application binds it, without SO_REUSEADDR, meanwhile);
    the dial binds that port folded into the pod's ephemeral range instead."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4)

    async def held_while_binding() -> tuple[dict, str]:
        answer, up = await whoami(netns, CLIENT4, dest, LOW, Recorder(), hold=True)
        try:
            bind = await asyncio.to_thread(
                c.run_in_pod, "web", [c.python, "-c",
                                      "import socket; s = socket.socket(); "
                                      f"s.bind(('0.0.0.0', {LOW})); s.listen(); print('bound')"])
        finally:
            assert up.transport is not None
            up.transport.close()
        return answer, bind.stdout.strip() or bind.stderr

    answer, bound = run(held_while_binding())
    assert peer_port(answer) == kept_port(LOW, range(32768, 61000))  # folded into the range
    assert bound == "bound"


def test_the_range_is_the_destination_pods_own(pod):
    """A pod that narrowed its ephemeral ports: the dial keeps only ports of that range
    (read in the pod's netns, not the daemon's), and searches the others."""
    c, _ = pod
    name = c.pods["web"].netns
    before = c.run_in_pod("web", ["sysctl", "-n", "net.ipv4.ip_local_port_range"]).stdout
    testbed_netns.sysctl(name, {"net.ipv4.ip_local_port_range": "50000 50100"})
    fresh = Netns.open(c.pods["web"].netns_path)  # the range is read once per handle
    try:
        dest = ipaddress.ip_address(c.pods["web"].ip4)
        inside, _ = run(whoami(fresh, CLIENT4, dest, 50050, Recorder()))
        outside, _ = run(whoami(fresh, CLIENT4, dest, KEPT + 60, Recorder()))
    finally:
        fresh.close()
        testbed_netns.sysctl(name, {"net.ipv4.ip_local_port_range": before.strip()})
    assert peer_port(inside) == 50050
    assert peer_port(outside) != KEPT + 60
    assert 50000 <= peer_port(outside) <= 50100  # the kernel's search, in the pod's range


def test_the_same_port_again_right_after_close_is_kept(pod):
    """The application closes first (whoami answers and closes), so its accepted socket
    waits in TIME_WAIT in the pod: a new SYN on that 4-tuple is accepted there, and the
    dial keeps the port every time."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4)

    async def twice() -> list[dict]:
        answers = []
        for _ in range(3):
            answer, up = await whoami(netns, CLIENT4, dest, KEPT + 30, Recorder(), hold=True)
            await asyncio.sleep(0.2)  # the server has closed its side: ours closes second
            assert up.transport is not None
            up.transport.close()
            await asyncio.sleep(0.2)
            answers.append(answer)
        return answers

    answers = run(twice())
    assert [peer_port(a) for a in answers] == [KEPT + 30] * 3
    tw = c.run_in_pod("web", ["ss", "-Htan", "state", "time-wait",
                              "dst", f"{CLIENT4}:{KEPT + 30}"]).stdout
    assert tw.strip(), "the application's socket was not in TIME_WAIT: this proves nothing"


def test_the_dials_own_time_wait_is_taken_over(pod):
    """The proxy closes first (it relays the client's FIN), so its socket is the one in
    TIME_WAIT: the next dial from the same client port takes that 4-tuple over (an
    explicitly bound connect may, with timestamps) instead of falling back to the search."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4)
    port = KEPT + 70

    async def echo_and_close_first() -> int:
        up = await dial_transparent(netns, CLIENT4, dest, PORT, 5.0, Recorder(), Collect(),
                                    source_port=port)
        assert up.transport is not None
        local_port = up.transport.get_extra_info("sockname")[1]
        up.transport.write(b"Px")  # the peer's ping-pong: echoes until EOF
        for _ in range(100):
            if up.data == b"x":
                break
            await asyncio.sleep(0.01)
        assert up.data == b"x"
        up.transport.close()  # our FIN first
        await asyncio.sleep(0.2)
        return local_port

    ports = [run(echo_and_close_first()) for _ in range(3)]
    ours = c.run_in_pod("web", ["ss", "-Htan", "state", "time-wait", "src",
                                f"{CLIENT4}:{port}"]).stdout
    assert ours.strip(), "the dial's own socket is not in TIME_WAIT: the test proves nothing"
    assert ports == [port] * 3


def test_an_ipv4_client_of_an_ipv6_destination_is_refused_cleanly(pod):
    """An IPv4 client can only be presented to an IPv6 destination IPv4-mapped, which the
    kernel does not route: the dial fails with an error, announces nothing it keeps, and
    leaks no socket."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip6)
    recorder = Recorder()

    async def dial() -> None:
        await dial_transparent(netns, CLIENT4, dest, PORT, 5.0, recorder, Collect(),
                               source_port=KEPT + 40)

    before = _open_sockets()
    with pytest.raises(OSError):
        run(dial())
    assert not recorder.live
    assert _open_sockets() <= before


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_a_port_nothing_listens_on_is_refused_not_left_hanging(pod, client):
    """The pod's kernel answers the SYN with a reset that no socket sends: it must carry
    the dial's mark (fwmark_reflect) to be routed back to the proxy's transparent socket.
    Unmarked, it was routed out of the pod to the client's address and lost, and the dial
    hung until its connect timeout (found by the bench's gRPC scenario: calls to a dead
    backend waited out the route's 15 s instead of failing UNAVAILABLE at once)."""
    c, netns = pod
    dest = ipaddress.ip_address(c.pods["web"].ip4 if client.version == 4 else c.pods["web"].ip6)
    recorder = Recorder()

    async def dial() -> None:
        await dial_transparent(netns, client, dest, PORT + 1, 20.0, recorder, Collect(),
                               source_port=KEPT + 50 + client.version)

    with pytest.raises(ConnectionRefusedError):
        run(dial())
    assert not recorder.live


def _open_sockets() -> int:
    import os
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
    return count


# -- through the daemons ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with two_zone_mesh("client", PORT) as c:
        yield c


CLIENT_SCRIPT = """
import json, socket, sys
host, port, source_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(10)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
s.connect((host, port))
s.sendall(b"W")
print(s.makefile().readline().strip())
"""


@pytest.mark.parametrize("service,family", [("web-z0", 4), ("web-z0", 6), ("web-z1", 4),
                                            ("web-z1", 6)],
                         ids=["same-node-v4", "same-node-v6", "hbone-v4", "hbone-v6"])
def test_through_the_mesh_the_application_sees_the_clients_address_and_port(
        mesh: Cluster, service: str, family: int):
    client = mesh.pods["client"]
    svc = mesh.services[f"default/{service}"]
    vip = svc.vip4 if family == 4 else svc.vip6
    assert vip is not None
    source_port = KEPT + 50 + family + (10 if service == "web-z1" else 0)  # one per case
    result = mesh.run_in_pod("client", [mesh.python, "-c", CLIENT_SCRIPT, vip, "80",
                                        str(source_port)], timeout=30)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["name"] == ("web-0" if service == "web-z0" else "web-1")
    expected = client.ip4 if family == 4 else client.ip6
    assert peer_ip(answer) == ipaddress.ip_address(expected)
    assert peer_port(answer) == source_port

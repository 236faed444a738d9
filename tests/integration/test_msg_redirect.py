"""The sk_msg fast path: an application socket and the proxy's socket of one captured
connection hand each other their messages without the loopback TCP stack.

One two-node cluster serves every test; fastPath.skMsg is switched on node0 (the client's
node) by hot reload.  What is checked is what an application would notice — every byte
intact and in order both ways, half-close and reset as over TCP — plus the kernel's own
accounting: the per-pod byte counters still equal the application's bytes, and the
fast-path counters move when the fast path is on and stay still when it is off.
"""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest
import yaml

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.meshes import two_zone_mesh
from tests.integration.observe import metric_sum

pytestmark = pytest.mark.privileged

PORT = 7000
MB = 1_000_000
REQUEST_HEADER = 25  # the peer's transfer protocol: 'T' + length + seed up
RESPONSE_HEADER = 32  # SHA-256 down
FAST_PATH = ("msg_redirects", "msg_redirect_bytes", "msg_misses")
ROUTES = {"same-node": "web-z0", "cross-node": "web-z1"}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with two_zone_mesh("client-0", PORT) as c:
        yield c


def samples(mesh: Cluster, name: str, **labels: str) -> float:
    return metric_sum(mesh.metrics("node0"), name, **labels)


def fast_path(mesh: Cluster) -> dict[str, float]:
    return {n: samples(mesh, f"nodeproxy_kernel_fastpath_{n}_total") for n in FAST_PATH}


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {n: after[n] - before[n] for n in FAST_PATH}


def set_sk_msg(mesh: Cluster, on: bool) -> None:
    """fastPath.skMsg on node0, by hot reload (it applies to new connections)."""
    node = mesh.nodes["node0"]
    doc = yaml.safe_load(open(node.config_path))
    if doc.get("fastPath", {}).get("skMsg", True) == on:
        return
    doc.setdefault("fastPath", {})["skMsg"] = on
    with open(node.config_path, "w") as f:
        yaml.safe_dump(doc, f)
    # Waits for the file's digest, not for a count of applied reloads: the daemon's own
    # file watch may apply the new file before the signal arrives.
    mesh.reload_daemons()


@pytest.fixture(params=["on", "off"])
def sk_msg(request: pytest.FixtureRequest, mesh: Cluster) -> Iterator[bool]:
    on = request.param == "on"
    set_sk_msg(mesh, on)
    yield on
    set_sk_msg(mesh, True)


def transfer(mesh: Cluster, target: str, send: int, receive: int) -> None:
    result = mesh.peer("client-0", "transfer", "--to", target, "--send", str(send),
                       "--receive", str(receive), "--timeout", "120", timeout=150)
    assert result["ok"] and result["exit_code"] == 0, result
    assert result["sha_mismatch"] == 0, result


def run(mesh: Cluster, script: str, timeout: float = 60) -> str:
    out = mesh.run_in_pod("client-0", [mesh.python, "-c", textwrap.dedent(script)],
                          timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("size", [64 * 1024, 5 * MB, 50 * MB])
@pytest.mark.parametrize("route", list(ROUTES))
def test_same_bytes_with_and_without_the_fast_path(mesh: Cluster, sk_msg: bool, route: str,
                                                   size: int):
    before = fast_path(mesh)
    transfer(mesh, mesh.services[f"default/{ROUTES[route]}"].address(4), size, size)
    delta = moved(before, fast_path(mesh))
    if sk_msg:
        # The request is written at once, usually before the proxy's socket joins: it
        # takes TCP (unless the client is descheduled after connect() until it has joined).
        assert delta["msg_misses"] + delta["msg_redirects"] >= 1
        if size > 64 * 1024:
            # The answer came back by redirect.  (A small request and its FIN fit in the
            # socket buffers: the proxy's socket is past ESTABLISHED when the proxy gets
            # to it, and the kernel admits only established sockets to a sockhash.)
            assert delta["msg_redirects"] >= 1
            assert RESPONSE_HEADER <= delta["msg_redirect_bytes"] <= (
                2 * size + REQUEST_HEADER + RESPONSE_HEADER)
    else:
        assert delta == {n: 0 for n in FAST_PATH}


def test_ipv6_connections_take_the_fast_path(mesh: Cluster):
    before = fast_path(mesh)
    result = mesh.peer("client-0", "pingpong", "--to", mesh.services["default/web-z0"].address(6),
                       "--count", "200", "--warmup", "0")
    assert result["ok"], result
    assert moved(before, fast_path(mesh))["msg_redirects"] >= 2 * 200 - 2


def closed(mesh: Cluster) -> float:
    return samples(mesh, "nodeproxy_kernel_tcp_connections_closed_total", pod_name="client-0",
                   direction="outbound")


@pytest.mark.parametrize("route", list(ROUTES))
def test_kernel_byte_counters_still_equal_the_application_bytes(mesh: Cluster, route: str):
    target = mesh.services[f"default/{ROUTES[route]}"].address(4)
    names = ("nodeproxy_kernel_tcp_sent_bytes_total", "nodeproxy_kernel_tcp_received_bytes_total")
    before = [samples(mesh, n, pod_name="client-0", direction="outbound") for n in names]
    closed_before, fast_before = closed(mesh), fast_path(mesh)
    # Small messages both ways (redirected after the first), then a bulk transfer.
    pingpong = mesh.peer("client-0", "pingpong", "--to", target, "--count", "1000",
                         "--warmup", "0", "--size", "100")
    assert pingpong["ok"], pingpong
    transfer(mesh, target, 3 * MB, 2 * MB)
    deadline = time.monotonic() + 5
    while closed(mesh) < closed_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the kernel adds a connection's bytes when it closes
    after = [samples(mesh, n, pod_name="client-0", direction="outbound") for n in names]
    assert moved(fast_before, fast_path(mesh))["msg_redirect_bytes"] > 2 * 1000 * 100
    assert after[0] - before[0] == 1 + 1000 * 100 + REQUEST_HEADER + 3 * MB
    assert after[1] - before[1] == 1000 * 100 + RESPONSE_HEADER + 2 * MB


ORDER = """
    import hashlib, os, socket, threading, time
    def conversation():
        s = socket.create_connection(({vip!r}, 80), 5)
        sent, got, echoed = hashlib.sha256(), hashlib.sha256(), [0]
        def send(data):
            s.sendall(data)
            sent.update(data)
        def receive(n):
            while n:
                data = s.recv(min(n, 65536))
                assert data, "EOF before the echo was complete"
                got.update(data)
                n -= len(data)
                echoed[0] += len(data)
        def burst(seconds, limit):
            # As fast as the socket takes it, from the first moment on: the writer is
            # blocked on a full TCP buffer, unread by the proxy, when the proxy's socket
            # joins the fast path.
            end = time.monotonic() + seconds
            while time.monotonic() < end and total[0] < limit:
                total[0] += 1000
                send(os.urandom(1000))
            done.set()
        total, done = [0], threading.Event()
        s.sendall(b"P")                       # echo protocol
        writer = threading.Thread(target=burst, args=(0.05, 3_000_000))
        writer.start()
        s.settimeout(0.1)
        while not (done.is_set() and echoed[0] == total[0]):
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            assert data, "EOF before the echo was complete"
            got.update(data)
            echoed[0] += len(data)
        s.settimeout(10)
        writer.join()
        for _ in range(200):                  # request/response
            send(os.urandom(100))
            receive(100)
        writer = threading.Thread(target=lambda: [send(os.urandom(3000)) for _ in range(200)])
        writer.start()                        # both ways at once
        receive(200 * 3000)
        writer.join()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        return ("intact" if sent.digest() == got.digest() else "CORRUPT"), echoed[0]
    results = [conversation() for _ in range({connections})]
    print(" ".join(r for r, _ in results), sum(n for _, n in results))
"""
CONNECTIONS = 4


@pytest.mark.parametrize("route", list(ROUTES))
def test_writing_right_after_connect_keeps_the_order(mesh: Cluster, route: str):
    """The application writes from the first moment, before the proxy's socket joins:
    those bytes take TCP and are still unread when it joins; later ones are redirected
    again once the proxy has read them all, and the echo comes back exactly as sent."""
    vip = mesh.services[f"default/{ROUTES[route]}"].vip4
    before = fast_path(mesh)
    *verdicts, echoed = run(mesh, ORDER.format(vip=vip, connections=CONNECTIONS)).split()
    assert verdicts == ["intact"] * CONNECTIONS
    delta = moved(before, fast_path(mesh))
    # Some first bytes took TCP (now and then the client is descheduled right after
    # connect() until the proxy's socket has joined: then all of a connection is redirected).
    assert delta["msg_misses"] >= 1
    # Every echoed byte came back by redirect; more than that moved by redirect, so the
    # application's own direction went back on the fast path after its TCP bytes.
    assert delta["msg_redirect_bytes"] > int(echoed)


HALF_CLOSE = """
    import hashlib, os, socket
    s = socket.create_connection(({vip!r}, 80), 5)
    s.sendall(b"P")
    sent, got = hashlib.sha256(), hashlib.sha256()
    for _ in range(20):                   # the fast path is in use both ways after these
        block = os.urandom(100)
        s.sendall(block); sent.update(block)
        want = len(block)
        while want:
            data = s.recv(want); got.update(data); want -= len(data)
    last = os.urandom(300_000)
    s.sendall(last); sent.update(last)
    s.shutdown(socket.SHUT_WR)            # FIN right behind redirected bytes
    while data := s.recv(65536):          # the echo of everything, then EOF
        got.update(data)
    print("intact" if sent.digest() == got.digest() else "CORRUPT")
"""


@pytest.mark.parametrize("route", list(ROUTES))
def test_half_close_comes_after_every_redirected_byte(mesh: Cluster, route: str):
    before = fast_path(mesh)
    assert run(mesh, HALF_CLOSE.format(vip=mesh.services[f"default/{ROUTES[route]}"].vip4)) \
        == "intact"
    assert moved(before, fast_path(mesh))["msg_redirect_bytes"] > 300_000


def server(mesh: Cluster, pod: str, port: int, body: str) -> subprocess.Popen:
    """A one-connection server in the pod; prints 'listening' first."""
    script = textwrap.dedent(f"""
        import socket, struct, time
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", {port})); l.listen(); print("listening", flush=True)
        c, _ = l.accept(); c.settimeout(10)
    """) + textwrap.dedent(body)
    proc = mesh.spawn_in_pod(pod, [mesh.python, "-c", script], stdout=subprocess.PIPE,
                             text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


@pytest.mark.parametrize("pod", ["web-0", "web-1"])
def test_a_client_reset_after_redirected_bytes_reaches_the_server(mesh: Cluster, pod: str):
    srv = server(mesh, pod, 9300, """
        got = 0
        try:
            while data := c.recv(65536):
                got += len(data)
                if data.endswith(b"?"):
                    c.sendall(b"!")
            print("FIN", got)
        except OSError as e:
            print(type(e).__name__, got)
    """)
    run(mesh, f"""
        import socket, struct, time
        s = socket.create_connection(({mesh.pods[pod].ip4!r}, 9300), 5)
        for _ in range(5):                # request/response: the fast path is in use
            s.sendall(b"x" * 99 + b"?"); assert s.recv(1) == b"!"
        s.sendall(b"y" * 100_000); time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    """)
    out, _ = srv.communicate(timeout=20)
    assert out.split() == ["ConnectionResetError", str(5 * 100 + 100_000)]


@pytest.mark.parametrize("pod", ["web-0", "web-1"])
def test_a_server_reset_after_redirected_bytes_reaches_the_client(mesh: Cluster, pod: str):
    srv = server(mesh, pod, 9301, """
        for _ in range(5):
            assert c.recv(100) and c.sendall(b"!") is None
        c.sendall(b"z" * 100_000); time.sleep(0.5)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    """)
    before = fast_path(mesh)
    out = run(mesh, f"""
        import socket
        s = socket.create_connection(({mesh.pods[pod].ip4!r}, 9301), 5)
        s.settimeout(10)
        for _ in range(5):
            s.sendall(b"x" * 100); assert s.recv(1) == b"!"
        got = 0
        try:
            while data := s.recv(65536):
                got += len(data)
            print("FIN", got)
        except OSError as e:
            print(type(e).__name__, got)
    """)
    srv.wait(timeout=20)
    assert out.split() == ["ConnectionResetError", "100000"]
    assert moved(before, fast_path(mesh))["msg_redirect_bytes"] >= 100_000


CONVERSATION = """
    import hashlib, os, socket, sys
    s = socket.create_connection(({vip!r}, 80), 5)
    s.sendall(b"P")
    sent, got = hashlib.sha256(), hashlib.sha256()
    for i in range(60):
        if i == 20:
            print("switch", flush=True); sys.stdin.readline()   # the test flips the switch
        block = os.urandom(1000)
        s.sendall(block); sent.update(block)
        want = len(block)
        while want:
            data = s.recv(want); got.update(data); want -= len(data)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    print("intact" if sent.digest() == got.digest() else "CORRUPT", flush=True)
"""


def test_switching_off_applies_to_new_connections(mesh: Cluster):
    """fastPath.skMsg: false by hot reload: a connection on the fast path keeps it and stays
    intact; new connections take loopback TCP and the counters stay still."""
    set_sk_msg(mesh, True)
    vip = mesh.services["default/web-z1"].vip4
    talk = mesh.spawn_in_pod("client-0", [mesh.python, "-c",
                                          textwrap.dedent(CONVERSATION.format(vip=vip))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert talk.stdin is not None and talk.stdout is not None
    try:
        assert talk.stdout.readline().strip() == "switch"
        set_sk_msg(mesh, False)
        during = fast_path(mesh)
        talk.stdin.write("go\n")
        talk.stdin.flush()
        assert talk.stdout.readline().strip() == "intact"
        assert talk.wait(timeout=20) == 0
        still = fast_path(mesh)
        assert still["msg_redirects"] >= during["msg_redirects"] + 2 * 40
        transfer(mesh, f"{vip}:80", MB, MB)
        assert fast_path(mesh) == still
    finally:
        talk.kill()
        talk.wait()
        set_sk_msg(mesh, True)


STALLED = 64 << 20  # what the writer offers while its reader has stopped
TAKEN_AT_MOST = 40 << 20  # TCP buffers both sides of the proxy, its own, and the bound


@pytest.mark.parametrize("pod", ["web-0", "web-1"])
def test_a_server_that_stops_reading_holds_back_the_application(mesh: Cluster, pod: str):
    """A redirect never blocks its sender: without a bound the application could queue all
    it writes in the kernel.  Backpressure still reaches it."""
    srv = server(mesh, pod, 9302, """
        for _ in range(5):
            assert c.recv(100) and c.sendall(b"!") is None
        time.sleep(3)                     # stop reading
        got = 500
        while data := c.recv(1 << 20):
            got += len(data)
        print(got)
    """)
    out = run(mesh, f"""
        import socket, threading, time
        s = socket.create_connection(({mesh.pods[pod].ip4!r}, 9302), 5)
        for _ in range(5):                # request/response: the fast path is in use
            s.sendall(b"x" * 99 + b"?"); assert s.recv(1) == b"!"
        taken = [0]
        def write():
            block = b"y" * 65536
            for _ in range({STALLED} // 65536):
                s.sendall(block)
                taken[0] += len(block)
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(2)
        print(taken[0])                   # what the kernel took while nobody read
        writer.join(60)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    """)
    assert int(out) < TAKEN_AT_MOST
    assert srv.communicate(timeout=60)[0].split() == [str(500 + STALLED)]


@pytest.mark.parametrize("pod", ["web-0", "web-1"])
def test_an_application_that_stops_reading_holds_back_the_server(mesh: Cluster, pod: str):
    srv = server(mesh, pod, 9303, f"""
        import threading
        for _ in range(5):
            assert c.recv(100) and c.sendall(b"!") is None
        sent = [0]
        def write():
            block = b"z" * 65536
            for _ in range({STALLED} // 65536):
                c.sendall(block)
                sent[0] += len(block)
            c.shutdown(socket.SHUT_WR)
        c.settimeout(60)
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(2)
        print(sent[0], flush=True)        # what the kernel took while nobody read
        writer.join(60)
        c.recv(1)
    """)
    out = run(mesh, f"""
        import socket, time
        s = socket.create_connection(({mesh.pods[pod].ip4!r}, 9303), 5)
        s.settimeout(60)
        for _ in range(5):
            s.sendall(b"x" * 99 + b"?"); assert s.recv(1) == b"!"
        time.sleep(3)                     # stop reading
        got = 0
        while data := s.recv(1 << 20):
            got += len(data)
        print(got)
    """)
    assert int(out) == STALLED
    assert int(srv.communicate(timeout=60)[0]) < TAKEN_AT_MOST


def test_bytes_not_yet_read_survive_the_daemon_stopping():
    """The proxy has relayed a whole answer by redirect and closed; the application has not
    read it yet when the daemon stops (and its maps go): it still reads every byte."""
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web", labels={"app": "web"}, service_account="web")
        c.write_configs()
        c.start_daemons()
        srv = server(c, "web", 9304, """
            assert c.recv(100) and c.sendall(b"!") is None
            assert c.recv(100)
            c.sendall(b"z" * 1_000_000)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
        """)
        app = c.spawn_in_pod("client", [c.python, "-c", textwrap.dedent(f"""
            import socket, sys
            s = socket.create_connection(({c.pods['web'].ip4!r}, 9304), 5)
            s.sendall(b"x" * 100); assert s.recv(1) == b"!"   # on the fast path now
            s.sendall(b"x" * 100)
            s.shutdown(socket.SHUT_WR)
            print("asked", flush=True); sys.stdin.readline()  # the daemon stops meanwhile
            got = 0
            while data := s.recv(1 << 20):
                got += len(data)
            print(got, flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdin is not None and app.stdout is not None
        assert app.stdout.readline().strip() == "asked"
        assert srv.wait(timeout=20) == 0  # answered, and the proxy relayed the FIN
        assert c.stop_daemons() == {"node0": 0}
        app.stdin.write("read\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "1000000"
        assert app.wait(timeout=10) == 0

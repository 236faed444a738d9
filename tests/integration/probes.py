"""What a test asks from inside a pod (or from a node, as kubelet's probes do): can it
connect, and what did it get back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time

from nodeproxy.capture import libbpf
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster

IP_TRANSPARENT = 19  # linux/in.h; the socket module does not name it


def probe_from_node(cluster: Cluster, node: str, host: str, port: int) -> str:
    """A connection from the node (as kubelet's tcpSocket probe opens it) and a question to
    the peer server: 'connected <its answer>', or the name of the error."""
    try:
        sock = netns.connect(cluster.nodes[node].netns_path, host, port)
    except OSError as e:
        return type(e).__name__
    return _ask_peer(sock)


def _ask_peer(sock: socket.socket) -> str:
    """Ask the peer server who we are on a connected socket (closed after): 'connected
    <its answer>', or the name of the error."""
    try:
        sock.sendall(b"W")
        return "connected " + sock.recv(300).decode()
    except OSError as e:
        return type(e).__name__
    finally:
        sock.close()


def connect_as(cluster: Cluster, pod: str, source: str, host: str, port: int) -> str:
    """A connection from the pod with a source address it does not own (IP_TRANSPARENT:
    a forged source, as a pod with CAP_NET_ADMIN could send), then a question to the peer
    server: 'connected <its answer>', or the name of the error (within 2 s)."""
    sock = netns.socket_in(cluster.pods[pod].netns_path, socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((source, 0))
        sock.settimeout(2)
        sock.connect((host, port))
    except OSError as e:
        sock.close()
        return type(e).__name__
    return _ask_peer(sock)


# What a forged source gets: the SYN-ACK goes to the address's real owner.
NO_HANDSHAKE = ("TimeoutError", "ConnectionRefusedError", "ConnectionResetError")


def connect(cluster: Cluster, pod: str, host: str, port: int) -> str:
    """Connect from the pod and ask the peer who we are: 'connected <whoami JSON>',
    or the errno name of the failure ('EHOSTUNREACH', 'ECONNREFUSED', ...), within 5 s."""
    script = textwrap.dedent(f"""
        import errno, socket
        s = socket.socket(socket.AF_INET6 if ":" in {host!r} else socket.AF_INET)
        s.settimeout(5)
        try:
            s.connect(({host!r}, {port}))
            s.sendall(b"W")
            print("connected", s.recv(200).decode().strip())
        except OSError as e:
            print(errno.errorcode.get(e.errno, str(e)))
    """)
    out = cluster.run_in_pod(pod, [cluster.python, "-c", script], timeout=15)
    return out.stdout.strip() or out.stderr.strip()


def echo_conversation(vip: str, rounds: int, block: int, until: str | None = None,
                      limit: float = 600.0) -> str:
    """A script for a pod: a slow echo exchange with the peer server ('P' protocol) through
    port 80 of `vip`, 0.1 s between rounds; prints 'intact' if every byte came back.  With
    `until` (a file), it goes on past `rounds` until that file exists (at most `limit`
    seconds): the test ends it once what it waits for has happened."""
    return textwrap.dedent(f"""
        import os, socket, time, hashlib
        s = socket.create_connection(({vip!r}, 80), 5)
        s.sendall(b"P")
        sent = hashlib.sha256(); got = hashlib.sha256()
        until, end, i = {until!r}, time.monotonic() + {limit!r}, 0
        while i < {rounds} or (until and not os.path.exists(until) and time.monotonic() < end):
            i += 1
            block = os.urandom({block})
            s.sendall(block); sent.update(block)
            want = len(block)
            while want:
                data = s.recv(want); got.update(data); want -= len(data)
            time.sleep(0.1)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        print("intact" if sent.digest() == got.digest() else "CORRUPT")
    """)


def echo_checksum_script(vip: str, n: int, *, pace: float | None = None,
                         first_byte_after: float = 0.0) -> str:
    """A script for a pod: "P" then n random bytes to port 80 of `vip` (the peer server
    echoes what follows the "P"), sent after `first_byte_after` seconds, at once or, with
    `pace`, in 16 KiB chunks that many seconds apart, half-closed after the last; reads
    the echo while sending and prints "<bytes read> <True if their SHA-256 matches>"."""
    return textwrap.dedent(f"""
        import hashlib, os, socket, threading, time
        data = b"P" + os.urandom({n})
        s = socket.create_connection(({vip!r}, 80), 5)
        time.sleep({first_byte_after!r})
        def send():
            if {pace!r} is None:
                s.sendall(data)
            else:
                for at in range(0, len(data), 16384):
                    s.sendall(data[at:at + 16384])
                    time.sleep({pace!r})
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send); t.start()
        got = hashlib.sha256(); size = 0
        while chunk := s.recv(1 << 20):
            got.update(chunk); size += len(chunk)
        t.join()
        print(size, got.hexdigest() == hashlib.sha256(data[1:]).hexdigest())
    """)


# Attach types of the programs on a node's pod cgroup: connect4/6, getpeername4/6, sockops;
# and on the daemon's own cgroup: getsockopt (the SO_ORIGINAL_DST answer).
CGROUP_ATTACH_TYPES = (10, 11, 29, 30, 3)
DAEMON_CGROUP_ATTACH_TYPES = (21,)


def attached_programs(cgroup: str, types: tuple[int, ...] = CGROUP_ATTACH_TYPES) -> list[int]:
    """IDs of the programs attached to the cgroup (by any nodeproxy instance)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [i for t in types for i in libbpf.attached_prog_ids(fd, t)]
    finally:
        os.close(fd)


def sigterm_drains(cluster: Cluster, node: str, pod: str, vip: str, port: int = 80) -> None:
    """SIGTERM the node's daemon during a slow echo conversation from the pod: the
    conversation finishes intact, new connections are refused at once, the daemon exits 0."""
    slow = echo_conversation(vip, rounds=30, block=10_000)
    client = cluster.spawn_in_pod(pod, [cluster.python, "-c", slow], stdout=subprocess.PIPE,
                                  text=True)
    time.sleep(1.0)
    daemon = cluster.nodes[node].daemon
    assert daemon is not None
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert daemon.poll() is None
    assert connect(cluster, pod, vip, port) == "ECONNREFUSED"
    out, _ = client.communicate(timeout=30)
    assert out.strip() == "intact"
    assert daemon.wait(timeout=30) == 0, cluster.daemon_output(node)

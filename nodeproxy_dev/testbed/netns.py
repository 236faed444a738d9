"""Named network namespaces for the testbed: create, delete, run in, and talk into.

Namespaces are made with ``ip netns add`` so they are bind-mounted at
``/run/netns/NAME`` like a container runtime's.  Sockets "inside" a netns are
created on a short-lived helper thread that setns()es first (the network
namespace is per thread, and a socket keeps the netns it was created in), so
the calling process itself never leaves its own netns.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nodeproxy.capture.libc import check, libc

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

def path_of(name_or_path: str) -> str:
    """``/run/netns/NAME`` for a bare name; a path is returned as is."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_DIR, name_or_path)


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def list_names() -> list[str]:
    """Names of the namespaces under /run/netns."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add(name: str) -> str:
    """Create a named netns with its loopback up; return its path."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                   capture_output=True, text=True)
    return path_of(name)


def pids(name: str) -> list[int]:
    """Processes whose network namespace is this one."""
    try:
        st = os.stat(path_of(name))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_ino, ns.st_dev) == (st.st_ino, st.st_dev):
            found.append(int(entry))
    return found


def kill_all(name: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in the netns and wait for them to be gone."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = [p for p in pids(name) if p != os.getpid()]
        if not remaining or time.monotonic() > deadline:
            return
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def delete(name: str) -> None:
    """Kill what runs inside, then remove the netns (idempotent)."""
    if not exists(name):
        return
    kill_all(name)
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)


def nsenter_argv(name_or_path: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` inside the netns (network namespace only)."""
    return ["nsenter", f"--net={path_of(name_or_path)}", "--", *argv]


def run(name_or_path: str, argv: Sequence[str], *, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command inside the netns and capture its output."""
    result = subprocess.run(nsenter_argv(name_or_path, argv), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {name_or_path} failed "
                           f"(exit {result.returncode}): {result.stderr.strip()}")
    return result


def sysctl(name_or_path: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls inside the netns (only net.* are per netns)."""
    args = [f"{k}={v}" for k, v in values.items()]
    run(name_or_path, ["sysctl", "-q", "-w", *args])


def _setns(fd: int) -> None:
    check(libc().setns(fd, CLONE_NEWNET), "setns")


def in_netns(name_or_path: str, fn: Callable[[], T]) -> T:
    """Call fn on a fresh thread that has entered the netns; that thread then ends."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(path_of(name_or_path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="netns-helper", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def socket_in(name_or_path: str, family: int = socket.AF_INET,
              type_: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in the netns."""
    return in_netns(name_or_path, lambda: socket.socket(family, type_))


def connect(name_or_path: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection opened inside the netns."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(name_or_path, family)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_for_port(name_or_path: str, host: str, port: int, timeout: float = 10.0,
                  process: subprocess.Popen[Any] | None = None) -> None:
    """Poll until a TCP connect from inside the netns succeeds; with ``process`` (the
    server), fail at once if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with "
                               f"{process.returncode} before {host}:{port} accepted")
        try:
            connect(name_or_path, host, port, timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not reachable from {name_or_path}: {e}") from e
            time.sleep(0.05)


def listens(name_or_path: str, port: int) -> bool:
    """Whether a TCP socket in the netns listens on the port (any address)."""
    result = run(name_or_path, ["ss", "-Hltn", f"sport = :{port}"], check=False)
    return bool(result.stdout.strip())


def wait_for_listener(name_or_path: str, port: int, timeout: float = 10.0,
                      process: subprocess.Popen[Any] | None = None) -> None:
    """Poll until a socket in the netns listens on the port; with ``process`` (the
    server), fail at once if it exits first.  In an enrolled pod this is the way to know
    the application is up: a connect from outside the pod is accepted by the proxy's
    inbound listener (inbound capture) whether the application listens or not."""
    deadline = time.monotonic() + timeout
    while not listens(name_or_path, port):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with "
                               f"{process.returncode} before it listened on port {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} in {name_or_path}")
        time.sleep(0.05)


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection whose socket comes from a factory (netns or Unix socket)."""

    def __init__(self, host: str, factory: Callable[[], socket.socket], timeout: float):
        super().__init__(host, timeout=timeout)
        self._factory = factory

    def connect(self) -> None:
        self.sock = self._factory()


def _request(conn: _Connection, method: str, path: str, body: bytes | None,
             headers: Mapping[str, str] | None) -> tuple[int, str]:
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def http_request(name_or_path: str, method: str, url: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> tuple[int, str]:
    """An HTTP request whose TCP connection is opened inside the netns."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = _Connection(parts.netloc, lambda: connect(name_or_path, host, port, timeout), timeout)
    return _request(conn, method, path, body, headers)


def http_get(name_or_path: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET url from inside the netns: (status, body)."""
    return http_request(name_or_path, "GET", url, timeout=timeout)


def unix_http(socket_path: str, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, str]:
    """An HTTP request over a Unix socket (the daemon's control socket)."""

    def factory() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    return _request(_Connection("localhost", factory, timeout), method, path, body, headers)

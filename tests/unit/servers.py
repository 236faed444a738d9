"""Helpers for the unit tests of the testbed's servers: start them as subprocesses on
127.0.0.1 and talk to them (http.client, curl)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = str(Path(__file__).resolve().parents[2])
CURL = shutil.which("curl")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_tool(module: str, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """python -m nodeproxy_dev.testbed.<module> --port 0 ...; the process and its ready line."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", f"nodeproxy_dev.testbed.{module}",
                                 "--port", "0", *args], stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=child_env(), cwd=REPO)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            stderr.seek(0)
            raise RuntimeError(f"{module} did not start: {stderr.read().decode()[-2000:]}")
    return proc, json.loads(line)


def port_of(ready: dict[str, Any]) -> int:
    """The port of a ready line's "listening" address."""
    return int(ready["listening"].rsplit(":", 1)[1])


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"port {port} never accepted"
            time.sleep(0.05)


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    assert CURL, "curl is needed"
    return subprocess.run([CURL, "-sS", "--noproxy", "*", *args], capture_output=True,
                          timeout=timeout)


class Reply(SimpleNamespace):
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: list[tuple[str, str]] | None = None,
            conn: http.client.HTTPConnection | None = None) -> Reply:
    """One HTTP/1.1 request to 127.0.0.1:port (on conn when given, kept open)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest(method, path)
        for name, value in headers or []:
            c.putheader(name, value)
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return Reply(status=r.status, headers=r.headers, body=r.read())
    finally:
        if own:
            c.close()

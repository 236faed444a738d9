"""The other servers of the L7 tests and the Cluster helpers that start them in pods.

nginx as an HTTP/2 cleartext backend (testbed/nginx.py), and Cluster.serve_http,
serve_grpc, serve_h2c and grpc_client run against a stand-in pod in this process's own
network namespace (no topology is built), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodeproxy_dev.testbed.cluster import Cluster, Pod
from nodeproxy_dev.testbed.nginx import H2C_STATUSES, h2c_config, nginx_argv, nginx_config
from tests.unit.servers import NGINX, curl, free_port, request, stop, wait_port

# ---------------------------------------------------------------------------
# nginx: HTTP/2 cleartext


def test_nginx_config_listen_options() -> None:
    plain = nginx_config("/d", 8080, "root /d;")
    assert "listen 8080;" in plain and "listen [::]:8080;" in plain
    h2 = nginx_config("/d", 8080, "root /d;", listen="http2")
    assert "listen 8080 http2;" in h2 and "listen [::]:8080 http2;" in h2


def test_nginx_h2c(tmp_path: Path) -> None:
    assert NGINX, "nginx is needed"
    port = free_port()
    (tmp_path / "nginx.conf").write_text(h2c_config(str(tmp_path), port, "h2-one"))
    proc = subprocess.Popen(nginx_argv(str(tmp_path), nginx=NGINX), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        r = curl("--http2-prior-knowledge", "-i", f"{base}/anything")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(b"HTTP/2 200")
        assert b"x-backend: h2-one" in r.stdout
        assert r.stdout.endswith(b"\r\n\r\nh2-one\n")
        for code in H2C_STATUSES:
            r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                     f"{base}/status/{code}")
            assert r.stdout == str(code).encode()
        r = curl("--http2-prior-knowledge", "-H", "x-test: yes", f"{base}/request?a=1")
        assert r.stdout == b"h2-one GET /request?a=1 HTTP/2.0 host=127.0.0.1 x-test=yes\n"
        r = curl("--http2-prior-knowledge", f"http://[::1]:{port}/")
        assert r.stdout == b"h2-one\n"
        assert curl("--http1.1", "-m", "3", f"{base}/").returncode != 0  # h2c only
    finally:
        stop(proc)


# ---------------------------------------------------------------------------
# Cluster helpers, with a stand-in pod in this process's own netns


@pytest.mark.privileged
def test_cluster_serve_helpers(tmp_path: Path) -> None:
    own = f"/proc/{os.getpid()}/ns/net"
    c = Cluster(1, sweep=False)
    c.dir = str(tmp_path)
    c.nodes["n"] = SimpleNamespace(netns_path=own)  # type: ignore[assignment]
    pod = Pod(name="web", namespace="default", node="n", service_account="default",
              labels={}, netns="npt-unit-none", netns_path=own, cgroup=None,
              ips=["127.0.0.1", "::1"], enrolled=False)
    c.pods["web"] = pod
    try:
        http_port, grpc_port, h2c_port = free_port(), free_port(), free_port()
        c.serve_http(pod, http_port, "h1", "--log", str(tmp_path / "log.jsonl"))
        assert request(http_port, "GET", "/").json()["name"] == "h1"
        assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
        c.serve_grpc("web", grpc_port)
        out = c.grpc_client("web", "--target", f"127.0.0.1:{grpc_port}", "--method", "Unary",
                            "--payload", "hi", "--count", "2")
        assert out["ok"] and out["exit_code"] == 0
        assert out["calls"][0]["trailing_metadata"]["x-backend"] == "web"
        c.serve_h2c(pod, h2c_port, "h2")
        r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{h2c_port}/")
        assert r.stdout == b"h2\n"
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with 1 before"):
            c.serve_http(pod, free_port(), "nowhere", "--host", "192.0.2.1",  # not ours
                         stderr=subprocess.DEVNULL)
        assert time.monotonic() - started < 5  # at once, not after the timeout
    finally:
        for proc in pod.processes:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in pod.processes:
            stop(proc)

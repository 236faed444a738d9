"""The other servers of the L7 tests: nginx as an HTTP/2 cleartext backend (testbed/nginx.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nodeproxy.testbed.nginx import H2C_STATUSES, h2c_config, nginx_argv, nginx_config
from tests.unit.servers import NGINX, curl, free_port, stop, wait_port

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

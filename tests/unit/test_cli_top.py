"""`nodeproxy top` on a terminal, against an admin API served in-process: it draws on
the alternate screen, redraws in place, and Ctrl-C leaves the screen as it was, exit 0."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from nodeproxy.admin.http_server import HttpServer
from nodeproxy.admin.server import AdminServers
from nodeproxy.cli.top import ENTER, HOME, LEAVE
from nodeproxy.telemetry.live_stats import DEFAULT_ROUTE, LiveStats
from tests.unit.test_http_telemetry import Daemon
from tests.unit.test_live_stats import request_labels


@pytest.fixture
def admin() -> Iterator[str]:
    """An admin API with 4 requests (one 503) in its live figures; its base URL."""
    stats = LiveStats(60)
    for status in (200, 200, 200, 503):
        stats.request("default/web", DEFAULT_ROUTE, request_labels(), status, "", 0.05,
                      time.monotonic())
    servers = AdminServers(Daemon(), live=lambda w, ns: {"node": "n", **stats.snapshot(w, ns)})
    loop = asyncio.new_event_loop()
    started = threading.Event()
    address: list[str] = []

    async def serve() -> HttpServer:
        server = HttpServer(servers.admin_app())
        await server.start_tcp("127.0.0.1", 0)
        address.append(f"http://127.0.0.1:{server.port}")
        return server

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield address[0]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_top_on_a_terminal_redraws_and_ctrl_c_restores_the_screen(admin: str) -> None:
    primary, secondary = pty.openpty()
    # SIGINT at its default, as a shell gives a foreground program (Ctrl-C), also when
    # this run was started with SIGINT ignored (a background job, nohup): a Python
    # started with it ignored never sees a KeyboardInterrupt.
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, "-m", "nodeproxy",
                             "top", "--admin", admin, "--interval", "0.2"],
                            stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    out = b""
    # Margins for a busy machine: the views come every 0.2 s once Python has started.
    deadline = time.monotonic() + 60
    while out.count(b"WORKLOADS") < 3 and time.monotonic() < deadline:
        if select.select([primary], [], [], 1)[0]:
            out += os.read(primary, 65536)
    assert out.count(b"WORKLOADS") >= 3, out.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    try:
        while chunk := os.read(primary, 65536):
            out += chunk
    except OSError:  # the terminal is gone once the process is
        pass
    os.close(primary)
    text = out.decode()
    assert text.startswith(ENTER)
    assert text.count(HOME) >= 3  # each view redraws in place
    assert text.rstrip().endswith(LEAVE) and text.count(LEAVE) == 1
    assert "Traceback" not in text
    assert "75.00%" in text


def test_top_without_a_terminal_prints_count_views(admin: str) -> None:
    result = subprocess.run([sys.executable, "-m", "nodeproxy", "top", "--admin", admin,
                             "--interval", "0.1", "--count", "2", "--by", "route"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.count("ROUTES (last 60s)") == 2
    assert "WORKLOADS" not in result.stdout

"""What the tests of sleeping flows share (test_splice.py: spliced flows;
test_relay_sleep.py: relayed ones): scripts run in pods that wait, between their steps,
for the test to have seen the flow asleep (a file the test creates)."""

from __future__ import annotations

import subprocess
import textwrap

from nodeproxy_dev.testbed.cluster import Cluster

# Defines wait_phase(path): returns once the file exists (the test saw the flow asleep),
# fails after 60 s.  Put at the top of a script, after `import os, time`.
WAIT_PHASE = textwrap.dedent("""
    def wait_phase(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert time.monotonic() < deadline, path
            time.sleep(0.02)
""")


def script(*parts: str) -> str:
    """A pod script: its parts (each dedented) after the imports it needs and wait_phase."""
    return "\n".join(["import hashlib, os, socket, struct, time", WAIT_PHASE,
                      *(textwrap.dedent(part) for part in parts)])


def serve_script(c: Cluster, pod: str, *parts: str) -> subprocess.Popen[str]:
    """Start a server script in `pod`; returns once it printed "listening"."""
    server = c.spawn_in_pod(pod, [c.python, "-c", script(*parts)],
                            stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def spawn_script(c: Cluster, pod: str, *parts: str) -> subprocess.Popen[str]:
    """Start a client script in `pod` (stdout and stderr piped)."""
    return c.spawn_in_pod(pod, [c.python, "-c", script(*parts)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)

"""nodeproxy.capture.sysctl where /proc/sys is read-only, as in the DaemonSet's container."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Read-only /proc/sys, as runc and containerd mount it in an unprivileged container,
# in a mount and network namespace of the test's own.
READ_ONLY_PROC_SYS = ('mount -o bind,ro /proc/sys /proc/sys '
                      '&& mount -o remount,bind,ro /proc/sys && exec "$@"')
SCRIPT = """
from nodeproxy.capture import sysctl
try:
    open("/proc/sys/net/ipv4/tcp_fwmark_accept", "w").write("1")
except OSError as e:
    print("direct:", e.strerror)
sysctl.write("net/ipv4/tcp_fwmark_accept", "1")
print("value:", open("/proc/sys/net/ipv4/tcp_fwmark_accept").read().strip())
print("private:", sysctl._private_proc is not None)
"""


@pytest.mark.privileged
def test_a_read_only_proc_sys_is_written_through_a_private_procfs():
    run = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
                          READ_ONLY_PROC_SYS, "sh", sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # The plain write fails as in the container; the value (0 in a new netns) is set in
    # the calling thread's netns all the same.
    assert lines == ["direct: Read-only file system", "value: 1", "private: True"], lines


@pytest.mark.privileged
def test_a_writable_proc_sys_is_written_directly():
    script = SCRIPT.replace('open("/proc/sys/net/ipv4/tcp_fwmark_accept", "w").write("1")',
                            "pass")
    run = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private",
                          sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["value: 1", "private: False"]

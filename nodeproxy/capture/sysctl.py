"""Read and write sysctls of the calling thread's network namespace, also from inside a
container.

Container runtimes mount /proc/sys read-only in every unprivileged container, and
the DaemonSet's daemon is one (config/k8s/daemonset.yaml): writing
/proc/sys/net/... there fails with EROFS.  A net.* sysctl belongs to a network
namespace, and a write changes the one of the thread that opened the file,
whichever procfs mount the path goes through.  So when /proc/sys is read-only the
daemon mounts a procfs of its own, once, in a private temporary directory (it
holds CAP_SYS_ADMIN for setns anyway) and writes net.* values of pod network
namespaces through it.  The mount lives in the container's mount namespace and
goes with it; where /proc/sys is writable nothing is mounted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import threading

from nodeproxy.capture.libc import libc

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_lock = threading.Lock()
_private_proc: str | None = None


def write(name: str, value: str) -> None:
    """Set sysctl ``name`` (``net/ipv4/tcp_fwmark_accept``) in the current netns."""
    try:
        _write(os.path.join("/proc/sys", name), value)
        return
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
    _write(os.path.join(private_proc(), "sys", name), value)


def read(name: str) -> str:
    """The value of sysctl ``name`` in the current netns (reading works read-only too)."""
    with open(os.path.join("/proc/sys", name)) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def private_proc() -> str:
    """A procfs mounted by this process (made on first use): where /proc/sys is writable."""
    global _private_proc
    with _lock:
        if _private_proc is None:
            directory = tempfile.mkdtemp(prefix="nodeproxy-proc-")
            if libc().mount(b"proc", directory.encode(), b"proc",
                          _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) != 0:
                code = ctypes.get_errno()
                os.rmdir(directory)
                raise OSError(code, f"/proc/sys is read-only and mounting a procfs at "
                                    f"{directory} failed: {os.strerror(code)} (needs "
                                    "CAP_SYS_ADMIN)")
            _private_proc = directory
        return _private_proc

"""cgroup v2 directories for simulated nodes and pods.

The cgroup v2 mount point is read from /proc/mounts (``/sys/fs/cgroup`` on most
machines, ``/sys/fs/cgroup/unified`` on a hybrid layout).  No controllers are
enabled: the directories exist only so the capture programs (attached to a
node's subtree) see which processes belong to a pod.
"""

from __future__ import annotations

import os
import signal
import time


def cgroup2_mount() -> str:
    """Where the cgroup v2 hierarchy is mounted (first cgroup2 entry of /proc/mounts)."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return fields[1]
    raise RuntimeError("no cgroup2 filesystem is mounted (see /proc/mounts)")


def create(path: str) -> str:
    """Make the cgroup directory (and its parents); return it."""
    os.makedirs(path, exist_ok=True)
    return path


def add_process(path: str, pid: int) -> None:
    """Move a process into the cgroup."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def procs(path: str) -> list[int]:
    """Processes directly in this cgroup."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def populated(path: str) -> bool:
    """True while any process lives in the cgroup or below it."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
    except FileNotFoundError:
        return False
    return bool(procs(path))


def kill(path: str, timeout: float = 5.0) -> None:
    """SIGKILL every process of the subtree (cgroup.kill, else one by one) and wait."""
    if not os.path.isdir(path):
        return
    kill_file = os.path.join(path, "cgroup.kill")
    deadline = time.monotonic() + timeout
    while populated(path):
        if os.path.exists(kill_file):
            with open(kill_file, "w") as f:
                f.write("1")
        else:
            for dirpath, _dirs, _files in os.walk(path):
                for pid in procs(dirpath):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of {path} did not exit: {procs(path)}")
        time.sleep(0.01)


def remove(path: str, timeout: float = 5.0) -> None:
    """Kill the subtree's processes, then rmdir it bottom-up (idempotent)."""
    if not os.path.isdir(path):
        return
    kill(path, timeout)
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                # EBUSY for a moment while the last killed task is reaped.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

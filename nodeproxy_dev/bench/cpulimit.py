"""A CPU limit on a group of processes, as a pod's CPU limit sets it: a CFS quota in a
cgroup of its own under the cgroup v1 ``cpu`` hierarchy.

The testbed's pods live in the cgroup v2 hierarchy (the mesh's eBPF capture is attached
there); the v1 ``cpu`` hierarchy is independent of it, so a process moved into a v1 cpu
cgroup keeps its pod (v2) cgroup and stays meshed.  On a machine without a v1 ``cpu``
hierarchy nothing is limited and ``reason`` says so.  The cgroup is removed on exit
(processes still in it are moved back to the hierarchy's root first).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

V1_CPU = "/sys/fs/cgroup/cpu"
PERIOD_US = 100_000


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    """The CFS quota per period that allows ``cores`` CPUs' worth of time."""
    if cores <= 0:
        raise ValueError("a CPU limit must be positive")
    return max(1000, round(cores * period_us))


class CpuLimit:
    """``with CpuLimit(name, cores) as limit: argv = limit.wrap(argv)``."""

    def __init__(self, name: str, cores: float, root: str = V1_CPU):
        self.cores = cores
        self.root = root
        self.path = os.path.join(root, name)
        self.reason: str | None = None
        self._created = False

    def __enter__(self) -> CpuLimit:
        if not os.path.exists(os.path.join(self.root, "cpu.cfs_quota_us")):
            self.reason = f"no cgroup v1 cpu hierarchy at {self.root}: not limited"
            return self
        try:
            os.makedirs(self.path)
            self._created = True
            self._write("cpu.cfs_period_us", str(PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota_us(self.cores)))
        except OSError as e:
            self.reason = f"cannot set a CPU quota in {self.path}: {e}"
            self._remove()
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    @property
    def active(self) -> bool:
        return self.reason is None and self._created

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv that first moves itself into the limited cgroup, then execs ``argv``
        (unchanged when nothing can be limited)."""
        if not self.active:
            return list(argv)
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                os.path.join(self.path, "cgroup.procs"), *argv]

    def stat(self) -> dict[str, int]:
        """The cgroup's ``cpu.stat`` (periods, times throttled, throttled nanoseconds)."""
        if not self.active:
            return {}
        with open(os.path.join(self.path, "cpu.stat")) as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v, *_ in pairs}

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _remove(self) -> None:
        if not self._created:
            return
        with contextlib.suppress(OSError):
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:
                with contextlib.suppress(OSError), \
                        open(os.path.join(self.root, "cgroup.procs"), "w") as root:
                    root.write(pid)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        self._created = os.path.isdir(self.path)

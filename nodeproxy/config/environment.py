"""Facts about this machine that a node policy relies on: pods' netns and cgroup paths.

The model checks structure only; these checks run when a daemon applies a
configuration (or ``nodeproxy validate --environment``) and look at the files
named by the workloads on this node (``config.local_workloads()``):

* ``netns`` must open and be a *network* namespace.  The test is the kernel's
  own answer: the ``NS_GET_NSTYPE`` ioctl on an open namespace file (an nsfs
  inode, e.g. a bind mount under /run/netns or /proc/PID/ns/net) returns
  ``CLONE_NEWNET``; any other file fails with ENOTTY, another namespace kind
  returns its own CLONE_* flag.
* ``cgroup`` (an absolute filesystem path) must be a directory on a cgroup v2
  filesystem, i.e. below a mount point of fstype ``cgroup2`` read from
  /proc/mounts (never a hard-coded /sys/fs/cgroup: hybrid hosts mount it at
  /sys/fs/cgroup/unified).
* ``node.podCgroup``, when set, must be such a directory too, and every local
  workload's cgroup must lie strictly inside it (that is the subtree the
  capture programs attach to).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Sequence

from nodeproxy.config.model import NodeConfig, Problem

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
CLONE_NEWNET = 0x40000000
_NAMESPACE_KINDS = {
    0x00020000: "mount",
    0x02000000: "cgroup",
    0x04000000: "UTS",
    0x08000000: "IPC",
    0x10000000: "user",
    0x20000000: "PID",
    0x00000080: "time",
}


def environment_problems(
    config: NodeConfig, *, cgroup2_mount_points: Sequence[str] | None = None
) -> list[Problem]:
    """Problems with this node's workloads' netns and cgroup paths (and node.podCgroup).

    ``cgroup2_mount_points`` overrides the cgroup v2 mounts read from /proc/mounts (tests).
    """
    mounts = list(cgroup2_mounts() if cgroup2_mount_points is None else cgroup2_mount_points)
    problems: list[Problem] = []
    pod_cgroup = config.node.pod_cgroup
    if pod_cgroup:
        problems += [(("node", "podCgroup"), m) for m in cgroup_problems(pod_cgroup, mounts)]
    local = {id(w) for w in config.local_workloads()}
    for i, workload in enumerate(config.workloads):
        if id(workload) not in local:
            continue
        if workload.netns:
            problems += [(("workloads", i, "netns"), m) for m in netns_problems(workload.netns)]
        if workload.cgroup:
            where = ("workloads", i, "cgroup")
            problems += [(where, m) for m in cgroup_problems(workload.cgroup, mounts)]
            if pod_cgroup and not _strictly_inside(workload.cgroup, pod_cgroup):
                problems.append(
                    (where, f"cgroup {workload.cgroup} is not inside node.podCgroup {pod_cgroup}")
                )
    return problems


def netns_problems(path: str) -> list[str]:
    """Why path is not a usable network namespace file (empty list: it is one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return [f"netns {path} does not exist"]
    except OSError as e:
        return [f"netns {path} cannot be opened: {e.strerror}"]
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            return [f"netns {path} is not a namespace file"]
        return [f"netns {path} cannot be checked: {e.strerror}"]
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        name = _NAMESPACE_KINDS.get(kind, f"0x{kind:x}")
        return [f"netns {path} is a {name} namespace, not a network namespace"]
    return []


def cgroup_problems(path: str, mount_points: Sequence[str]) -> list[str]:
    """Why path is not a cgroup v2 directory (empty list: it is one)."""
    if not os.path.isabs(path):
        return [f"cgroup {path} is not an absolute path"]
    if not os.path.exists(path):
        return [f"cgroup {path} does not exist"]
    if not os.path.isdir(path):
        return [f"cgroup {path} is not a directory"]
    if not mount_points:
        return [f"cgroup {path}: no cgroup v2 filesystem is mounted on this machine"]
    if not any(_inside(path, mount) for mount in mount_points):
        return [f"cgroup {path} is not on a cgroup v2 mount ({', '.join(mount_points)})"]
    return []


def cgroup2_mounts(mounts_file: str = "/proc/mounts") -> list[str]:
    """Mount points of every cgroup v2 filesystem, in /proc/mounts order."""
    try:
        with open(mounts_file, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            points.append(_unescape_mount_field(fields[1]))
    return points


def _unescape_mount_field(field: str) -> str:
    r"""/proc/mounts writes space, tab, newline and backslash as \040, \011, \012, \134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _inside(path: str, directory: str) -> bool:
    """path is directory or below it (after resolving symlinks)."""
    real, base = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, base]) == base


def _strictly_inside(path: str, directory: str) -> bool:
    return _inside(path, directory) and os.path.realpath(path) != os.path.realpath(directory)

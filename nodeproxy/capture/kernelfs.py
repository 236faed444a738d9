"""Where the kernel filesystems nodeproxy needs are: cgroup v2 and bpffs.

Everything is found from /proc/mounts (this process's mount namespace), never
assumed: cgroup v2 is at /sys/fs/cgroup on a unified-layout node but at
/sys/fs/cgroup/unified on a hybrid one, and bpffs is not mounted at boot on
every distribution.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

from nodeproxy.capture.libc import libc

PROC_MOUNTS = "/proc/mounts"
DEFAULT_BPFFS = "/sys/fs/bpf"
# Names of the kubelet's pod cgroup subtree: systemd cgroup driver, then cgroupfs driver.
KUBEPODS_NAMES = ("kubepods.slice", "kubepods")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_MNT_DETACH = 2


class KernelFsError(RuntimeError):
    """A kernel filesystem nodeproxy needs is missing or cannot be mounted."""


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts."""

    source: str
    mountpoint: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(proc_mounts: str = PROC_MOUNTS) -> list[Mount]:
    """All mounts, in /proc/mounts order (a later mount on the same point is on top)."""
    mounts: list[Mount] = []
    with open(proc_mounts, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            source, mountpoint, fstype, options = (_unescape(x) for x in fields[:4])
            mounts.append(Mount(source, mountpoint, fstype, options))
    return mounts


def find_cgroup2_mount(proc_mounts: str = PROC_MOUNTS) -> str:
    """The mount point of the cgroup v2 hierarchy (the first cgroup2 mount listed)."""
    for mount in read_mounts(proc_mounts):
        if mount.fstype == "cgroup2":
            return mount.mountpoint
    raise KernelFsError(
        f"no cgroup v2 (fstype cgroup2) mount in {proc_mounts}: nodeproxy attaches its "
        "connect/sockops programs to a cgroup v2 subtree. Mount it "
        "(mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with "
        "systemd.unified_cgroup_hierarchy=1"
    )


def default_pod_cgroup(cgroup2_mount: str) -> str:
    """The kubelet's pod subtree under the cgroup v2 mount.

    `kubepods.slice` (systemd cgroup driver) if present, else `kubepods` (cgroupfs
    driver). The path is returned even when neither exists yet.
    """
    for name in KUBEPODS_NAMES:
        path = os.path.join(cgroup2_mount, name)
        if os.path.isdir(path):
            return path
    return os.path.join(cgroup2_mount, KUBEPODS_NAMES[-1])


def _cgroup_members(directory: str) -> set[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
            return {int(line) for line in f if line.strip()}
    except (OSError, ValueError):
        return set()


def own_cgroup(cgroup2_mount: str, pid: int | None = None,
               proc_cgroup: str = "/proc/self/cgroup") -> str:
    """The cgroup v2 directory (under the mount) that this process belongs to.

    /proc/self/cgroup names it relative to the process's cgroup namespace.  That is the
    mount's root unless the process runs in a container with a private cgroup namespace
    and the host's hierarchy mounted (the DaemonSet): then the directory whose
    cgroup.procs lists the process is looked for under the mount."""
    pid = pid or os.getpid()
    with open(proc_cgroup, encoding="utf-8") as f:
        relative = next((line.rstrip("\n").split(":", 2)[2] for line in f
                         if line.startswith("0::")), None)
    if relative is not None:
        candidate = os.path.normpath(os.path.join(cgroup2_mount, relative.lstrip("/")))
        if pid in _cgroup_members(candidate):
            return candidate
    for directory, _subdirs, _files in os.walk(cgroup2_mount):
        if pid in _cgroup_members(directory):
            return directory
    raise KernelFsError(f"process {pid} is in no cgroup under the cgroup v2 mount "
                        f"{cgroup2_mount} ({proc_cgroup} says {relative!r})")


def _mount_entry(path: str, proc_mounts: str = PROC_MOUNTS) -> Mount | None:
    """The topmost mount whose mount point is exactly `path` (symlinks resolved)."""
    target = os.path.realpath(path)
    found = None
    for mount in read_mounts(proc_mounts):
        if mount.mountpoint == target:
            found = mount
    return found


def is_bpffs(path: str, proc_mounts: str = PROC_MOUNTS) -> bool:
    """Whether `path` is the mount point of a bpf filesystem."""
    mount = _mount_entry(path, proc_mounts)
    return mount is not None and mount.fstype == "bpf"


def mount_bpffs(path: str) -> None:
    """Mount a new bpf filesystem on `path` (an existing directory), unconditionally."""
    if libc().mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise KernelFsError(
            f"mount -t bpf bpf {path} failed: {os.strerror(err)} "
            "(needs CAP_SYS_ADMIN in the initial mount namespace, or a host /sys/fs/bpf "
            "mounted into the container)"
        )


def unmount(path: str) -> None:
    """Lazily unmount whatever is mounted on `path`."""
    if libc().umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise KernelFsError(f"umount {path} failed: {os.strerror(err)}")


def ensure_bpffs(path: str = DEFAULT_BPFFS) -> None:
    """Make `path` a bpffs mount: mount one there unless it already is one."""
    if is_bpffs(path):
        return
    os.makedirs(path, exist_ok=True)
    mount_bpffs(path)
    if not is_bpffs(path):
        raise KernelFsError(f"mounted bpffs on {path} but /proc/mounts does not show it")

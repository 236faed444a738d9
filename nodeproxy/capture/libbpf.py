"""BPF links and pins through the system's libbpf (ctypes).

bcc 0.26 attaches cgroup programs with BPF_PROG_ATTACH, which outlives the
process that made it.  A BPF link instead belongs to its file descriptor (or
to its pin in bpffs): it goes away when the daemon exits unless pinned, and a
pinned link can be found and removed by the next instance.  That choice is
what makes crash behaviour explicit (see CaptureSettings.on_crash).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache


class LibbpfError(OSError):
    pass


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_create.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_prog_query.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_prog_query.restype = ctypes.c_int
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:
        err = -result if result < -1 else ctypes.get_errno()
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return result


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach a program to a target (a cgroup fd) as a BPF link; returns the link fd."""
    return _check(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None),
                  f"bpf_link_create(attach_type={attach_type})")


def pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


def get_pinned(path: str) -> int:
    return _check(_lib().bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


def attached_prog_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup for one attach type (not inherited ones)."""
    count = ctypes.c_uint32(64)
    ids = (ctypes.c_uint32 * 64)()
    flags = ctypes.c_uint32(0)
    _check(_lib().bpf_prog_query(cgroup_fd, attach_type, 0, ctypes.byref(flags), ids,
                                 ctypes.byref(count)), "bpf_prog_query")
    return list(ids[: count.value])

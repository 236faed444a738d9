"""BPF links, pins and map elements through the system's libbpf (ctypes).

The daemon reaches the kernel's programs and maps only through this module: bcc (and its
LLVM) stays in the short-lived child that compiles and loads them.

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
    for name in ("bpf_map_lookup_elem", "bpf_map_get_next_key"):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_uint64]
    lib.bpf_map_update_elem.restype = ctypes.c_int
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_delete_elem.restype = ctypes.c_int
    # Batches (Linux 5.6; opts may be NULL): several elements of one map in one syscall.
    lib.bpf_map_update_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    lib.bpf_map_update_batch.restype = ctypes.c_int
    lib.bpf_map_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    lib.bpf_map_delete_batch.restype = ctypes.c_int
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


def _errno(result: int) -> int:
    """The error of a libbpf call that failed (libbpf 1.x returns -errno and sets errno)."""
    return -result if result < -1 else (ctypes.get_errno() or 22)


def map_lookup(fd: int, key: ctypes.c_void_p, value: ctypes.c_void_p) -> int:
    """Read one element into value; 0, or the errno (ENOENT: no such key)."""
    result = _lib().bpf_map_lookup_elem(fd, key, value)
    return 0 if result >= 0 else _errno(result)


def map_update(fd: int, key: ctypes.c_void_p, value: ctypes.c_void_p, flags: int = 0) -> int:
    """Write one element; 0, or the errno."""
    result = _lib().bpf_map_update_elem(fd, key, value, flags)
    return 0 if result >= 0 else _errno(result)


def map_delete(fd: int, key: ctypes.c_void_p) -> int:
    """Remove one element; 0, or the errno (ENOENT: no such key)."""
    result = _lib().bpf_map_delete_elem(fd, key)
    return 0 if result >= 0 else _errno(result)


def map_update_batch(fd: int, keys: ctypes.c_void_p, values: ctypes.c_void_p,
                     count: int) -> tuple[int, int]:
    """Write `count` elements (keys and values packed back to back) in one syscall, each
    as BPF_ANY (the kernel takes no other per-element flag but BPF_F_LOCK); (0 or the
    errno, how many were written: on an error part-way, the first ones only; refused
    before the first, `count` as given)."""
    done = ctypes.c_uint32(count)
    result = _lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(done), None)
    return (0 if result >= 0 else _errno(result)), done.value


def map_delete_batch(fd: int, keys: ctypes.c_void_p, count: int) -> tuple[int, int]:
    """Remove `count` elements (keys packed back to back) in one syscall; (0 or the errno,
    how many were removed).  A missing key stops the batch there with ENOENT."""
    done = ctypes.c_uint32(count)
    result = _lib().bpf_map_delete_batch(fd, keys, ctypes.byref(done), None)
    return (0 if result >= 0 else _errno(result)), done.value


def map_next_key(fd: int, key: ctypes.c_void_p | None, next_key: ctypes.c_void_p) -> int:
    """The key after key (None: the first) into next_key; 0, or the errno (ENOENT: no
    more)."""
    result = _lib().bpf_map_get_next_key(fd, key, next_key)
    return 0 if result >= 0 else _errno(result)

"""The C library's calls that Python's os and socket modules do not offer, opened once.

mount and umount2 (bpffs, a private procfs), setns and unshare (network namespaces),
getsockopt and setsockopt on a bare descriptor, and glibc's malloc_trim.  Each call's
argument types are declared here, once, so every caller passes the same C types; a
failed call raises OSError with the errno and the caller's words.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

_C_INT = ctypes.c_int
_SIGNATURES: dict[str, tuple[list[type], type]] = {
    "mount": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
               ctypes.c_void_p], _C_INT),
    "umount2": ([ctypes.c_char_p, _C_INT], _C_INT),
    "setns": ([_C_INT, _C_INT], _C_INT),
    "unshare": ([_C_INT], _C_INT),
    "getsockopt": ([_C_INT, _C_INT, _C_INT, ctypes.c_void_p,
                    ctypes.POINTER(ctypes.c_uint32)], _C_INT),
    "setsockopt": ([_C_INT, _C_INT, _C_INT, ctypes.c_void_p, ctypes.c_uint32], _C_INT),
    "malloc_trim": ([ctypes.c_size_t], _C_INT),  # glibc only
}


@cache
def libc() -> ctypes.CDLL:
    """The process's C library (the one the interpreter is linked against), with errno
    kept per call and the signatures above declared for every call it has."""
    lib = ctypes.CDLL(None, use_errno=True)
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name, None)
        if function is not None:
            function.argtypes = argtypes
            function.restype = restype
    return lib


def has(name: str) -> bool:
    """Whether this C library has the call (malloc_trim is glibc's, musl has none)."""
    return getattr(libc(), name, None) is not None


def check(result: int, what: str) -> None:
    """Raise OSError(errno, "<what>: <strerror>") when a call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

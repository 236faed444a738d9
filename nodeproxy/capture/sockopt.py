"""getsockopt and setsockopt on a descriptor, with no socket object in between.

The socket a uvloop transport hands out (`get_extra_info("socket")`) is a stand-in
whose every getsockopt or setsockopt makes a `socket.socket(fileno=...)` first, and
CPython checks that descriptor with a getsockname: two system calls per query.  On the
per-connection paths (the splice's cookies, tcp_info reads and kicks) this module asks
the kernel directly: one system call each.  Anything with a `fileno()`, or a bare
descriptor number, is accepted; errors are OSError as the socket module raises them
(a closed descriptor: EBADF).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from typing import Any


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                ctypes.POINTER(ctypes.c_uint32)]
    libc.getsockopt.restype = ctypes.c_int
    libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_uint32]
    libc.setsockopt.restype = ctypes.c_int
    return libc


def _fd(sock: Any) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def get(sock: Any, level: int, option: int, size: int) -> bytes:
    """The option's value, at most `size` bytes (fewer if the kernel wrote fewer)."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc().getsockopt(_fd(sock), level, option, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:length.value]


def set_int(sock: Any, level: int, option: int, value: int) -> None:
    """Set an int-valued option."""
    buf = ctypes.c_int(value)
    if _libc().setsockopt(_fd(sock), level, option, ctypes.byref(buf),
                          ctypes.sizeof(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

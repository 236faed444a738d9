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
import os
from typing import Any

from nodeproxy.capture.libc import libc


def _fd(sock: Any) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


# A char array type per size asked (a handful: sockaddrs, cookies, tcp_info): made once,
# not by create_string_buffer's type multiplication on every call (each accepted
# connection asks its original destination here).
_BUFFER_TYPES: dict[int, Any] = {}


def get(sock: Any, level: int, option: int, size: int) -> bytes:
    """The option's value, at most `size` bytes (fewer if the kernel wrote fewer)."""
    buffer_type = _BUFFER_TYPES.get(size)
    if buffer_type is None:
        buffer_type = _BUFFER_TYPES[size] = ctypes.c_char * size
    buf = buffer_type()
    length = ctypes.c_uint32(size)
    if libc().getsockopt(_fd(sock), level, option, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:length.value]


def set_int(sock: Any, level: int, option: int, value: int) -> None:
    """Set an int-valued option."""
    buf = ctypes.c_int(value)
    if libc().setsockopt(_fd(sock), level, option, ctypes.byref(buf),
                          ctypes.sizeof(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

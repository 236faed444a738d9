"""The one C library handle: each call's declared types, and errors with errno."""

from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from nodeproxy.capture import sockopt
from nodeproxy.capture.libc import check, has, libc


def test_one_handle_for_every_caller() -> None:
    """No module opens the C library itself: every call goes through libc(), whose
    signatures are the only ones (libbpf, a different library, has its own handle)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    opened = re.compile(r"CDLL\(|cdll\.|LibraryLoader\(")
    own = {root / "nodeproxy/capture/libc.py", root / "nodeproxy/capture/libbpf.py"}
    offenders = [str(path.relative_to(root)) for package in ("nodeproxy", "nodeproxy_dev")
                 for path in sorted((root / package).rglob("*.py"))
                 if path not in own and opened.search(path.read_text())]
    assert offenders == []
    assert libc() is libc()


def test_declared_calls_have_their_c_types() -> None:
    assert libc().setns.argtypes == [ctypes.c_int, ctypes.c_int]
    assert libc().mount.argtypes[3] is ctypes.c_ulong
    assert libc().getsockopt.restype is ctypes.c_int


def test_a_failed_call_raises_oserror_with_errno_and_the_callers_words() -> None:
    with pytest.raises(OSError) as raised:
        check(libc().setns(-1, 0x40000000), "setns into pod netns")
    assert raised.value.errno == errno.EBADF
    assert str(raised.value).startswith("[Errno 9] setns into pod netns: ")


def test_success_raises_nothing() -> None:
    check(0, "anything")


def test_has_tells_which_calls_the_c_library_offers() -> None:
    assert has("malloc_trim")  # this machine runs glibc
    assert not has("no_such_libc_call_nodeproxy")


def test_socket_options_through_the_shared_handle_match_the_socket_module() -> None:
    with socket.socket() as sock:
        sockopt.set_int(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw = sockopt.get(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, 4)
        assert int.from_bytes(raw, "little") == sock.getsockopt(socket.SOL_SOCKET,
                                                                socket.SO_RCVBUF)
    with pytest.raises(OSError) as raised:
        sockopt.get(987654, socket.SOL_SOCKET,
                    socket.SO_RCVBUF, 4)
    assert raised.value.errno == errno.EBADF

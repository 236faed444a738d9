"""capture/sockopt: socket options read and set on the descriptor agree with the socket
module's own, with one system call; errors are the socket module's."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from nodeproxy.capture import sockopt


def test_reads_and_sets_what_the_socket_module_sees():
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert sockopt.get(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, 4) == \
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4)
        assert sockopt.get(sock.fileno(), socket.SOL_SOCKET, 57, 8) == \
            sock.getsockopt(socket.SOL_SOCKET, 57, 8)  # SO_COOKIE, by bare descriptor
        sockopt.set_int(sock, socket.SOL_SOCKET, socket.SO_RCVLOWAT, 7)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 7
        # A longer buffer than the option: only what the kernel wrote.
        assert len(sockopt.get(sock, socket.SOL_SOCKET, socket.SO_RCVLOWAT, 64)) == 4
        assert struct.unpack("i", sockopt.get(sock, socket.SOL_SOCKET,
                                              socket.SO_RCVLOWAT, 4))[0] == 7


def test_a_closed_socket_or_a_wrong_option_is_the_kernels_error():
    sock = socket.socket()
    sock.close()
    with pytest.raises(OSError) as closed:
        sockopt.get(sock, socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    assert closed.value.errno == errno.EBADF
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(OSError) as wrong:
            sockopt.get(udp, socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        assert wrong.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as refused:
            sockopt.set_int(udp, socket.SOL_SOCKET, 999999, 1)
        assert refused.value.errno == errno.ENOPROTOOPT

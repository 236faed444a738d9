"""What the kernel's TCP state says about a socket's send side (tcp_info and ioctl),
and how much of its receive queue is unread.

Asked on the descriptor (capture/sockopt.py), one system call per read: these run per
spliced connection."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

from nodeproxy.capture import sockopt

TCP_ESTABLISHED = 1  # tcpi_state, include/net/tcp_states.h
TCP_CLOSE = 7

# struct tcp_info (include/uapi/linux/tcp.h): u64 tcpi_bytes_acked at offset 120, present
# since Linux 4.1; the whole struct up to it is 128 bytes.
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LEN = 128


def sent_total(sock: Any) -> int:
    """Bytes ever put into this socket's send queue, as a running total: acknowledged
    bytes (tcpi_bytes_acked, which also counts the SYN of an active opener and a FIN
    once acknowledged) plus what is queued and not yet acknowledged (SIOCOUTQ).

    Read acknowledged first: an ACK landing between the two reads moves bytes from the
    queue to acknowledged, so the sum can only be low, never high, until it settles.
    Compare differences of two readings, never the absolute value."""
    return send_state(sock)[1]


def send_state(sock: Any) -> tuple[bool, int]:
    """(whether the connection is ESTABLISHED, sent_total) from one tcp_info read.  A
    socket that has received its peer's FIN (CLOSE_WAIT), read or not, is not: the
    splice maps refuse it."""
    info = sockopt.get(sock, socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    (acked,) = struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    (queued,) = struct.unpack("i", buf)
    return info[0] == TCP_ESTABLISHED, int(acked) + int(queued)


def is_closed(sock: Any) -> bool:
    """The connection is over in the kernel (reset, or both FINs done) while the socket
    is still open here; also true when the socket cannot be asked any more."""
    try:
        info = sockopt.get(sock, socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return True
    return info[0] == TCP_CLOSE


def unread(sock: Any) -> int:
    """Bytes in the socket's receive queue that nobody has read yet (SIOCINQ)."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int(struct.unpack("i", buf)[0])

"""Taking a connected socket out of its uvloop transport and giving it a new one later.

A spliced flow's bytes are the kernel's (tcp/splicer.py): while Python has no part in
it, the two transports only wait, at about 1.1 KiB each in uvloop.  `detach` keeps the
socket (a duplicate descriptor of it) and closes the transport without touching the
connection: no FIN, no reset, the socket stays in the kernel's maps.  The caller then
watches the descriptor (tcp/dormancy.py: one epoll for all sleeping sockets).  `adopt` gives the
sockets new transports, each reporting to its protocol only once all of them are made,
so no byte, EOF or reset reaches a relay whose other side has no transport yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from nodeproxy.tcp.descriptors import BUDGET
from nodeproxy.tcp.relay import WRITE_HIGH_WATER


class _Detached(asyncio.Protocol):
    """Where a closing transport's last calls go once its socket lives on elsewhere."""

    __slots__ = ()


_DETACHED = _Detached()


def detach(transport: asyncio.Transport) -> socket.socket:
    """The transport's socket, kept; the transport is closed (its descriptor only: the
    connection goes on).  Call only with nothing in its write buffer.  OSError (the
    socket has no descriptor any more, no descriptor is free, or the duplicate would be
    one of the reserve proxied sockets never take: limits.reservedFiles) leaves it as it
    was."""
    held = transport.get_extra_info("socket")
    fd = os.dup(held.fileno())
    if not BUDGET.admits(fd):
        os.close(fd)
        raise OSError(f"descriptor {fd} is in the reserve (ceiling {BUDGET.ceiling})")
    try:
        # Family, type and protocol as the transport knows them: CPython asks the kernel
        # for each one it is not given (two getsockopt per socket of every relay that
        # falls asleep, thousands in a burst of idle connections); it still checks the
        # descriptor with a getsockname.  uvloop's stand-in says protocol 0 for its TCP
        # sockets; the kernel says IPPROTO_TCP, and so does the kept socket.
        sock = socket.socket(held.family, held.type, _protocol(held), fileno=fd)
    except OSError:
        os.close(fd)
        raise
    transport.set_protocol(_DETACHED)
    transport.close()
    return sock


def _protocol(held: Any) -> int:
    """The protocol of a transport's socket as the kernel would say it (SO_PROTOCOL)."""
    if held.proto == 0 and held.type == socket.SOCK_STREAM and \
            held.family in (socket.AF_INET, socket.AF_INET6):
        return socket.IPPROTO_TCP
    return int(held.proto)


class _Adopting(asyncio.Protocol):
    """A new transport's first protocol: keeps what it reports until every socket of
    the group has its transport, then hands the transport to the real protocol."""

    __slots__ = ("events", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.events: list[tuple[str, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


@contextlib.contextmanager
def borrowed(sock: socket.socket | int) -> Iterator[socket.socket]:
    """A socket object for a bare descriptor, for the length of a query (getsockopt,
    ioctl): the descriptor stays open and owned by the caller.  A socket is lent as is."""
    if not isinstance(sock, int):
        yield sock
        return
    lent = socket.socket(fileno=sock)
    try:
        yield lent
    finally:
        lent.detach()


async def adopt(socks: list[socket.socket], protocols: list[asyncio.Protocol]) -> None:
    """Give each socket a transport whose protocol is the matching one, reading paused.
    Each protocol's connection_made is not called again: its `transport` attribute is
    set, then whatever the transport reported meanwhile (bytes, EOF, loss) is passed on,
    in order, once every transport is made.  A socket that cannot have a transport
    (OSError, ValueError) is reported lost with that error; it is closed."""
    loop = asyncio.get_running_loop()
    adopting: list[_Adopting] = []
    for sock in socks:
        first = _Adopting()
        try:
            await loop.connect_accepted_socket(lambda first=first: first, sock=sock)
        except (OSError, ValueError) as e:  # ValueError: no descriptor any more
            sock.close()
            first.events.append(("lost", e))
        adopting.append(first)
    for first, protocol in zip(adopting, protocols, strict=True):
        if first.transport is not None:
            first.transport.set_protocol(protocol)
        protocol.transport = first.transport  # type: ignore[attr-defined]
    for first, protocol in zip(adopting, protocols, strict=True):
        for kind, value in first.events:
            if kind == "data":
                protocol.data_received(value)
            elif kind == "eof":
                protocol.eof_received()
            else:
                protocol.connection_lost(value)

"""Opening upstream connections as the proxy does: from a pod's netns, marked, optionally
with the real client's address as source (transparent, into the destination pod)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from typing import Protocol, TypeVar, cast

from nodeproxy.capture.constants import SOCKET_MARK
from nodeproxy.capture.namespaces import Netns
from nodeproxy.capture.transparent import local_ports, transparent_socket
from nodeproxy.stream_protocol import StreamProtocol
from nodeproxy.tcp.descriptors import BUDGET, check_socket
from nodeproxy.tcp.relay import Side

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


P = TypeVar("P", bound=StreamProtocol)


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def relay_side() -> Side:
    """The protocol of an L4 upstream: a relay side that waits paused for its relay."""
    return Side("upstream", start_paused=True)


async def connect_socket(sock: socket.socket, address: tuple[str, int],
                         timeout: float | None = None, *, on_host: bool = False) -> None:
    """Connect a non-blocking socket to a numeric address, as loop.sock_connect would,
    without its name resolution: uvloop's sock_connect passes every address, numeric or
    not, to getaddrinfo in its thread pool (a thread hop per dial, and a queue when many
    dials start at once).  OSError as connect() reports it; TimeoutError after `timeout`
    seconds (a timer only when the connect does not complete at once).

    on_host: the destination is a socket of this host (a pod's own address, from inside
    its netns: the loopback device).  The kernel then runs the whole handshake inside
    connect() (the SYN, the listener's SYN-ACK and its processing happen before the call
    returns, though it still says EINPROGRESS), so the socket is asked once with
    getpeername(), which succeeds only on a connected socket, and the wait for
    writability (two epoll changes, a future, a loop turn and the SO_ERROR read) is
    skipped.  Anything else (still SYN_SENT, refused, reset) takes the wait as before,
    which reports it exactly as connect() does."""
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EINTR):  # EINTR: it goes on, as EINPROGRESS
        raise OSError(err, os.strerror(err))
    if on_host and err == errno.EINPROGRESS:
        try:
            sock.getpeername()
        except OSError:
            pass  # not connected (yet): wait for it below
        else:
            return
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_done, writable)
    timer = None if timeout is None else loop.call_later(timeout, _expire, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("connect timed out"))


async def _connect(sock: socket.socket, dest: tuple[str, int], timeout: float,
                   side: P, *, on_host: bool = False) -> P:
    loop = asyncio.get_running_loop()
    try:
        check_socket(sock)  # an upstream never takes a descriptor of the reserve
        await connect_socket(sock, dest, timeout, on_host=on_host)
        await loop.create_connection(lambda: cast(asyncio.Protocol, side), sock=sock)
    except BaseException:
        sock.close()
        raise
    return side


async def dial_from(netns: Netns, ip: IPAddress, port: int, timeout: float,
                    protocol: P) -> P:
    """Connect from inside a pod's netns (its own address as source), marked as ours."""
    sock = netns.socket(_family(ip))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await _connect(sock, (str(ip), port), timeout, protocol)


class DialAnnouncer(Protocol):
    """Tells inbound capture about the proxy's own connections (CaptureMaps has these)."""

    def expect_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None: ...
    def forget_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None: ...


# The kept port is taken: bound by another socket in the pod's netns (bind), or the
# 4-tuple is (connect; e.g. one client port dialled to two VIPs of the same pod port).
_PORT_TAKEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


def kept_port(client_port: int, ephemeral: range) -> int:
    """The port the dial binds for a client's source port (0: unknown, let the kernel
    search): the client's own if it is one of the destination pod's ephemeral ports, else
    the client's port folded into that range.  Never a port outside it: any other might be
    one the pod's application listens on (a client chooses its source port; the pod's
    services do not live in its ephemeral range).  Folded, not searched: the same client
    port always gives the same port, so the dial still takes over its own TIME_WAIT tuple
    when the client reuses the port (clients often have wider ranges than pods)."""
    if not client_port or not ephemeral:
        return 0
    if client_port in ephemeral:
        return client_port
    return ephemeral[(client_port - ephemeral.start) % len(ephemeral)]


async def dial_transparent(netns: Netns, source: IPAddress, ip: IPAddress, port: int,
                           timeout: float, announcer: DialAnnouncer, protocol: P,
                           source_port: int = 0) -> P:
    """Connect to an application inside its own pod's netns with the client's address as
    source, so the application sees the real peer (see nodeproxy.capture.transparent).
    The 4-tuple is announced to the kernel first, so inbound capture lets it pass.

    source_port: the client's own port (0: unknown).  Kept when it is one of the pod's
    ephemeral ports, folded into them when not (kept_port); when that port or 4-tuple is
    taken in the pod, the kernel searches one at bind time.  Pass
    it only where the client's own connection does not end in the destination's netns:
    inbound capture's accepted socket there is (dest <- client:port), the very tuple the
    application's side of a kept-port dial would be, and connect() cannot see it."""
    if source.version != ip.version:
        source = _same_family_fallback(source, ip)
    family = _family(ip)
    source_ip = str(source)
    dest = (str(ip), port)
    kept = kept_port(source_port, local_ports(netns)) if source_port else 0
    if kept:
        try:
            sock = transparent_socket(netns, source_ip, family, kept, BUDGET.ceiling)
        except OSError as e:
            if e.errno not in _PORT_TAKEN:
                raise
        else:
            try:
                # Bound to exactly (source_ip, kept): no getsockname() to learn it.
                return await _announced_connect(sock, (source_ip, kept), dest, timeout,
                                                announcer, protocol)
            except OSError as e:
                if e.errno not in _PORT_TAKEN:
                    raise
    sock = transparent_socket(netns, source_ip, family, 0, BUDGET.ceiling)
    return await _announced_connect(sock, None, dest, timeout, announcer, protocol)


async def _announced_connect(sock: socket.socket, local: tuple[str, int] | None,
                             dest: tuple[str, int], timeout: float,
                             announcer: DialAnnouncer, protocol: P) -> P:
    """Announce (local, dest) while the socket connects; `local` None: the port the
    kernel chose at bind time, asked of the socket."""
    if local is None:
        try:
            local = sock.getsockname()[:2]
        except OSError:
            sock.close()
            raise
    announcer.expect_dial(local, dest)
    try:
        # Into a pod of this node: the handshake completes inside connect().
        return await _connect(sock, dest, timeout, protocol, on_host=True)
    finally:
        announcer.forget_dial(local, dest)


def _same_family_fallback(source: IPAddress, ip: IPAddress) -> IPAddress:
    """A client of the other family: use its IPv4-mapped form for IPv6 or give up."""
    if ip.version == 6 and source.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{source}")
    raise OSError(f"cannot present {source} as the source of a connection to {ip}")

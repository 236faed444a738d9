"""HPACK header blocks the tunnel encodes itself (RFC 7541): the CONNECT request a source
node sends for each new connection and the status a destination node answers with.

Every field is a static-table reference or a literal *without indexing* (§6.1, §6.2.2,
plain strings, no Huffman), so a block leaves both sides' dynamic tables as they were:
the same bytes are valid on every connection, at any point of it, and can be built once
per destination and reused (``connect_block`` keeps the last few thousand).  h2 still
keeps the streams' states (codec/h2_connection.py, ``send_encoded_headers``); only its
per-request header validation and encoding are skipped, for headers built here from
parsed addresses and numbers, never from a peer's bytes.

Pure functions, bytes out.
"""

from __future__ import annotations

import functools
import ipaddress

from nodeproxy.tunnel.headers import L7_AUTHORIZED, SOURCE_PORT, authority, forwarded

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 7541 Appendix A
_AUTHORITY_INDEX = 1
_METHOD_INDEX = 2
_STATUS_INDEX = 8
_STATIC_STATUS = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
CACHED_BLOCKS = 4096  # distinct (destination, port, source, marker) blocks kept


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (§5.1) in a `prefix_bits` prefix; `first` holds the first byte's
    other bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def string(text: str) -> bytes:
    """A string literal (§5.2), not Huffman-coded."""
    raw = text.encode("ascii")
    return integer(len(raw), 7) + raw


def literal(name: str | int, value: str) -> bytes:
    """A field without indexing (§6.2.2): `name` a static-table index or a lowercase name."""
    if isinstance(name, int):
        return integer(name, 4) + string(value)
    return b"\x00" + string(name) + string(value)


@functools.lru_cache(maxsize=CACHED_BLOCKS)
def connect_block(ip: IPAddress, port: int, source_ip: IPAddress,
                  l7_checked: bool) -> tuple[bytes, bytes]:
    """The CONNECT request for ip:port from source_ip (headers.py's fields), less the
    source port, which changes with every connection (``source_port_field``); and its
    :authority."""
    target = authority(ip, port)
    block = (literal(_METHOD_INDEX, "CONNECT") + literal(_AUTHORITY_INDEX, target)
             + literal("forwarded", forwarded(source_ip)))
    if l7_checked:
        block += literal(L7_AUTHORIZED, "1")
    return block, target.encode("ascii")


_SOURCE_PORT_NAME = b"\x00" + string(SOURCE_PORT)


def source_port_field(port: int) -> bytes:
    """The SOURCE_PORT field, appended to a connect_block; b"" for 0 (none sent).  A
    port's decimal text is at most 5 bytes, so its length is one byte (§5.1: below the
    7-bit prefix's 127), written here without ``string`` and ``integer``."""
    if not port:
        return b""
    text = b"%d" % port
    if len(text) > 5:  # not a port: the general encoding
        return _SOURCE_PORT_NAME + string(str(port))
    return _SOURCE_PORT_NAME + _LENGTH_BYTE[len(text)] + text


_LENGTH_BYTE = [bytes((n,)) for n in range(6)]


@functools.lru_cache(maxsize=64)
def status_block(status: int) -> bytes:
    """A response's header block: its :status, indexed when the static table has it."""
    index = _STATIC_STATUS.get(status)
    if index is not None:
        return integer(index, 7, 0x80)
    return literal(_STATUS_INDEX, str(status))

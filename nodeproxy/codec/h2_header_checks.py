"""The checks h2 makes on a received header block (RFC 9113 §8.2, §8.3), in one pass.

h2's ``validate_headers`` runs each field through a chain of seven generators and
inspects names and values a byte at a time in Python: about a twentieth of an HTTP/2
request's CPU in the proxy.  ``check_received`` accepts and refuses exactly the blocks
h2 does (tests/unit/test_h2_header_checks.py compares the two on hostile blocks), with
h2's exception (ProtocolError: the connection ends with PROTOCOL_ERROR), using regular
expressions instead.  The proxy's connection (codec/h2_connection.py) calls it in place
of h2's for blocks h2 hands over as bytes.

Pure: a header list and what kind of block it is in, an exception or nothing out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from h2.exceptions import ProtocolError
from h2.utilities import CONNECTION_HEADERS

# A name: visible ASCII but uppercase letters (a colon only first: pseudo-headers).
_BAD_NAME = re.compile(rb"[^\x21-\x40\x5b-\x7e]|.:").search
_BAD_VALUE = re.compile(rb"[\x00\n\r]|^[ \t]|[ \t]\Z").search
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":status",
                     b":protocol"})
_REQUEST_ONLY = frozenset({b":scheme", b":path", b":authority", b":method", b":protocol"})


def check_received(headers: Iterable[tuple[bytes, bytes]], *, request: bool,
                   trailer: bool) -> None:
    """Raise ProtocolError if h2's validate_headers would refuse `headers` (names and
    values as bytes): a request's or a response's header section (`request` says which),
    or either's trailer section."""
    pseudo: set[bytes] = set()
    regular_seen = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if not name:
            raise ProtocolError("Received header name with zero length.")
        if _BAD_NAME(name):
            raise ProtocolError(f"Illegal character in header name: {name!r}")
        if value and _BAD_VALUE(value):
            raise ProtocolError(f"Illegal character or surrounding whitespace in header "
                                f"value: {value!r}")
        if name[0] == 0x3A:  # ":"
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name!r}")
            pseudo.add(name)
            if regular_seen:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name!r}")
            if name not in _PSEUDO:
                raise ProtocolError(f"Received custom pseudo-header field {name!r}")
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and request and not trailer:
                raise ProtocolError("An empty :path header is forbidden")
            continue
        regular_seen = True
        if name == b"te":
            if value.lower() != b"trailers":
                raise ProtocolError(f"Invalid value for TE header: {value!r}")
        elif name in CONNECTION_HEADERS:
            raise ProtocolError(f"Connection-specific header field present: {name!r}.")
        elif name == b"host" and request and not trailer:
            if host is not None:
                raise ProtocolError("Request header block has multiple Host headers.")
            host = value
    _check_pseudo(pseudo, method, request=request, trailer=trailer)
    if request and not trailer:
        if authority is None and host is None:
            raise ProtocolError("Request header block does not have an :authority or Host "
                                "header.")
        if authority is not None and host is not None and authority != host:
            raise ProtocolError("Request header block has mismatched :authority and Host "
                                f"headers: {authority!r} / {host!r}")


def _check_pseudo(pseudo: set[bytes], method: bytes | None, *, request: bool,
                  trailer: bool) -> None:
    if trailer:
        if pseudo:
            raise ProtocolError(f"Received pseudo-header in trailer {pseudo}")
        return
    if not request:
        if b":status" not in pseudo:
            raise ProtocolError("Header block missing mandatory b':status' header")
        if pseudo & _REQUEST_ONLY:
            raise ProtocolError(f"Encountered request-only headers {pseudo & _REQUEST_ONLY}")
        return
    if b":method" not in pseudo:
        raise ProtocolError("Header block missing mandatory b':method' header")
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise ProtocolError("Ordinary CONNECT MUST NOT include :scheme or :path")
    else:
        for required in (b":scheme", b":path"):
            if required not in pseudo:
                raise ProtocolError(f"Header block missing mandatory {required!r} header")
    if b":status" in pseudo:
        raise ProtocolError("Encountered response-only headers {b':status'}")
    if not connect and b":protocol" in pseudo:
        raise ProtocolError("Encountered connect-request-only headers {b':protocol'}")

"""Which protocol a captured connection speaks: declared, opaque, or sniffed.

A service port's ``appProtocol`` decides when it is set (http, http2, grpc: parsed;
tcp: never).  Undeclared, the well-known server-first ports (``http.opaquePorts``)
are opaque too.  Anything else is sniffed from the client's first bytes: the HTTP/2
connection preface (prior knowledge), or an HTTP/1.x request line's method.  The
sniff never waits on a server-first protocol: the proxy connects upstream at once
and bytes from the server end the detection (listeners/outbound.py).
"""

from __future__ import annotations

from enum import Enum

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
            b"PATCH")
_LONGEST = max(len(m) for m in _METHODS) + 1


class Sniffed(Enum):
    HTTP1 = "http/1.1"
    HTTP2 = "http/2"
    OPAQUE = "tcp"


class PortMode(Enum):
    """What the proxy does with a service port before seeing any byte."""

    HTTP = "http"      # parse: HTTP/1.1, or HTTP/2 when the client sends the preface
    HTTP2 = "http2"    # parse, and speak HTTP/2 to the upstream (http2, grpc)
    OPAQUE = "tcp"     # relay bytes (tcp, or an undeclared server-first port)
    DETECT = "detect"  # sniff the first bytes


def port_mode(app_protocol: str | None, port: int, opaque_ports: frozenset[int]) -> PortMode:
    if app_protocol == "tcp":
        return PortMode.OPAQUE
    if app_protocol in ("http2", "grpc"):
        return PortMode.HTTP2
    if app_protocol == "http":
        return PortMode.HTTP
    return PortMode.OPAQUE if port in opaque_ports else PortMode.DETECT


def sniff(first: bytes) -> Sniffed | None:
    """The protocol of a connection whose client sent `first`; None: need more bytes."""
    if not first:
        return None
    if H2_PREFACE.startswith(first[:len(H2_PREFACE)]):
        return Sniffed.HTTP2 if len(first) >= len(H2_PREFACE) else None
    head = first[:_LONGEST]
    for method in _METHODS:
        if head.startswith(method + b" "):
            return Sniffed.HTTP1
        if len(head) <= len(method) and method.startswith(head):
            return None  # "GE": could still become "GET "
    return Sniffed.OPAQUE

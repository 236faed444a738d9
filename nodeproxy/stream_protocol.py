"""What the event loop, and every transport of ours, calls on a stream's protocol: the one
definition of asyncio.Protocol's method set as a structural type.

asyncio.Protocol subclasses have it, and so do the classes that do not subclass it
(mypyc compiles a class as a native one only without that Python base): codec/h1.py's
H1Server and H1Client, tunnel/session.py's H2Session.  tcp/dial.py hands such a
protocol to the loop; identity/tls_transport.py's records call it above TLS.
This module imports only the standard library, so every layer may use it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class StreamProtocol(Protocol):
    """connection_made .. connection_lost, and the write flow control in between."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...

"""Numbers the eBPF programs and the daemon must agree on; passed to the C side as -D flags."""

from __future__ import annotations

MAX_PODS = 4096
MAX_FLOWS = 65536
# SO_MARK on the proxy's own sockets; the capture programs never touch a socket carrying it.
SOCKET_MARK = 0x4E50  # "NP"
DIRECTION_OUTBOUND = 1
DIRECTION_INBOUND = 2


def cflags(outbound_port: int) -> list[str]:
    """The -D flags that give the C programs the same constants as the daemon."""
    return [
        f"-DNP_MAX_PODS={MAX_PODS}",
        f"-DNP_MAX_FLOWS={MAX_FLOWS}",
        f"-DNP_OUTBOUND_PORT={outbound_port}",
        f"-DNP_SOCKET_MARK={SOCKET_MARK:#x}",
    ]

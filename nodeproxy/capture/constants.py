"""Numbers the eBPF programs and the daemon must agree on; passed to the C side as -D flags."""

from __future__ import annotations

from nodeproxy.ports import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT

MAX_PODS = 4096
MAX_FLOWS = 65536
MAX_DENIES = 65536
MAX_POLICIES = 1024
# probe_sources (LPM trie) slots: as many as inbound.probeSources may list (the config
# model's MAX_PROBE_SOURCES; not imported here, so the loading child needs no pydantic).
MAX_PROBE_SOURCES = 256
# SO_MARK on the proxy's own sockets; the capture programs never touch a socket carrying it.
SOCKET_MARK = 0x4E50  # "NP"
# SO_MARK on the proxy's transparent connections into a pod (source = the real client's
# IP). The pod netns accepts it into the app's socket (tcp_fwmark_accept) and routes
# the app's replies with this mark back to the proxy (an ip rule to a local table).
TRANSPARENT_MARK = 0x4E51
TRANSPARENT_ROUTE_TABLE = 15051
# pod_info.flags: the pod has no IPv6 loopback, so connect6 must not steer it to [::1].
POD_NO_IPV6 = 0x1
# splice_control.mode (bpf/splice.c): redirect to the peer (within the credit); pass
# everything to the proxy.
SPLICE_REDIRECT = 0
SPLICE_PROXY = 1
# sk_msg fast path (bpf/redirect.c): a redirect never blocks its sender, so each direction
# of a connection has a bound on what the redirect may leave queued at the receiver; over
# it, the direction takes TCP and its flow control.  App -> proxy: bytes sent but not yet
# read by the proxy (the daemon posts its reads).  Proxy -> app: the application's reads
# cannot be seen, so this bounds all the bytes redirected to it over the connection.
# Both are of the order of TCP's own per-socket buffers (tcp_rmem/tcp_wmem maxima).
MSG_TO_PROXY_PENDING = 4 << 20
MSG_TO_APP_BYTES = 8 << 20


def cflags(pin_dir: str, outbound_port: int = OUTBOUND_PORT, inbound_port: int = INBOUND_PORT,
           hbone_port: int = HBONE_PORT) -> list[str]:
    """The -D flags that give the C programs the same constants as the daemon.
    pin_dir: the bpffs directory where the shared maps are pinned (and found again)."""
    return [
        f'-DNP_PIN_DIR="{pin_dir}"',
        f"-DNP_MAX_PODS={MAX_PODS}",
        f"-DNP_MAX_FLOWS={MAX_FLOWS}",
        f"-DNP_MAX_DENIES={MAX_DENIES}",
        f"-DNP_MAX_POLICIES={MAX_POLICIES}",
        f"-DNP_MAX_PROBE_SOURCES={MAX_PROBE_SOURCES}",
        f"-DNP_OUTBOUND_PORT={outbound_port}",
        f"-DNP_INBOUND_PORT={inbound_port}",
        f"-DNP_HBONE_PORT={hbone_port}",
        f"-DNP_SOCKET_MARK={SOCKET_MARK:#x}",
        f"-DNP_TRANSPARENT_MARK={TRANSPARENT_MARK:#x}",
        f"-DNP_POD_NO_IPV6={POD_NO_IPV6:#x}",
        f"-DNP_SPLICE_REDIRECT={SPLICE_REDIRECT}",
        f"-DNP_SPLICE_PROXY={SPLICE_PROXY}",
        f"-DNP_MSG_TO_PROXY_PENDING={MSG_TO_PROXY_PENDING}ULL",
        f"-DNP_MSG_TO_APP_BYTES={MSG_TO_APP_BYTES}ULL",
    ]

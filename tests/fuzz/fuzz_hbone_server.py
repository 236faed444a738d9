"""Fuzz target: the HBONE server's frame handling (nodeproxy.tunnel.session.H2Session in
server mode, requests served by nodeproxy.listeners.inbound_hbone.HboneServer._serve).

One input is what a peer node's proxy sends after the mutual-TLS handshake: the HTTP/2
preface and frames carrying CONNECT requests (seeds: real CONNECT streams with
``:authority``, ``Forwarded`` and the L7-authorized marker, data, resets, pings, settings,
GOAWAY).  TLS is left out (its handshake is the ssl module's; what follows it is this);
the peer counts as verified.  The local pod and admission are stand-ins that record what
they are asked and refuse every stream, so nothing is dialled.

Invariants, beyond "nothing raises":
- admission is asked only about a CONNECT whose ``:authority`` is the local pod's
  IP:port (port 1..65535), with an IP address as its source, and with ``l7_checked``
  exactly when the marker header is ``1``;
- every CONNECT stream the session accepted is answered (a 4xx ``:status``) or reset,
  unless the connection itself ended (a GOAWAY either way); never 2xx;
- everything written is well-formed HTTP/2 frames, SETTINGS first.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from hpack import Decoder
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from prometheus_client import CollectorRegistry

from nodeproxy.listeners.inbound_hbone import HboneServer
from nodeproxy.policy.admission import Admission
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.tunnel.headers import L7_AUTHORIZED, HeaderError, parse_authority
from nodeproxy.tunnel.metrics import TunnelMetrics
from nodeproxy.tunnel.session import H2Session, StreamReset, StreamTransport
from tests.fuzz import harness
from tests.fuzz.fuzz_h2_server import written_frames

POD_IP = ipaddress.ip_address("10.244.2.20")
POD_IP6 = ipaddress.ip_address("fd00::20")
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
LOCAL = "spiffe://cluster.local/ns/shop/sa/web"


@dataclass
class _Workload:
    namespace: str = "shop"
    service_account: str = "web"


@dataclass
class _Pod:
    workload: _Workload
    key: str = "shop/web"


class _RefusingAdmitter:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def admit(self, dest: Any, principal: str | None, source_ip: Any, port: int,
              **options: Any) -> Admission:
        self.calls.append({"principal": principal, "source_ip": source_ip, "port": port,
                           **options})
        return Admission(False, "shop/deny-all", "fuzzing")


_ADMITTER = _RefusingAdmitter()
_REGISTRY = CollectorRegistry()
_SERVER: HboneServer | None = None


def _server() -> HboneServer:
    global _SERVER
    if _SERVER is None:  # one per process: its metrics register once
        _SERVER = HboneServer(
            certificates=None, trust_domain="cluster.local", port=15008,  # type: ignore[arg-type]
            announcer=None, handshake_timeout=1, connect_timeout=1,  # type: ignore[arg-type]
            local_pod=lambda ip: _Pod(_Workload()) if ip in (POD_IP, POD_IP6) else None,  # type: ignore[arg-type,return-value]
            # The source's marker believed (tunnel.trustSourceL7Authorization), so what is
            # checked is that exactly a marker of "1" is: the default, never believing it,
            # is tests/integration/test_hostile_marker.py's.
            state=SimpleNamespace(current=SimpleNamespace(  # type: ignore[arg-type]
                admitter=_ADMITTER, config=SimpleNamespace(tunnel=SimpleNamespace(
                    trust_source_l7_authorization=True)))),
            tracker=ConnectionTracker(), metrics=ProxyMetrics(_REGISTRY),
            tunnel_metrics=TunnelMetrics(_REGISTRY))
    return _SERVER


async def _drive(data: bytes) -> None:
    server = _server()
    accepted: dict[int, dict[str, str]] = {}
    streams: list[StreamTransport] = []

    def on_request(session: H2Session, stream: StreamTransport) -> None:
        accepted[stream.stream_id] = dict(stream.request_headers)
        streams.append(stream)
        server._on_request(session, stream)

    def verified(session: H2Session) -> bool:
        session.peer_identity = PEER  # what mTLS verification sets
        session.local_identity = LOCAL
        return True

    _ADMITTER.calls.clear()
    session = H2Session(client_side=False, on_request=on_request, on_ready=verified)
    transport = harness.MemoryTransport(peer=("10.0.1.5", 51000))
    await harness.feed(session, transport, data)
    frames = written_frames(bytes(transport.written))
    peer_goaway = session.goaway
    session.connection_lost(None)
    await harness.settle()

    for call in _ADMITTER.calls:
        assert call["principal"] == PEER
        assert isinstance(call["source_ip"], ipaddress.IPv4Address | ipaddress.IPv6Address)
        assert 0 < call["port"] < 65536, f"admission asked about port {call['port']}"
    # Streams are served in the order they arrived, and each that names the local pod
    # reaches admission before anything is awaited; one the peer reset first may be
    # dropped before admission.
    reset_by_peer = {s.stream_id for s in streams if isinstance(s._error, StreamReset)}
    calls = [c["l7_checked"] for c in _ADMITTER.calls]
    for sid, h in accepted.items():
        if h.get(":method") != "CONNECT" or not _local_authority(h.get(":authority")):
            continue
        marked = h.get(L7_AUTHORIZED) == "1"
        if calls and calls[0] == marked:
            calls.pop(0)
        else:
            assert sid in reset_by_peer, \
                f"stream {sid}: admission not asked, or not with the marker as sent"
    assert not calls, "admission asked about a stream that was no CONNECT to the local pod"
    assert frames and isinstance(frames[0], SettingsFrame), "the server's first frame"
    decoder = Decoder()
    decoder.max_allowed_table_size = 2**32  # whatever table size the peer's SETTINGS allow
    answered = {f.stream_id for f in frames if isinstance(f, RstStreamFrame)}
    for f in frames:
        if isinstance(f, HeadersFrame):
            status = dict(decoder.decode(f.data)).get(":status", "")
            assert status[:1] == "4" or status == "503", \
                f"stream {f.stream_id} answered {status!r}"
            answered.add(f.stream_id)
    # After a GOAWAY either way h2 sends nothing more (python-hyper/h2#1181, see
    # nodeproxy/codec/h2.py): a stream then ends with the connection, unanswered.
    if not any(isinstance(f, GoAwayFrame) for f in frames) and not peer_goaway:
        unanswered = set(accepted) - answered - reset_by_peer
        assert not unanswered, f"streams {sorted(unanswered)} got no answer"


def _local_authority(authority: str | None) -> bool:
    try:
        ip, _ = parse_authority(authority or "")
    except HeaderError:
        return False
    return ip in (POD_IP, POD_IP6)


def check(data: bytes) -> None:
    harness.run(lambda: _drive(data))

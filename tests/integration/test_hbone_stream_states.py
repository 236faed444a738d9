"""A compromised peer node against node1's HBONE server, frame by frame: how a CONNECT
stream ends.  The server takes a stream's END_STREAM (and, on the client side, the
CONNECT response) without h2's frame parser where the outcome is fixed
(codec/h2_connection.py receive_end_stream / receive_known_response); everything else
must still get h2's answer.  The peer here is raw: a mesh certificate (the node was
compromised), frames built by hand, hpack for its header blocks and hyperframe to read
what the daemon answers, so it can send what a correct HTTP/2 library refuses to.

Judged by what a user of the mesh would notice: the bytes the pod echoes back, the
RST_STREAM or GOAWAY code the daemon sends, and the tunnel still carrying a new stream
afterwards.  The same answers held before the shortcut (checked against main's tree).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator

import hpack
import hyperframe.frame
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.identity import tls
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.ports import HBONE_PORT
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster

pytestmark = pytest.mark.privileged

PORT = 7000  # the peer server: "P" then every byte echoed until EOF
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, STREAM_CLOSED, CANCEL = 0x0, 0x1, 0x5, 0x8
RST_STREAM, SETTINGS, GOAWAY = 0x3, 0x4, 0x7


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client-a", labels={"app": "client-a"}, service_account="alpha")
        c.add_pod("node1", "web-1", labels={"app": "web"}, service_account="web")
        c.serve_peer("web-1", PORT)
        c.write_configs()
        c.start_daemons()
        yield c


class RawPeer:
    """One mutual-TLS connection to node1's HBONE port, as a (compromised) node."""

    def __init__(self, mesh: Cluster):
        self.target = f"{mesh.pods['web-1'].ip4}:{PORT}"
        manager = CertificateManager(MeshCA.load(mesh.ca_cert, mesh.ca_key, "cluster.local"),
                                     "cluster.local", ttl_seconds=3600)
        raw = netns.connect(mesh.nodes["node0"].netns_path, mesh.pods["web-1"].ip4,
                            HBONE_PORT)
        raw.settimeout(5)
        self.sock = tls.client_context(manager, "default", "alpha").wrap_socket(
            raw, server_hostname=None)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []  # (type, flags, stream, body)
        self.closed = False
        # our SETTINGS (empty), and an ACK of the server's once it comes
        self.send(PREFACE + h2_frames.header(0, SETTINGS, 0, 0))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, stream_id: int, extra: list[tuple[str, str]] | None = None) -> None:
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", self.target)]
                                    + (extra or []))
        self.send(h2_frames.header(len(block), h2_frames.HEADERS, h2_frames.END_HEADERS,
                                   stream_id) + block)

    def data(self, stream_id: int, payload: bytes, end: bool = False) -> bytes:
        return h2_frames.header(len(payload), h2_frames.DATA,
                                h2_frames.END_STREAM if end else 0, stream_id) + payload

    def read_until(self, done, seconds: float = 5.0) -> None:
        """Read frames (acknowledging SETTINGS) until done(self) or the deadline."""
        deadline = time.monotonic() + seconds
        while not done(self) and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 16)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
            while len(self.buffer) >= 9:
                frame, length = hyperframe.frame.Frame.parse_frame_header(
                    memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                body = self.buffer[9:9 + length]
                self.buffer = self.buffer[9 + length:]
                kind = frame.type
                flags = self._flags(frame)
                if kind == SETTINGS and not flags & 0x1:
                    self.send(h2_frames.header(0, SETTINGS, 0x1, 0))
                self.frames.append((kind, flags, frame.stream_id, body))

    @staticmethod
    def _flags(frame: hyperframe.frame.Frame) -> int:
        return sum(f.bit for f in frame.defined_flags if f.name in frame.flags)

    # what the daemon answered
    def status(self, stream_id: int) -> str | None:
        for kind, _, sid, body in self.frames:
            if kind == h2_frames.HEADERS and sid == stream_id:
                return dict(self.decoder.decode(body)).get(":status")
        return None

    def echoed(self, stream_id: int) -> bytes:
        return b"".join(body for kind, _, sid, body in self.frames
                        if kind == h2_frames.DATA and sid == stream_id)

    def ended(self, stream_id: int) -> bool:
        return any(kind in (h2_frames.DATA, h2_frames.HEADERS) and flags & 0x1
                   and sid == stream_id for kind, flags, sid, _ in self.frames)

    def reset_code(self, stream_id: int) -> int | None:
        for kind, _, sid, body in self.frames:
            if kind == RST_STREAM and sid == stream_id:
                return int.from_bytes(body[:4], "big")
        return None

    def goaway_code(self) -> int | None:
        for kind, _, _, body in self.frames:
            if kind == GOAWAY:
                return int.from_bytes(body[4:8], "big")
        return None


@pytest.fixture
def peer(mesh: Cluster) -> Iterator[RawPeer]:
    p = RawPeer(mesh)
    try:
        yield p
    finally:
        p.close()


def _open(peer: RawPeer, stream_id: int) -> None:
    peer.connect(stream_id)
    peer.read_until(lambda p: p.status(stream_id) is not None)
    assert peer.status(stream_id) == "200", peer.frames


def _echo_round(peer: RawPeer, stream_id: int, payload: bytes) -> None:
    """A whole stream: CONNECT, the payload and END_STREAM; the pod's echo and its
    END_STREAM come back."""
    _open(peer, stream_id)
    peer.send(peer.data(stream_id, b"P" + payload, end=True))
    peer.read_until(lambda p: p.ended(stream_id))
    assert peer.echoed(stream_id) == payload
    assert peer.ended(stream_id) and peer.reset_code(stream_id) is None


def test_streams_that_end_both_ways_carry_their_bytes_and_leave_the_tunnel_usable(
        peer: RawPeer) -> None:
    for n, stream_id in enumerate((1, 3, 5)):
        _echo_round(peer, stream_id, bytes([n]) * (1000 + n))
    # END_STREAM as an empty frame after the data, and in the same write as the data
    _open(peer, 7)
    peer.send(peer.data(7, b"Phello") + peer.data(7, b"", end=True))
    peer.read_until(lambda p: p.ended(7))
    assert peer.echoed(7) == b"hello" and peer.goaway_code() is None


def test_end_stream_twice_is_a_stream_error_and_the_tunnel_goes_on(peer: RawPeer) -> None:
    _open(peer, 1)
    peer.send(peer.data(1, b"Pabc", end=True) + peer.data(1, b"", end=True))
    peer.read_until(lambda p: p.reset_code(1) is not None)
    assert peer.reset_code(1) == STREAM_CLOSED, peer.frames
    assert peer.goaway_code() is None
    _echo_round(peer, 3, b"after")


def test_data_after_end_stream_is_refused_and_not_delivered(peer: RawPeer) -> None:
    _open(peer, 1)
    peer.send(peer.data(1, b"Pfirst", end=True) + peer.data(1, b"SMUGGLED"))
    peer.read_until(lambda p: p.reset_code(1) is not None and p.ended(1), seconds=3)
    assert peer.reset_code(1) == STREAM_CLOSED, peer.frames
    assert b"SMUGGLED" not in peer.echoed(1)
    assert peer.goaway_code() is None
    _echo_round(peer, 3, b"after")


def test_end_stream_racing_a_reset_ends_only_that_stream(peer: RawPeer) -> None:
    _open(peer, 1)
    reset = h2_frames.header(4, RST_STREAM, 0, 1) + CANCEL.to_bytes(4, "big")
    peer.send(peer.data(1, b"Pxyz", end=True) + reset + peer.data(1, b"", end=True))
    # the stream is gone either way; frames on it after the reset are h2's to answer
    _echo_round(peer, 3, b"after")
    assert peer.goaway_code() is None


def test_end_stream_on_a_stream_never_opened_is_a_connection_error(peer: RawPeer) -> None:
    _open(peer, 1)
    peer.send(peer.data(99, b"", end=True))
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == PROTOCOL_ERROR, peer.frames


def test_a_declared_length_is_still_h2s_to_judge_at_end_stream(peer: RawPeer) -> None:
    """CONNECT with content-length: its END_STREAM goes to h2, which judges the body
    length as it always did (the tunnel's DATA bypasses h2's count: a connection
    PROTOCOL_ERROR)."""
    peer.connect(1, [("content-length", "4")])
    peer.read_until(lambda p: p.status(1) is not None)
    assert peer.status(1) == "200"
    peer.send(peer.data(1, b"Pabc", end=True))
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == PROTOCOL_ERROR, peer.frames


def test_headers_without_end_stream_on_an_open_stream_is_a_connection_error(
        peer: RawPeer) -> None:
    _open(peer, 1)
    block = peer.encoder.encode([("x-trailer", "1")])
    peer.send(h2_frames.header(len(block), h2_frames.HEADERS, h2_frames.END_HEADERS, 1)
              + block)
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == PROTOCOL_ERROR, peer.frames

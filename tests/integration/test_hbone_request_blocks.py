"""A compromised peer node against node1's HBONE server, by the header blocks of its
CONNECT requests.  The server takes a request whose block neither reads nor changes
HPACK's dynamic table (static references and literals without indexing, as nodeproxy's
own source nodes send: tunnel/header_block.py) without h2's parser and decoder
(codec/h2_connection.py receive_known_request); every other block must still get h2's
answer, and the decoder's table must stay in step with the peer's encoder whichever way
each block went.

The peer is tests/integration/test_hbone_stream_states.py's raw one (a mesh certificate,
frames built by hand).  Judged by what a user of the mesh would notice: the bytes the pod
echoes back (SHA-256), the status or the GOAWAY code the daemon sends, the tunnel still
carrying a new stream afterwards, and the abuse counter."""

from __future__ import annotations

import hashlib
import ipaddress
import time

import hpack
import pytest

from nodeproxy.codec import h2_frames
from nodeproxy.tunnel.header_block import connect_block, literal, source_port_field
from tests.integration.observe import metric_sum
from tests.integration.test_hbone_stream_states import (
    CANCEL,
    PORT,
    PROTOCOL_ERROR,
    RST_STREAM,
    RawPeer,
    _echo_round,
    mesh,
    peer,
)

pytestmark = pytest.mark.privileged

__all__ = ["mesh", "peer"]  # the fixtures: one mesh for the module

COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB


def _static_block(peer: RawPeer, source_port: int = 40000, target: str | None = None,
                  extra: bytes = b"") -> bytes:
    ip, _, port = (target or peer.target).rpartition(":")
    block, _ = connect_block(ipaddress.ip_address(ip), int(port),
                             ipaddress.ip_address("10.99.0.7"), False)
    return block + source_port_field(source_port) + extra


def _send_block(peer: RawPeer, stream_id: int, block: bytes) -> None:
    peer.send(h2_frames.header(len(block), h2_frames.HEADERS, h2_frames.END_HEADERS,
                               stream_id) + block)


def _stream(peer: RawPeer, stream_id: int, block: bytes, payload: bytes) -> None:
    """CONNECT with `block`, then the payload and END_STREAM: the pod's echo, intact."""
    _send_block(peer, stream_id, block)
    peer.read_until(lambda p: p.status(stream_id) is not None)
    assert peer.status(stream_id) == "200", peer.frames
    peer.send(peer.data(stream_id, b"P" + payload, end=True))
    peer.read_until(lambda p: p.ended(stream_id))
    got = peer.echoed(stream_id)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), len(got)
    assert peer.reset_code(stream_id) is None


def _refused(peer: RawPeer, code: int) -> None:
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == code, peer.frames


def test_the_tunnels_own_blocks_repeated_on_new_streams_carry_their_bytes(
        peer: RawPeer) -> None:
    for n in range(12):
        _stream(peer, 1 + 2 * n, _static_block(peer, 40000 + n % 2),
                bytes([n]) * (100 + 397 * n))  # within the peer's 64 KiB window
    assert peer.goaway_code() is None


def test_blocks_using_the_dynamic_table_interleaved_with_static_ones_stay_in_step(
        peer: RawPeer) -> None:
    """hpack's encoder indexes the fields (h2 decodes them and fills its table), the
    static blocks come between, then the encoder refers to what it indexed: every stream
    reaches the pod, so the server's table is where the peer's encoder thinks it is."""
    encoder = hpack.Encoder()
    fields = [(":method", "CONNECT"), (":authority", peer.target),
              ("forwarded", "for=10.99.0.8"), ("x-trace", "abc")]
    sid = 1
    for n in range(4):
        _stream(peer, sid, encoder.encode(fields), b"indexed %d" % n)
        _stream(peer, sid + 2, _static_block(peer, 40100 + n), b"static %d" % n)
        sid += 4
    assert len(encoder.header_table.dynamic_entries) >= 3
    assert peer.goaway_code() is None


def test_a_size_update_is_h2s_and_static_blocks_after_it_still_serve(peer: RawPeer) -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = 0  # the next block starts with a size update to 0
    _stream(peer, 1, encoder.encode([(":method", "CONNECT"), (":authority", peer.target)]),
            b"after a size update")
    _stream(peer, 3, _static_block(peer), b"static after it")
    _stream(peer, 5, b"\x3f\xe1\x1f" + _static_block(peer), b"back to 4096")
    assert peer.goaway_code() is None


@pytest.mark.parametrize("block_of", [
    lambda p: b"\x3f\xe2\x1f" + _static_block(p),  # a table size above the maximum
    lambda p: _static_block(p) + b"\xbe",  # an index into an empty dynamic table
    lambda p: _static_block(p) + b"\x20",  # a size update after fields
    lambda p: _static_block(p, extra=b"\x00\x05x-cut\x09abc"),  # a value cut short
], ids=["size-above-max", "dynamic-index", "late-size-update", "truncated"])
def test_blocks_hpack_refuses_are_a_compression_error(peer: RawPeer, block_of) -> None:
    _send_block(peer, 1, block_of(peer))
    _refused(peer, COMPRESSION_ERROR)
    assert peer.status(1) is None


@pytest.mark.parametrize("extra", [
    literal("x-bad", "a\rb"), literal("X-Upper", "1"), literal("connection", "close"),
    literal(":path", "/"), b"\x00\x05x-bad\x02\xff\xfe",
], ids=["cr-in-value", "uppercase-name", "connection-header", "path-on-connect", "not-utf8"])
def test_blocks_with_fields_h2_refuses_are_a_protocol_error(peer: RawPeer,
                                                            extra: bytes) -> None:
    _send_block(peer, 1, _static_block(peer, extra=extra))
    _refused(peer, PROTOCOL_ERROR)
    assert peer.status(1) is None


def test_a_huge_block_is_refused_before_any_stream(peer: RawPeer) -> None:
    """A header list above the server's 60 KiB limit, in one frame: h2's answer."""
    _send_block(peer, 1, _static_block(peer, extra=literal("x-huge", "v" * 70_000)))
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.status(1) is None
    assert peer.goaway_code() in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR), peer.frames


@pytest.mark.parametrize("stream_id", [2, 1], ids=["even", "reused-lower"])
def test_a_static_block_on_a_stream_id_the_peer_may_not_use_is_a_protocol_error(
        peer: RawPeer, stream_id: int) -> None:
    _stream(peer, 3, _static_block(peer), b"first")
    _send_block(peer, stream_id, _static_block(peer))
    _refused(peer, PROTOCOL_ERROR)


def test_a_static_request_to_no_pod_of_this_node_is_404(peer: RawPeer) -> None:
    _send_block(peer, 1, _static_block(peer, target=f"10.200.0.9:{PORT}"))
    peer.read_until(lambda p: p.status(1) is not None)
    assert peer.status(1) == "404"
    _stream(peer, 3, _static_block(peer), b"still serving")


def test_a_declared_length_on_a_static_block_is_still_judged(peer: RawPeer) -> None:
    _send_block(peer, 1, _static_block(peer, extra=literal("content-length", "4")))
    peer.read_until(lambda p: p.status(1) is not None)
    assert peer.status(1) == "200"
    peer.send(peer.data(1, b"Pabc", end=True))
    _refused(peer, PROTOCOL_ERROR)


def test_resets_mid_stream_then_the_same_block_on_new_streams(peer: RawPeer) -> None:
    block = _static_block(peer)
    for sid in (1, 3, 5):
        _send_block(peer, sid, block)
        peer.read_until(lambda p, sid=sid: p.status(sid) is not None)
        peer.send(peer.data(sid, b"Pabc") + h2_frames.header(4, RST_STREAM, 0, sid)
                  + CANCEL.to_bytes(4, "big"))
    _stream(peer, 7, block, b"after the resets")
    _echo_round(peer, 9, b"and an h2-encoded one")
    assert peer.goaway_code() is None


def test_static_connects_reset_at_once_get_goaway(mesh, peer: RawPeer) -> None:
    """Rapid reset with the blocks the shortcut takes: the FrameGuard still counts every
    stream, so the premature-reset budget ends the connection, as with h2's blocks."""
    before = metric_sum(mesh.metrics("node1"), "nodeproxy_hbone_abuse_total",
                        reason="premature_resets")
    block = _static_block(peer)
    reset = CANCEL.to_bytes(4, "big")
    sid = 1
    deadline = time.monotonic() + 20
    while peer.goaway_code() is None and not peer.closed and sid < 8001 \
            and time.monotonic() < deadline:
        batch = b""
        for _ in range(100):
            batch += (h2_frames.header(len(block), h2_frames.HEADERS, h2_frames.END_HEADERS,
                                       sid) + block
                      + h2_frames.header(4, RST_STREAM, 0, sid) + reset)
            sid += 2
        try:
            peer.send(batch)
        except OSError:
            break
        peer.read_until(lambda p: p.goaway_code() is not None, seconds=0.05)
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == ENHANCE_YOUR_CALM, (sid, peer.frames[-3:])
    assert metric_sum(mesh.metrics("node1"), "nodeproxy_hbone_abuse_total",
                      reason="premature_resets") == before + 1

"""More ways a compromised peer node ends a CONNECT stream on node1's HBONE server, past
the server's END_STREAM shortcut (codec/h2_connection.py receive_end_stream): padded
frames carrying the end, padding that lies about its length, an end on stream 0, on an
even (server-initiated) id, far above any id seen, and after the peer's own GOAWAY.

Judged as tests/integration/test_hbone_stream_states.py judges (its mesh and raw peer):
the bytes the pod echoes back, the RST_STREAM or GOAWAY code the daemon sends, and the
tunnel still carrying a new stream where the refusal is a stream's.  The bugs these
would catch: a padded END_STREAM whose padding is delivered to the pod or whose end is
lost; bad padding taken as data; an end on a stream the peer does not own accepted or
answered with a stream error instead of h2's connection error."""

from __future__ import annotations

import pytest

from nodeproxy.codec import h2_frames
from tests.integration.test_hbone_stream_states import (
    GOAWAY,
    NO_ERROR,
    PROTOCOL_ERROR,
    RawPeer,
    _echo_round,
    _open,
    mesh,
    peer,
)

pytestmark = pytest.mark.privileged

__all__ = ["mesh", "peer"]  # the fixtures: one mesh for the module

PADDED = 0x8


def padded(stream_id: int, payload: bytes, pad: int, end: bool = True,
           declared: int | None = None) -> bytes:
    body = bytes([pad if declared is None else declared]) + payload + b"\x00" * pad
    flags = PADDED | (h2_frames.END_STREAM if end else 0)
    return h2_frames.header(len(body), h2_frames.DATA, flags, stream_id) + body


def test_padded_frames_carry_the_end_and_only_the_data(peer: RawPeer) -> None:
    _open(peer, 1)
    peer.send(padded(1, b"Phello", 7, end=False) + padded(1, b" world", 3))
    peer.read_until(lambda p: p.ended(1))
    assert peer.echoed(1) == b"hello world", peer.frames
    assert peer.reset_code(1) is None and peer.goaway_code() is None
    # the end alone in a padded frame with no data
    _open(peer, 3)
    peer.send(peer.data(3, b"Pbye") + padded(3, b"", 200))
    peer.read_until(lambda p: p.ended(3))
    assert peer.echoed(3) == b"bye" and peer.goaway_code() is None
    _echo_round(peer, 5, b"after")


@pytest.mark.parametrize("declared", [9, 10, 255], ids=["whole-frame", "past-frame", "255"])
def test_padding_longer_than_its_frame_is_a_connection_error_and_nothing_reaches_the_pod(
        peer: RawPeer, declared: int) -> None:
    _open(peer, 1)
    peer.send(peer.data(1, b"Pok") + padded(1, b"SMUGGLED", 0, declared=declared))
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == PROTOCOL_ERROR, peer.frames
    assert b"SMUGGLED" not in peer.echoed(1)


@pytest.mark.parametrize("stream_id", [0, 2, 0x7FFFFFFF])
def test_an_end_on_a_stream_the_peer_does_not_own_is_a_connection_error(
        peer: RawPeer, stream_id: int) -> None:
    _open(peer, 1)
    peer.send(peer.data(stream_id, b"", end=True))
    peer.read_until(lambda p: p.goaway_code() is not None or p.closed)
    assert peer.goaway_code() == PROTOCOL_ERROR, peer.frames


def test_an_end_after_the_peers_own_goaway_still_ends_its_open_stream(peer: RawPeer) -> None:
    """The peer announced it opens no more streams (GOAWAY NO_ERROR, last stream 0): its
    open stream still ends cleanly, bytes echoed."""
    _open(peer, 1)
    goaway = h2_frames.header(8, GOAWAY, 0, 0) + (0).to_bytes(4, "big") + \
        NO_ERROR.to_bytes(4, "big")
    peer.send(goaway + peer.data(1, b"Plast words", end=True))
    peer.read_until(lambda p: p.ended(1))
    assert peer.echoed(1) == b"last words", peer.frames
    assert peer.reset_code(1) is None

"""The HTTP/2 frame layout the proxy frames and parses itself, beside h2 (RFC 9113 §4.1,
§6.1, §6.9): DATA and WINDOW_UPDATE, and the empty DATA frame that tells h2 a stream ended.
The HBONE tunnel (tunnel/session.py) frames and parses both on established streams; the
L7 codec's connection (codec/h2_connection.py) frames the DATA it sends.

Pure: bytes in, numbers out (or a FrameError naming the HTTP/2 error code); the callers
keep the state.
"""

from __future__ import annotations

import struct

import h2.errors

DATA = 0x0
HEADERS = 0x1
PUSH_PROMISE = 0x5
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

END_STREAM = 0x1
END_HEADERS = 0x4
PADDED = 0x8

HEADER_LENGTH = 9
MAX_WINDOW = 2**31 - 1  # a flow-control window may never exceed this (§6.9.1)
_STREAM_MASK = 0x7FFFFFFF  # the reserved bit of a stream identifier is ignored

# length (24 bits, as 16 + 8), type, flags, stream identifier
_HEADER = struct.Struct(">HBBBL")
_INCREMENT = struct.Struct(">L")


class FrameError(Exception):
    """The peer broke a rule the connection cannot survive; `code` is the HTTP/2 error
    code the GOAWAY carries."""

    def __init__(self, code: h2.errors.ErrorCodes, message: str):
        super().__init__(message)
        self.code = code


# A frame header from its fields as _HEADER lays them out: pack_header(length >> 8,
# length & 0xFF, type, flags, stream id).  A C call: the tunnel's per-message DATA path
# uses it where data_header() would be a Python call around it.
pack_header = _HEADER.pack
# The header fields at an offset of a buffer: (length >> 8, length & 0xFF, type, flags,
# stream id with its reserved bit); the frame reader's per-frame unpacking, without a slice.
unpack_header_from = _HEADER.unpack_from


def header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id)


def parse_header(head: bytes) -> tuple[int, int, int, int]:
    """(payload length, type, flags, stream id) of a frame's first nine bytes."""
    high, low, frame_type, flags, stream_id = _HEADER.unpack(head)
    return (high << 8) | low, frame_type, flags, stream_id & _STREAM_MASK


def data_header(length: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, DATA, 0, stream_id)


def empty_data(stream_id: int, end_stream: bool) -> bytes:
    """A DATA frame without payload (with END_STREAM or not)."""
    return _HEADER.pack(0, 0, DATA, END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    return _HEADER.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + _INCREMENT.pack(increment)


def window_increment(payload: bytes) -> int:
    """A WINDOW_UPDATE's increment (0 is the caller's to judge: h2 answers it)."""
    if len(payload) != 4:
        raise FrameError(h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                         f"WINDOW_UPDATE of {len(payload)} bytes, not 4")
    return _INCREMENT.unpack(payload)[0] & _STREAM_MASK


def unpad(payload: bytes) -> memoryview:
    """The data of a PADDED DATA frame's payload (pad length byte and padding removed)."""
    if not payload:
        raise FrameError(h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                         "PADDED DATA frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise FrameError(h2.errors.ErrorCodes.PROTOCOL_ERROR,
                         f"DATA padding of {pad} bytes in a {len(payload)}-byte payload")
    return memoryview(payload)[1:len(payload) - pad]


def credit(window: int, increment: int) -> int:
    """The window after a WINDOW_UPDATE; past 2^31-1 is FLOW_CONTROL_ERROR."""
    window += increment
    if window > MAX_WINDOW:
        raise FrameError(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
                         f"a WINDOW_UPDATE took a flow-control window to {window}")
    return window


def consume(window: int, length: int, what: str) -> int:
    """The window after receiving `length` flow-controlled bytes; more than the window the
    peer was given is FLOW_CONTROL_ERROR."""
    if length > window:
        raise FrameError(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
                         f"a {length}-byte DATA frame overran the {what} window ({window})")
    return window - length

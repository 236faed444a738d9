"""h2's stream state transitions for a CONNECT stream's usual life, applied directly.

A short connection's CONNECT stream takes the same five steps on every connection: the
request HEADERS (sent by the source node, received by the destination), the 200, and
END_STREAM each way.  h2's ``H2StreamStateMachine.process_input`` finds each step in a
table keyed by (state, input) — two enum hashes, a Python-level ``Enum.__hash__`` each —
and calls a transition function that sets a flag or two and makes an event.  Each
function here makes exactly the change h2's table and transition function make
(h2/stream.py's ``_transitions``, ``request_sent``, ``request_received``,
``response_sent``, ``response_received``, ``data_received``, ``stream_half_closed``,
``stream_ended``, ``send_end_stream``) for the states that step is valid in and whose
outcome cannot be an error, and returns ``False`` (or ``None``) having changed nothing
in any other state: the caller then gives h2's ``process_input`` the input as before,
so an odd state gets h2's exact answer (its ProtocolError, its CLOSED).
tests/unit/test_h2_stream_steps.py plays every combination of a machine's state and
flags through both and requires the same machine and events.

``connection_open`` does the same for the connection's state machine: in
CLIENT_OPEN/SERVER_OPEN, SEND_HEADERS, RECV_HEADERS, SEND_DATA and RECV_DATA leave the
state as it is and call nothing (h2/connection.py's ``_transitions``).

Pure state changes: no frames, no I/O.
"""

from __future__ import annotations

import h2.connection
import h2.events
import h2.stream

_State = h2.stream.StreamState
_IDLE = _State.IDLE
_OPEN = _State.OPEN
_HALF_CLOSED_LOCAL = _State.HALF_CLOSED_LOCAL
_HALF_CLOSED_REMOTE = _State.HALF_CLOSED_REMOTE
_CLOSED = _State.CLOSED
_ClosedBy = h2.stream.StreamClosedBy
_CLIENT_OPEN = h2.connection.ConnectionState.CLIENT_OPEN
_SERVER_OPEN = h2.connection.ConnectionState.SERVER_OPEN

Machine = h2.stream.H2StreamStateMachine


def connection_open(machine: h2.connection.H2ConnectionStateMachine) -> bool:
    """Is the connection in a state where sending or receiving HEADERS or DATA changes
    nothing (h2: ``(CLIENT_OPEN|SERVER_OPEN, SEND_/RECV_HEADERS|DATA) -> (None, same)``)?"""
    state = machine.state
    return state is _CLIENT_OPEN or state is _SERVER_OPEN


def sent_request(machine: Machine) -> bool:
    """SEND_HEADERS on an idle stream: h2's ``request_sent`` (IDLE -> OPEN)."""
    if machine.state is not _IDLE:
        return False
    machine.state = _OPEN
    machine.client = True
    machine.headers_sent = True
    return True


def sent_response(machine: Machine) -> bool:
    """SEND_HEADERS of a server's response (not trailers) on an open or half-closed
    (remote) stream: h2's ``response_sent`` (state unchanged)."""
    state = machine.state
    if (state is not _OPEN and state is not _HALF_CLOSED_REMOTE) or machine.headers_sent \
            or machine.client is not False:
        return False
    machine.headers_sent = True
    return True


def sent_end_stream(machine: Machine) -> bool:
    """SEND_END_STREAM: OPEN -> HALF_CLOSED_LOCAL; HALF_CLOSED_REMOTE -> CLOSED (h2's
    ``send_end_stream``: closed by SEND_END_STREAM)."""
    state = machine.state
    if state is _OPEN:
        machine.state = _HALF_CLOSED_LOCAL
        return True
    if state is _HALF_CLOSED_REMOTE:
        machine.state = _CLOSED
        machine.stream_closed_by = _ClosedBy.SEND_END_STREAM
        return True
    return False


def received_request(machine: Machine) -> h2.events.RequestReceived | None:
    """RECV_HEADERS on an idle stream (a server's new request): h2's
    ``request_received`` (IDLE -> OPEN) and its event."""
    if machine.state is not _IDLE or machine.headers_received or machine.trailers_received:
        return None
    machine.state = _OPEN
    machine.client = False
    machine.headers_received = True
    return h2.events.RequestReceived(stream_id=machine.stream_id)


def received_response(machine: Machine) -> h2.events.ResponseReceived | None:
    """RECV_HEADERS of a client's first response on an open or half-closed (local)
    stream: h2's ``response_received`` (state unchanged) and its event."""
    state = machine.state
    if (state is not _OPEN and state is not _HALF_CLOSED_LOCAL) or machine.headers_received \
            or machine.client is not True:
        return None
    machine.headers_received = True
    return h2.events.ResponseReceived(stream_id=machine.stream_id)


def received_end_stream(machine: Machine) -> bool:
    """RECV_DATA then RECV_END_STREAM (an empty DATA frame with END_STREAM) after the
    stream's headers: h2's ``data_received`` (which only checks the headers came), then
    OPEN -> HALF_CLOSED_REMOTE (``stream_half_closed``) or HALF_CLOSED_LOCAL -> CLOSED
    (``stream_ended``: closed by RECV_END_STREAM).  Their DataReceived and StreamEnded
    events are the caller's to act on."""
    if not machine.headers_received:
        return False
    state = machine.state
    if state is _OPEN:
        machine.state = _HALF_CLOSED_REMOTE
        return True
    if state is _HALF_CLOSED_LOCAL:
        machine.state = _CLOSED
        machine.stream_closed_by = _ClosedBy.RECV_END_STREAM
        return True
    return False

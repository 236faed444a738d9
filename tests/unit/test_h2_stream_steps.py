"""codec/h2_stream_steps.py against h2's own state machines, every combination.

Each step is played on every stream state machine h2 can hold (every state, every value
of `client`, of the four header flags and of how it closed) and on a copy given the same
input(s) through h2's ``process_input``.  Where the step acts, the two machines must
end identical (every attribute) with the same event (type and stream id); where it
declines, the machine must be untouched.  Then a step must act where the tunnel needs it
(so the comparison is not of h2 with itself), and decline where h2 raises.  And the
connection's machine: ``connection_open`` is true exactly where h2's table maps the four
inputs to the same state with no function.

ProxyH2Connection's own ``_begin_new_stream`` and ``get_next_available_stream_id`` (h2's
without the debug log) are compared with h2's: the same stream (every attribute, its
state machine's and window manager's), the same highest ids, the same exceptions for ids
too low, of the wrong parity, or past the last one allowed.
"""

from __future__ import annotations

import copy
import itertools

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import pytest

from nodeproxy.codec import h2_stream_steps as steps
from nodeproxy.codec.h2_connection import ProxyH2Connection

S = h2.stream.StreamState
I = h2.stream.StreamInputs  # noqa: E741
FLAG_VALUES = (None, False, True)


def machines() -> list[h2.stream.H2StreamStateMachine]:
    out = []
    for state, client, hs, ts, hr, tr, closed_by in itertools.product(
            list(S), FLAG_VALUES, FLAG_VALUES[::2], FLAG_VALUES[::2], FLAG_VALUES[::2],
            FLAG_VALUES[::2], (None, *h2.stream.StreamClosedBy)):
        m = h2.stream.H2StreamStateMachine(7)
        m.state, m.client, m.headers_sent, m.trailers_sent = state, client, hs, ts
        m.headers_received, m.trailers_received, m.stream_closed_by = hr, tr, closed_by
        out.append(m)
    return out


MACHINES = machines()


def _h2(machine: h2.stream.H2StreamStateMachine, inputs: tuple) -> tuple:
    """h2's outcome: the machine after the inputs, the last input's events (or the
    exception's type)."""
    events: list | str = []
    for input_ in inputs:
        try:
            events = machine.process_input(input_)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as e:
            return vars(machine), type(e).__name__
    return vars(machine), [(type(e).__name__, getattr(e, "stream_id", None)) for e in events]


# (step, the inputs h2 is given for it, does the step return an event)
STEPS = [
    (steps.sent_request, (I.SEND_HEADERS,), False),
    (steps.sent_response, (I.SEND_HEADERS,), False),
    (steps.sent_end_stream, (I.SEND_END_STREAM,), False),
    (steps.received_request, (I.RECV_HEADERS,), True),
    (steps.received_response, (I.RECV_HEADERS,), True),
    (steps.received_end_stream, (I.RECV_DATA, I.RECV_END_STREAM), False),
]


@pytest.mark.parametrize(("step", "inputs", "evented"), STEPS,
                         ids=[s.__name__ for s, _, _ in STEPS])
def test_a_step_is_h2s_transition_or_changes_nothing(step, inputs, evented) -> None:
    acted = 0
    for machine in MACHINES:
        ours, theirs = copy.copy(machine), copy.copy(machine)
        before = dict(vars(ours))
        result = step(ours)
        if not result:
            assert result in (False, None)
            assert vars(ours) == before, (step.__name__, before)
            continue
        acted += 1
        state, events = _h2(theirs, inputs)
        assert events != "ProtocolError", (step.__name__, before, "h2 refuses this")
        assert vars(ours) == state, (step.__name__, before)
        if evented:
            # the last input's event is the one the step makes
            assert [(type(result).__name__, result.stream_id)] == events
        else:  # h2's events are internal markers or the caller's (StreamEnded)
            assert all(name.startswith("_") or name in ("StreamEnded",)
                       for name, _ in events), events
    assert acted, f"{step.__name__} never acts: nothing was compared"


def _fresh(state, **flags) -> h2.stream.H2StreamStateMachine:
    m = h2.stream.H2StreamStateMachine(1)
    m.state = state
    for name, value in flags.items():
        setattr(m, name, value)
    return m


def test_the_steps_act_on_the_connect_streams_life() -> None:
    client = _fresh(S.IDLE)
    assert steps.sent_request(client)
    assert isinstance(steps.received_response(client), h2.events.ResponseReceived)
    assert steps.sent_end_stream(client)
    assert steps.received_end_stream(client)
    assert client.state is S.CLOSED
    assert client.stream_closed_by is h2.stream.StreamClosedBy.RECV_END_STREAM
    server = _fresh(S.IDLE)
    assert isinstance(steps.received_request(server), h2.events.RequestReceived)
    assert steps.sent_response(server)
    assert steps.received_end_stream(server)
    assert steps.sent_end_stream(server)
    assert server.state is S.CLOSED
    assert server.stream_closed_by is h2.stream.StreamClosedBy.SEND_END_STREAM


@pytest.mark.parametrize(("step", "machine"), [
    (steps.sent_response, _fresh(S.OPEN, client=True)),  # a client's "response"
    (steps.sent_response, _fresh(S.OPEN, client=False, headers_sent=True)),  # trailers
    (steps.received_response, _fresh(S.OPEN, client=True, headers_received=True)),
    (steps.received_response, _fresh(S.HALF_CLOSED_REMOTE, client=True)),
    (steps.received_end_stream, _fresh(S.OPEN, client=True)),  # no headers yet
    (steps.received_end_stream, _fresh(S.HALF_CLOSED_REMOTE, headers_received=True)),
    (steps.sent_end_stream, _fresh(S.HALF_CLOSED_LOCAL)),
    (steps.sent_end_stream, _fresh(S.CLOSED)),
    (steps.sent_request, _fresh(S.OPEN, client=True)),
    (steps.received_request, _fresh(S.OPEN, client=False, headers_received=True)),
])
def test_a_step_declines_what_h2_refuses_or_must_decide(step, machine) -> None:
    before = dict(vars(machine))
    assert not step(machine)
    assert vars(machine) == before


def test_connection_open_is_exactly_where_h2_changes_nothing() -> None:
    C = h2.connection.ConnectionState
    inputs = [h2.connection.ConnectionInputs.SEND_HEADERS,
              h2.connection.ConnectionInputs.RECV_HEADERS,
              h2.connection.ConnectionInputs.SEND_DATA,
              h2.connection.ConnectionInputs.RECV_DATA]
    table = h2.connection.H2ConnectionStateMachine._transitions
    for state in C:
        machine = h2.connection.H2ConnectionStateMachine()
        machine.state = state
        unchanged = all(table.get((state, i)) == (None, state) for i in inputs)
        assert steps.connection_open(machine) == unchanged, state


def _stream_vars(stream: h2.stream.H2Stream) -> dict:
    out = dict(vars(stream))
    out["state_machine"] = vars(stream.state_machine)
    out["_inbound_window_manager"] = vars(stream._inbound_window_manager)
    del out["config"]  # each connection's own (checked in _outcome)
    return out


def _pair(client: bool) -> tuple[ProxyH2Connection, ProxyH2Connection]:
    ours = ProxyH2Connection(h2.config.H2Configuration(client_side=client), 65536)
    theirs = ProxyH2Connection(h2.config.H2Configuration(client_side=client), 65536)
    theirs._quiet = False  # h2's own methods (they only log more)
    for conn in (ours, theirs):  # settings in force (acknowledged), not h2's defaults
        conn.local_settings.initial_window_size = 1 << 20
        conn.remote_settings.initial_window_size = 12345
        conn.remote_settings.max_frame_size = 1 << 20
        conn.local_settings.acknowledge()
        conn.remote_settings.acknowledge()
        assert conn.remote_settings.initial_window_size == 12345
    assert ours._quiet
    return ours, theirs


def _outcome(conn: ProxyH2Connection, call) -> tuple:  # noqa: ANN001
    try:
        value = call(conn)
    except Exception as e:  # noqa: BLE001 - compared
        return type(e).__name__, str(e), conn.highest_outbound_stream_id, \
            conn.highest_inbound_stream_id, sorted(conn.streams)
    if isinstance(value, h2.stream.H2Stream):
        assert value.config is conn.config
        value = _stream_vars(value)
    return value, conn.highest_outbound_stream_id, conn.highest_inbound_stream_id, \
        {sid: _stream_vars(s) for sid, s in conn.streams.items()}


ODD, EVEN = h2.connection.AllowedStreamIDs.ODD, h2.connection.AllowedStreamIDs.EVEN


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize(("calls"), [
    [(1, ODD), (3, ODD), (9, ODD)],
    [(2, EVEN), (4, EVEN)],
    [(1, ODD), (1, ODD)],  # reused
    [(5, ODD), (3, ODD)],  # lower
    [(2, ODD)],  # the wrong parity
    [(1, EVEN)],
    [(2**31 - 1, ODD), (2**31 - 2, EVEN)],
], ids=["odd", "even", "reused", "lower", "parity-odd", "parity-even", "last"])
def test_begin_new_stream_is_h2s(client: bool, calls: list) -> None:
    ours, theirs = _pair(client)
    for stream_id, allowed in calls:
        mine = _outcome(ours, lambda c: c._begin_new_stream(stream_id, allowed))  # noqa: B023
        h2s = _outcome(theirs, lambda c: c._begin_new_stream(stream_id, allowed))  # noqa: B023
        assert mine == h2s


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("highest", [0, 1, 2, 7, 2**31 - 3, 2**31 - 2, 2**31 - 1])
def test_next_stream_id_is_h2s_up_to_exhaustion(client: bool, highest: int) -> None:
    ours, theirs = _pair(client)
    for conn in (ours, theirs):
        conn.highest_outbound_stream_id = highest
    assert _outcome(ours, lambda c: c.get_next_available_stream_id()) == \
        _outcome(theirs, lambda c: c.get_next_available_stream_id())


def test_the_unset_window_falls_back_to_h2s_keyerror() -> None:
    ours, theirs = _pair(True)
    for conn in (ours, theirs):
        conn.remote_settings._settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE][0] = None
    assert _outcome(ours, lambda c: c._begin_new_stream(1, ODD))[0] == "KeyError"
    assert _outcome(ours, lambda c: c._begin_new_stream(1, ODD)) == \
        _outcome(theirs, lambda c: c._begin_new_stream(1, ODD))

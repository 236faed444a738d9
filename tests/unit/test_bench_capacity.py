"""The capacity client's stop rule (nodeproxy_dev.bench.capacity.stop_reason): it stops at
the first failed connection, at a step that slowed past the factor against the earlier
steps' median, or at the cap."""

from __future__ import annotations

from nodeproxy_dev.bench.capacity import describe, slowdown, stop_reason


def test_goes_on_while_every_step_holds_at_the_first_steps_pace():
    assert stop_reason([1.0, 1.2, 3.9], 0, 3000, 60000, 4.0) is None


def test_a_failed_connection_stops_it_even_at_the_cap():
    assert stop_reason([1.0], 1, 60000, 60000, 4.0) == "refused"


def test_a_step_slower_than_the_factor_stops_it():
    assert stop_reason([1.0, 1.0, 1.2, 4.5], 0, 4000, 60000, 4.0) == "slowed"


def test_a_slow_first_step_is_outvoted_by_the_median():
    """A route's first step pays its warm-up; the later ones set the pace."""
    assert slowdown([10.0, 1.0, 1.0, 3.5]) == 3.5
    assert stop_reason([10.0, 1.0, 1.0, 4.5], 0, 4000, 60000, 4.0) == "slowed"


def test_errors_are_named_without_addresses():
    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True "
                          "reading=False 0x15230160>; the handler is closed")
    assert describe(closed) == "RuntimeError: the transport was closed"


def test_the_first_step_alone_is_never_slow():
    assert stop_reason([50.0], 0, 1000, 60000, 4.0) is None


def test_the_cap_stops_it():
    assert stop_reason([1.0, 1.0], 0, 2000, 2000, 4.0) == "cap"

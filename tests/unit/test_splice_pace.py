"""How often the splicer looks at a spliced flow (tcp/splicer.next_wait): at flow
control's pace while it moves, backing off to QUIET_MAX while it is quiet."""

from __future__ import annotations

from nodeproxy.tcp.splicer import CHECK_MAX, FLOW_TICK, QUIET_MAX, next_wait


def test_a_quiet_flow_backs_off_by_doubling_up_to_the_ceiling():
    waits, quiet_wait = [], CHECK_MAX
    for _ in range(10):
        wait, quiet_wait = next_wait(CHECK_MAX, quiet_wait, quiet=True)
        waits.append(wait)
    assert waits[:5] == [CHECK_MAX, 2 * CHECK_MAX, 4 * CHECK_MAX, 8 * CHECK_MAX,
                         16 * CHECK_MAX]
    assert max(waits) == QUIET_MAX and waits[-1] == QUIET_MAX
    assert waits == sorted(waits)


def test_a_flow_that_moved_goes_back_to_flow_controls_pace_at_once():
    wait, quiet_wait = next_wait(FLOW_TICK, QUIET_MAX, quiet=False)
    assert (wait, quiet_wait) == (FLOW_TICK, CHECK_MAX)
    # ... and backs off from CHECK_MAX again when it is quiet once more.
    assert next_wait(CHECK_MAX, quiet_wait, quiet=True) == (CHECK_MAX, 2 * CHECK_MAX)


def test_flow_control_is_never_slowed_below_what_it_asks_for_when_moving():
    for asked in (FLOW_TICK, 0.1, CHECK_MAX):
        assert next_wait(asked, 8.0, quiet=False)[0] == asked

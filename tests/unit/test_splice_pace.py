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


def test_a_flow_with_a_closed_side_is_not_offered_to_the_kernel_and_counted_ended():
    """A socket whose FIN the proxy has read is in CLOSE_WAIT, which the sockhash refuses:
    such a flow (a request, an answer, a close) is left to the relay, without a join."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from nodeproxy.tcp.relay import Relay, Side
    from nodeproxy.tcp.splicer import SpliceMetrics, Splicer

    class NoJoin:  # the kernel maps must not be touched
        def join(self, *args: object) -> None:
            raise AssertionError("a closing flow was offered to the kernel")

    async def main() -> None:
        registry = CollectorRegistry()
        splicer = Splicer(NoJoin(), SpliceMetrics(registry), enabled=True)  # type: ignore[arg-type]
        for closed in ("downstream", "upstream"):
            relay = Relay(Side("downstream"), Side("upstream"), lambda *_: None,
                          lambda _r: None)
            getattr(relay, closed).got_eof = True
            splicer.offer(relay, ("ns/a",))
            assert relay.splice is None
        assert registry.get_sample_value(
            "nodeproxy_splice_flows_total", {"event": "ended"}) == 2
    asyncio.run(main())


def test_a_relay_with_a_side_that_is_not_a_socket_gets_no_promotion():
    """With fastPath.spliceAfterBytes a relay of two sockets carries a Promotion until it
    has carried that many bytes; one with an HBONE stream on a side (no socket: the
    kernel has nothing to join) never could be spliced, so it carries none (it would
    hold one for its whole life, asleep too)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from nodeproxy.tcp.relay import Relay, Side
    from nodeproxy.tcp.splicer import Promotion, SpliceMetrics, Splicer

    class Transport:
        def __init__(self, sock: object | None) -> None:
            self.sock = sock

        def get_extra_info(self, name: str, default: object = None) -> object:
            return self.sock if name == "socket" else default

    class NoJoin:
        def join(self, *args: object) -> None:
            raise AssertionError("nothing is due yet")

    async def main() -> None:
        splicer = Splicer(NoJoin(), SpliceMetrics(CollectorRegistry()),  # type: ignore[arg-type]
                          enabled=True, after_bytes=65536)
        for down_sock, up_sock, promoted in ((object(), object(), True),
                                             (object(), None, False),
                                             (None, object(), False)):
            down, up = Side("downstream"), Side("upstream")
            down.transport = Transport(down_sock)  # type: ignore[assignment]
            up.transport = Transport(up_sock)  # type: ignore[assignment]
            relay = Relay(down, up, lambda *_: None, lambda _r: None)
            splicer.offer(relay, ("ns/a",))
            assert isinstance(relay.promotion, Promotion) is promoted
            assert relay.splice is None
    asyncio.run(main())

"""nodeproxy.log_limit.LogLimiter: a peer that causes a warning thousands of times a second
gets one line per kind per interval, and the next line says how many it stands for."""

from __future__ import annotations

import logging

import pytest

from nodeproxy.log_limit import MAX_KINDS, LogLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_per_interval_and_the_next_says_how_many_were_held(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("test.limit"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.limit"):
        written = [limiter.warn(("10.0.0.9", "flood"), "refused %s", i) for i in range(500)]
        assert limiter.warn(("10.0.0.8", "flood"), "refused %s", "other")  # its own kind
        clock.now += 9.9
        assert not limiter.warn(("10.0.0.9", "flood"), "refused %s", "late")
        clock.now += 0.1
        assert limiter.warn(("10.0.0.9", "flood"), "refused %s", "again")
        clock.now += 10.0
        assert limiter.warn(("10.0.0.9", "flood"), "refused %s", "quiet")
    assert written == [True] + [False] * 499
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused other", "refused again (500 more since the last warning)",
        "refused quiet"]


def test_kinds_that_name_peers_cannot_pile_up() -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("test.limit"), clock=clock)
    for peer in range(3 * MAX_KINDS):
        limiter.warn(peer, "refused %s", peer)
        assert len(limiter._last) <= MAX_KINDS and len(limiter._held) <= MAX_KINDS

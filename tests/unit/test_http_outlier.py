"""Outlier detection (nodeproxy/http/outlier.py) on a fake clock and a manual timer:
which results eject, when endpoints return, the ejection cap and the last-healthy rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from nodeproxy.config.model import OutlierDetection
from nodeproxy.http.outlier import OutlierDetector


@dataclass(frozen=True)
class Ep:
    key: str


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Timer:
    """A manual scheduler: the test fires the pending callback when it wants."""

    pending: list[tuple[float, Callable[[], None]]] = field(default_factory=list)

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        self.pending.append((delay, callback))
        return self

    def cancel(self) -> None:
        self.pending.clear()

    def fire(self) -> None:
        assert len(self.pending) == 1, self.pending
        _, callback = self.pending.pop()
        callback()


@dataclass
class Events:
    ejected_list: list[str] = field(default_factory=list)
    returned_list: list[str] = field(default_factory=list)
    skipped_list: list[str] = field(default_factory=list)
    gauge: dict[int, int] = field(default_factory=dict)

    def ejected(self, service: str, endpoint: str) -> None:
        self.ejected_list.append(endpoint)

    def returned(self, service: str, endpoint: str) -> None:
        self.returned_list.append(endpoint)

    def skipped(self, service: str, reason: str) -> None:
        self.skipped_list.append(reason)

    def ejected_now(self, service: str, cluster: int, count: int) -> None:
        self.gauge[cluster] = count


def detector(n: int = 4, **cfg: object) -> tuple[OutlierDetector[Ep], Clock, Timer, Events]:
    clock, timer, events = Clock(), Timer(), Events()
    d: OutlierDetector[Ep] = OutlierDetector(
        OutlierDetection.model_validate(cfg), service="svc", events=events, clock=clock,
        scheduler=timer)  # type: ignore[arg-type]
    d.attach([Ep(f"e{i}") for i in range(n)])
    return d, clock, timer, events


def keys(d: OutlierDetector[Ep]) -> list[str]:
    return [e.key for e in d.available]


def test_defaults_are_envoys() -> None:
    cfg = OutlierDetection()
    assert (cfg.consecutive_5xx_errors, cfg.consecutive_gateway_errors, cfg.interval_seconds,
            cfg.base_ejection_time_seconds, cfg.max_ejection_percent,
            cfg.allow_last_healthy_ejection) == (5, 5, 10.0, 30.0, 10.0, False)


def test_ejected_after_exactly_the_consecutive_5xx_count() -> None:
    d, _, timer, events = detector(consecutive5xxErrors=3, consecutiveGatewayErrors=0)
    d.record("e0", 500)
    d.record("e0", 500)
    assert keys(d) == ["e0", "e1", "e2", "e3"] and not timer.pending
    d.record("e0", 500)
    assert keys(d) == ["e1", "e2", "e3"]
    assert events.ejected_list == ["e0"]
    assert d.health("e0").ejections == 1  # type: ignore[union-attr]
    assert len(timer.pending) == 1  # the interval timer runs only now


def test_a_success_resets_the_count() -> None:
    d, *_ = detector(consecutive5xxErrors=3, consecutiveGatewayErrors=0)
    for status in (500, 500, 200, 500, 500, 404, 500, 500):
        d.record("e0", status)
    assert keys(d) == ["e0", "e1", "e2", "e3"]


def test_gateway_errors_and_no_response_count_as_gateway_errors() -> None:
    d, *_ = detector(consecutive5xxErrors=0, consecutiveGatewayErrors=3)
    for status in (502, None, 500, 503, 504):  # 500 is not a gateway error: resets
        d.record("e0", status)
    assert "e0" in keys(d)
    d.record("e0", None)
    assert "e0" not in keys(d)


def test_zero_turns_both_checks_off() -> None:
    d, *_ = detector(consecutive5xxErrors=0, consecutiveGatewayErrors=0)
    for _ in range(100):
        d.record("e0", 503)
    assert len(keys(d)) == 4


def test_returns_after_the_ejection_time_at_the_interval() -> None:
    d, clock, timer, events = detector(consecutive5xxErrors=1, intervalSeconds=0.5,
                                       baseEjectionTimeSeconds=2)
    d.record("e1", 500)
    assert timer.pending[0][0] == 0.5
    view = d.endpoint_view("e1")
    assert view["ejected"] is True and view["ejection_remaining_seconds"] == 2.0
    clock.now += 1.9
    timer.fire()
    assert "e1" not in keys(d) and events.returned_list == []
    clock.now += 0.1
    timer.fire()
    assert keys(d) == ["e0", "e1", "e2", "e3"] and events.returned_list == ["e1"]


def test_ejection_time_grows_with_the_multiplier_and_decays_while_healthy() -> None:
    d, clock, timer, _ = detector(consecutive5xxErrors=1, intervalSeconds=1,
                                  baseEjectionTimeSeconds=10)
    d.record("e0", 500)
    clock.now += 10
    timer.fire()  # returns; multiplier stays 1
    clock.now += 9
    timer.fire()  # back for less than the base time: still 1
    d.record("e0", 500)  # ejected again soon: 2 x 10 s
    assert d.endpoint_view("e0")["ejection_remaining_seconds"] == 20.0
    clock.now += 20
    timer.fire()
    assert "e0" in keys(d) and d.health("e0").multiplier == 2  # type: ignore[union-attr]
    clock.now += 9.5
    timer.fire()
    assert d.health("e0").multiplier == 2  # type: ignore[union-attr]
    clock.now += 0.5
    timer.fire()  # a base time back in: lowered by one
    assert d.health("e0").multiplier == 1  # type: ignore[union-attr]
    clock.now += 5
    timer.fire()
    assert d.health("e0").multiplier == 1  # type: ignore[union-attr]
    clock.now += 5
    timer.fire()
    assert d.health("e0").multiplier == 0  # type: ignore[union-attr]
    assert not timer.pending  # nothing left to watch: the timer stops
    d.record("e0", 500)
    assert d.endpoint_view("e0")["ejection_remaining_seconds"] == 10.0
    assert d.health("e0").ejections == 3  # type: ignore[union-attr]


def test_ejection_time_is_capped_at_300_s() -> None:
    d, clock, timer, _ = detector(consecutive5xxErrors=1, intervalSeconds=1000,
                                  baseEjectionTimeSeconds=200)
    d.record("e0", 500)
    clock.now += 200
    timer.fire()
    d.record("e0", 500)
    assert d.endpoint_view("e0")["ejection_remaining_seconds"] == 300.0


def test_max_ejection_percent_caps_but_one_is_always_allowed() -> None:
    d, _, _, events = detector(n=4, consecutive5xxErrors=1)  # 10% of 4: 0, so 1
    d.record("e0", 500)
    d.record("e1", 500)
    assert keys(d) == ["e1", "e2", "e3"]
    assert events.skipped_list == ["max_ejection_percent"]


@pytest.mark.parametrize("n,percent,expected", [(10, 30, 3), (4, 50, 2), (3, 100, 2),
                                                (10, 10, 1), (5, 0, 1)])
def test_the_cap_rounds_down(n: int, percent: float, expected: int) -> None:
    d, *_ = detector(n=n, consecutive5xxErrors=1, maxEjectionPercent=percent)
    for i in range(n):
        d.record(f"e{i}", 503)
    assert n - len(keys(d)) == expected


def test_the_last_healthy_endpoint_is_never_ejected() -> None:
    d, _, _, events = detector(n=1, consecutive5xxErrors=1, maxEjectionPercent=100)
    d.record("e0", 500)
    assert keys(d) == ["e0"] and events.skipped_list == ["last_healthy"]


def test_the_last_one_may_go_if_allowed() -> None:
    d, *_ = detector(n=2, consecutive5xxErrors=1, maxEjectionPercent=100,
                     allowLastHealthyEjection=True)
    d.record("e0", 500)
    d.record("e1", 500)
    assert keys(d) == []


def test_a_refused_ejection_happens_once_the_cap_frees() -> None:
    d, clock, timer, events = detector(n=2, consecutive5xxErrors=2, intervalSeconds=1,
                                       baseEjectionTimeSeconds=1)
    for _ in range(2):
        d.record("e0", 500)
        d.record("e1", 500)
    assert keys(d) == ["e1"]
    clock.now += 1
    timer.fire()
    d.record("e1", 500)  # still past its threshold: ejected now that e0 is back
    assert keys(d) == ["e0"]
    assert events.ejected_list == ["e0", "e1"] and events.returned_list == ["e0"]


def test_state_survives_attach_and_forgets_removed_endpoints() -> None:
    d, _, _, events = detector(n=3, consecutive5xxErrors=2, maxEjectionPercent=100)
    d.record("e0", 500)
    d.record("e0", 500)
    d.record("e1", 500)
    d.attach([Ep("e0"), Ep("e1"), Ep("e9")])
    assert keys(d) == ["e1", "e9"]
    assert d.health("e1").consecutive_5xx == 1  # type: ignore[union-attr]
    assert d.health("e2") is None
    assert list(events.gauge.values()) == [1]
    d.close()
    assert list(events.gauge.values()) == [0]

"""The sustained-connect scenario's arithmetic: the peer's cumulative progress lines become a
rate per window, and the lowest window is judged against the median one."""

from __future__ import annotations

import json

import pytest

from nodeproxy_dev.bench import connections
from nodeproxy_dev.bench.scenarios import SustainedConnect
from nodeproxy_dev.bench.settings import FULL, QUICK
from nodeproxy_dev.bench.vocabulary import MeasurementError, NetPath


def test_rates_are_taken_per_window_between_cumulative_counts():
    points = [(5.0, 5000.0), (10.0, 10000.0), (15.0, 11000.0), (20.1, 16100.0)]
    assert connections.window_rates(points, 5.0) == pytest.approx([1000, 1000, 200, 1000])


def test_a_short_last_window_is_left_out_and_order_does_not_matter():
    points = [(10.0, 2000.0), (5.0, 1000.0), (11.0, 2100.0)]  # the last span is 1 s of 5
    assert connections.window_rates(points, 5.0) == pytest.approx([200, 200])
    assert connections.window_rates([], 5.0) == []


def test_a_cliff_shows_as_a_low_lowest_window():
    steady = connections.steadiness([1000, 980, 1010, 990])
    assert steady["median_per_s"] == pytest.approx(995)
    assert steady["lowest_ratio"] == pytest.approx(980 / 995)
    assert steady["held_ratio"] == pytest.approx(990 / 1000)
    cliff = connections.steadiness([1200, 1150, 600, 300])
    assert cliff["lowest_ratio"] == pytest.approx(300 / 875)
    # The run of the old dial: 615 conn/s at first, ~110 after 15 s; the median window is
    # already the fallen rate, so only the first third against the last shows the cliff.
    before = connections.steadiness([615.5, 522.8, 340.4, 136.5, 189.9, 94.3, 147.6, 109.5,
                                     151.4, 100.6, 79.0, 115.7])
    assert before["held_ratio"] == pytest.approx(108.1 / 431.6, rel=0.01)
    assert before["lowest_ratio"] > 0.5
    with pytest.raises(MeasurementError):
        connections.steadiness([])


def test_progress_lines_are_read_from_the_peers_output():
    lines = [json.dumps({"elapsed_s": 5.0, "progress": True, "succeeded": 10}, sort_keys=True),
             "not json", "{broken",
             json.dumps({"elapsed_s": 10.0, "progress": True, "succeeded": 30}, sort_keys=True),
             json.dumps({"elapsed_s": 12.0, "ok": True, "succeeded": 40}, sort_keys=True)]
    assert connections.progress_points("\n".join(lines)) == [(5.0, 10.0), (10.0, 30.0)]


def test_the_full_profile_holds_a_minute_in_five_second_windows():
    assert FULL.sustained_seconds >= 60 and FULL.sustained_window == 5
    assert QUICK.sustained_seconds < FULL.sustained_seconds
    scenario = SustainedConnect(NetPath.SAME_NODE, FULL)
    assert scenario.once and scenario.name == "sustained connect same-node"
    assert [m.key for m in scenario.metrics] == [
        "sustained.same-node.rate", "sustained.same-node.held", "sustained.same-node.lowest",
        "sustained.same-node.failed"]

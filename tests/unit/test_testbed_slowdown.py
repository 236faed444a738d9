"""NODEPROXY_TESTBED_SLOWDOWN: the one knob that stretches the testbed's wait bounds (the
emulated VM of `make vm-test` sets it); a bad value is an error, not a silent 1."""

from __future__ import annotations

import pytest

from nodeproxy_dev.testbed import cluster
from nodeproxy_dev.testbed.cluster import scaled


def test_unset_leaves_every_bound_as_written(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NODEPROXY_TESTBED_SLOWDOWN", raising=False)
    assert cluster.testbed_slowdown() == 1
    assert scaled(10.0) == 10.0


def test_a_slowdown_multiplies_each_bound(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NODEPROXY_TESTBED_SLOWDOWN", "5")
    assert scaled(10.0) == 50.0
    assert scaled(0.5) == 2.5


@pytest.mark.parametrize("raw", ["fast", "0.5", "0", "-3", "nan", ""])
def test_a_value_that_would_shorten_or_is_no_number_is_refused(
        monkeypatch: pytest.MonkeyPatch, raw: str):
    monkeypatch.setenv("NODEPROXY_TESTBED_SLOWDOWN", raw)
    with pytest.raises(ValueError, match="NODEPROXY_TESTBED_SLOWDOWN"):
        scaled(1.0)

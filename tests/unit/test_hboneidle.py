"""hboneidle (nodeproxy_dev/bench/hboneidle.py): the profile of idle cross-node flows
counts every relay of its flows asleep (both ends) and prints each end's objects; a
flow whose relay never slept would show in the count."""

from __future__ import annotations

import pytest

from nodeproxy.tcp import relay_sleep
from nodeproxy_dev.bench import hboneidle


def test_every_flow_sleeps_at_both_ends_and_each_end_is_reported(
        capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_sleep, "QUIET_SECONDS", 0.05)
    assert hboneidle.main(["--flows", "20", "--settle", "2.5", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "(42 relays asleep of 42)" in out, out
    assert "source node (node0)" in out and "destination node (node1)" in out, out
    assert "h2 H2Stream" in out and "[shared]" in out, out

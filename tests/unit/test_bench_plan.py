"""The benchmark's order of measurements: configurations that need other daemon settings
(a restart) are measured as blocks, which swap order every other round."""

from __future__ import annotations

from nodeproxy.bench.configurations import CONFIGURATIONS
from nodeproxy.bench.settings import QUICK
from nodeproxy.bench.suite import Suite


def names(blocks) -> list[list[str]]:
    return [[c.name for c in block] for block in blocks]


def test_iptables_capture_is_a_block_of_its_own_and_the_blocks_alternate():
    suite = Suite(QUICK, CONFIGURATIONS, log=lambda _message: None)
    first = [["direct", "nodeproxy", "haproxy"], ["nodeproxy-iptables"]]
    assert names(suite.blocks(1)) == first
    assert names(suite.blocks(2)) == first[::-1]
    assert names(suite.blocks(3)) == first
    # Every runnable configuration is measured once per round.
    assert sorted(c.name for block in suite.blocks(2) for c in block) == sorted(
        c.name for c in suite.runnable)
    iptables = next(c for c in CONFIGURATIONS if c.name == "nodeproxy-iptables")
    assert iptables.daemon_overrides() == {"capture": {"mode": "iptables"}}
    assert iptables.capture_mode == "iptables"
    assert next(c for c in CONFIGURATIONS if c.name == "nodeproxy").capture_mode == "ebpf"

"""The benchmark's order of measurements: configurations that need other daemon settings
(a restart) are measured as blocks, which swap order every other round."""

from __future__ import annotations

from nodeproxy.bench import stats
from nodeproxy.bench.configurations import CONFIGURATIONS
from nodeproxy.bench.model import Cell
from nodeproxy.bench.settings import QUICK
from nodeproxy.bench.suite import Suite


def names(blocks) -> list[list[str]]:
    return [[c.name for c in block] for block in blocks]


def test_iptables_capture_is_a_block_of_its_own_and_the_blocks_alternate():
    suite = Suite(QUICK, CONFIGURATIONS, log=lambda _message: None)
    # direct is measured in each block, so every ratio pairs figures taken close together.
    first = [["direct", "nodeproxy-splice", "haproxy", "nodeproxy-nosplice"],
             ["direct", "nodeproxy-iptables"]]
    assert names(suite.blocks(1)) == first
    assert names(suite.blocks(2)) == first[::-1]
    assert names(suite.blocks(3)) == first
    # Every runnable configuration is measured in every round.
    assert {c.name for block in suite.blocks(2) for c in block} == {
        c.name for c in suite.runnable}
    iptables = next(c for c in CONFIGURATIONS if c.name == "nodeproxy-iptables")
    # The same userspace pump as nodeproxy-nosplice, only the capture differs.
    assert iptables.daemon_overrides() == {"capture": {"mode": "iptables"},
                                           "fastPath": {"splice": False}}
    assert iptables.capture_mode == "iptables"
    assert next(c for c in CONFIGURATIONS
                if c.name == "nodeproxy-nosplice").capture_mode == "ebpf"


def test_ratios_pair_with_the_baseline_of_the_same_block():
    direct, iptables = Cell(), Cell()
    direct.add(10.0, 1, 0)
    direct.add(20.0, 1, 1)  # the machine changed state between the blocks
    direct.add(10.0, 2, 0)
    iptables.add(40.0, 1, 1)
    iptables.add(30.0, 2, 1)  # no direct in that block: the round's first direct sample
    assert stats.paired_ratios(iptables, direct) == [2.0, 3.0]
    assert stats.ratio_to_baseline(iptables, direct) == 2.5

"""The attacker's CPU limit: the quota arithmetic, and that nothing is pretended where the
machine has no cgroup v1 cpu hierarchy (the real limit is checked in
tests/integration/test_bench_cpulimit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeproxy_dev.bench import cpulimit


def test_quota_per_period() -> None:
    assert cpulimit.quota_us(0.5) == 50_000
    assert cpulimit.quota_us(2) == 200_000
    assert cpulimit.quota_us(0.001) == 1000  # the kernel's minimum
    with pytest.raises(ValueError):
        cpulimit.quota_us(0)


def test_without_a_v1_cpu_hierarchy_nothing_is_limited_and_it_says_why(tmp_path: Path) -> None:
    with cpulimit.CpuLimit("x", 0.5, root=str(tmp_path)) as limit:
        assert not limit.active
        assert "no cgroup v1 cpu hierarchy" in (limit.reason or "")
        assert limit.wrap(["true"]) == ["true"]
        assert limit.stat() == {}
    assert not (tmp_path / "x").exists()

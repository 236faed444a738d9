"""The noisy-neighbour attacker's CPU limit, for real: a process started through it runs
in the v1 cpu cgroup with the quota, keeps its other cgroups, and the cgroup is gone
afterwards."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from nodeproxy_dev.bench import cpulimit

pytestmark = pytest.mark.privileged


@pytest.mark.skipif(not os.path.exists(os.path.join(cpulimit.V1_CPU, "cpu.cfs_quota_us")),
                    reason="no cgroup v1 cpu hierarchy on this machine")
def test_a_wrapped_process_runs_under_the_quota_and_the_cgroup_is_removed() -> None:
    name = f"npt-cpulimit-{uuid.uuid4().hex[:8]}"
    own = Path("/proc/self/cgroup").read_text()
    with cpulimit.CpuLimit(name, 0.25) as limit:
        assert limit.active, limit.reason
        path = os.path.join(cpulimit.V1_CPU, name)
        assert Path(path, "cpu.cfs_quota_us").read_text().strip() == "25000"
        # A busy loop of 0.5 s wall time under a quarter core: throttled.
        result = subprocess.run(limit.wrap(["sh", "-c", "cat /proc/self/cgroup; "
                                            "end=$(($(date +%s%N) + 500000000)); "
                                            "while [ $(date +%s%N) -lt $end ]; do :; done"]),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert any(line.endswith(f":/{name}") and "cpu" in line.split(":")[1]
                   for line in lines), lines
        # The other hierarchies (the pod's v2 cgroup among them) are untouched.
        unified = [line for line in lines if line.startswith("0::")]
        assert unified == [line for line in own.splitlines() if line.startswith("0::")]
        assert limit.stat()["nr_throttled"] > 0
    assert not os.path.exists(os.path.join(cpulimit.V1_CPU, name))

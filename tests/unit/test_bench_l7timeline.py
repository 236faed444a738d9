"""l7timeline's call counts: per request, from a real cProfile dump."""

from __future__ import annotations

import cProfile
from pathlib import Path

from nodeproxy_dev.bench import l7timeline


def handled(n: int) -> int:
    return n + 1


def test_calls_per_request_are_the_profiles_counts_divided(tmp_path: Path) -> None:
    profile = cProfile.Profile()
    profile.enable()
    for i in range(300):
        handled(i)
        handled(i)
    profile.disable()
    dump = tmp_path / "calls.prof"
    profile.dump_stats(str(dump))
    text = l7timeline.calls_summary(dump, requests=300)
    line = next(line for line in text.splitlines() if "handled" in line)
    assert float(line.split()[0]) == 2.0

"""gcwatch: the collector's pauses in a daemon started under its hook are counted by
generation, only in processes that are daemons, and read back over a time window."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from nodeproxy_dev.bench import gcwatch
from nodeproxy_dev.bench.daemon_hook import startup_hook

# Collections the child makes itself: three of generation 2, two of generation 1.
CHILD = ("import gc, time\n"
         "for g in (2, 2, 2, 1, 1):\n"
         "    gc.collect(g)\n"
         "time.sleep(0.8)\n")


def run_child(tmp_path: Path, *argv: str) -> None:
    with startup_hook(tmp_path, gcwatch.SITECUSTOMIZE, gcwatch.VARIABLE, str(tmp_path)):
        subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, timeout=30)


def test_a_daemons_collections_are_counted_by_generation(tmp_path: Path) -> None:
    began = time.time()
    run_child(tmp_path, "nodeproxy", "run")  # argv the hook takes for a daemon's
    files = list(tmp_path.glob("gc-*.tsv"))
    assert len(files) == 1
    figures = gcwatch.read(files[0])
    assert figures["count"][2] >= 3 and figures["count"][1] >= 2
    assert figures["total_s"][2] > 0
    assert sum(figures["hist2"]) == figures["count"][2]
    assert "gen2:" in gcwatch.report(tmp_path)
    # A window before the child started holds nothing of it.
    early = gcwatch.read(files[0], (began - 100, began - 50))
    assert early["count"] == [0.0, 0.0, 0.0]


def test_other_processes_ignore_the_hook(tmp_path: Path) -> None:
    run_child(tmp_path)
    assert not list(tmp_path.glob("gc-*.tsv"))

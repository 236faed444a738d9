"""Reading what the profilers print, for the project's profile scripts (connprofile,
hboneprofile, l7profile): where py-spy is, the rate they sample at, each function's
inclusive share of py-spy's folded stacks, ``perf report``'s self-time shares, and the
system call counts of ``strace -c``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

SAMPLE_RATE = 200  # py-spy samples per second
TOP = 18
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def py_spy() -> str:
    """The py-spy executable: on PATH, or beside this interpreter (the venv's)."""
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy (the profile extra)")
    return found


def folded_shares(raw: str, expected: float, top: int = TOP) -> dict[str, Any]:
    """From py-spy's folded stacks (``frame;frame;... count`` per line; py-spy leaves out
    the samples of an idle thread, the loop waiting in epoll): the busy samples, their share
    of the ``expected`` ones (rate x seconds), and each function's inclusive share of them."""
    busy = 0
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        busy += count
        for name in dict.fromkeys(_function(f) for f in stack.split(";")):
            inclusive[name] += count
    return {"samples": busy, "busy_share": busy / expected if expected else 0.0,
            "top": [(name, round(n / busy, 4)) for name, n in inclusive.most_common(top)]
            if busy else []}


def _function(frame: str) -> str:
    """'run_forever (asyncio/base_events.py:608)' -> 'run_forever (asyncio/base_events.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def strace_counts(text: str) -> dict[str, int]:
    """System calls by name from ``strace -c``'s table."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        row = _STRACE_ROW.match(line)
        if row and row.group(2) != "total":
            counts[row.group(2)] = int(row.group(1))
    return counts


def perf_shares(data: Path, sort: str, percent_limit: float, top: int
                ) -> list[tuple[str, float]]:
    """``perf report``'s self-time shares of a recording (``sort``: "dso", "dso,sym"), the
    rows at or over ``percent_limit`` %, at most ``top`` of them."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
         "-g", "none", "--percent-limit", str(percent_limit)], capture_output=True,
        text=True, timeout=300, check=False).stdout
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%") and not line.startswith("#"):
            rows.append((" ".join(parts[1:]), float(parts[0].rstrip("%"))))
    return rows[:top]


def perf_around(pids: dict[str, int], out: Path, seconds: int, run: Callable[[], int], *,
                tag: str = "", hertz: int = 499, percent_limit: float = 0.5,
                top: int = 60) -> dict[str, Any]:
    """``perf record -g`` at ``hertz`` on every named process (a daemon per node) around
    ``run`` (a load of about ``seconds``, returning its requests): each one's self shares
    by shared object and by symbol (perf_shares), and the requests."""
    prefix = f"{tag}." if tag else ""
    recorders = {name: subprocess.Popen(
        ["timeout", str(seconds + 30), "perf", "record", "-F", str(hertz), "-g", "-p",
         str(pid), "-o", str(out / f"{prefix}{name}.perf.data"), "--", "sleep",
         str(max(seconds - 1, 1))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()}
    done = run()
    for recorder in recorders.values():
        recorder.wait(timeout=seconds + 60)
    result: dict[str, Any] = {"requests": done}
    for name in pids:
        data = out / f"{prefix}{name}.perf.data"
        result[name] = {sort: perf_shares(data, sort, percent_limit, top)
                        for sort in ("dso", "dso,sym")}
    return result

"""The cyclic garbage collector's pauses inside the daemons a command starts: how often
each generation runs and how long the event loop stands still for it.

``python -m nodeproxy_dev.bench.gcwatch OUT -- COMMAND...`` (root where COMMAND needs
it) runs COMMAND (``nodeproxy bench ...``, ``python -m nodeproxy_dev.bench.l7profile
...``) with a ``sitecustomize`` (daemon_hook.py) that, in every nodeproxy daemon it
starts, adds a ``gc.callbacks`` entry timing each collection by generation, and a thread
that every ``INTERVAL`` seconds appends the cumulative figures to ``OUT/gc-<pid>.tsv``
(one line: wall time, then per generation the collections, their total and longest
pause in seconds, and the objects collected; a line only when something changed).
At the end it prints per daemon the totals and the pauses' distribution.
``--window START,END`` (wall-clock seconds) reads the figures of that time only.
A development aid: the hook costs two ``perf_counter`` calls per collection.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from nodeproxy_dev.bench.daemon_hook import DAEMON_CHECK, startup_hook

VARIABLE = "NODEPROXY_GCWATCH_DIR"
INTERVAL = 0.25
# Pauses are histogrammed at these bounds (seconds).
BOUNDS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)

SITECUSTOMIZE = DAEMON_CHECK + r'''
if os.environ.get("NODEPROXY_GCWATCH_DIR") and _nodeproxy_daemon():
    import gc, threading, time
    _BOUNDS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
    _count = [0, 0, 0]
    _total = [0.0, 0.0, 0.0]
    _longest = [0.0, 0.0, 0.0]
    _collected = [0, 0, 0]
    _hist = [[0] * (len(_BOUNDS) + 1) for _ in range(3)]
    _began = [0.0]
    _clock = time.perf_counter
    def _timed(phase, info):
        if phase == "start":
            _began[0] = _clock()
            return
        pause = _clock() - _began[0]
        g = info["generation"]
        _count[g] += 1
        _total[g] += pause
        if pause > _longest[g]:
            _longest[g] = pause
        _collected[g] += info["collected"]
        i = 0
        while i < len(_BOUNDS) and pause > _BOUNDS[i]:
            i += 1
        _hist[g][i] += 1
    gc.callbacks.append(_timed)
    def _writer():
        path = os.path.join(os.environ["NODEPROXY_GCWATCH_DIR"], f"gc-{os.getpid()}.tsv")
        last = None
        while True:
            time.sleep(0.25)
            row = [*_count, *_total, *_longest, *_collected,
                   *(n for h in _hist for n in h)]
            if row != last:
                last = row
                with open(path, "a") as f:
                    f.write("\t".join([f"{time.time():.3f}"] + [str(v) for v in row]) + "\n")
    threading.Thread(target=_writer, name="gcwatch", daemon=True).start()
'''

GENERATIONS = 3


def read(path: Path, window: tuple[float, float] | None = None) -> dict[str, list[float]]:
    """The figures of one daemon's file: per generation the collections, total and
    longest pause (s), objects collected and the pause histogram, over the window (the
    difference between the last line before it and the last line within it; the
    longest pause is the whole run's)."""
    rows = [[float(v) for v in line.split("\t")] for line in path.read_text().splitlines()
            if line.strip()]
    if not rows:
        return {}
    start = [0.0] * len(rows[0])
    end = rows[-1]
    if window is not None:
        before = [r for r in rows if r[0] < window[0]]
        within = [r for r in rows if window[0] <= r[0] <= window[1]]
        start = before[-1] if before else start
        end = within[-1] if within else start
    delta = [e - s for s, e in zip(start, end, strict=True)][1:]
    g = GENERATIONS
    hist = delta[4 * g:]
    width = len(BOUNDS) + 1
    return {"count": delta[0:g], "total_s": delta[g:2 * g], "longest_s": end[1 + 2 * g:1 + 3 * g],
            "collected": delta[3 * g:4 * g],
            **{f"hist{i}": hist[i * width:(i + 1) * width] for i in range(g)}}


def report(directory: Path, window: tuple[float, float] | None = None) -> str:
    """One paragraph per daemon file in `directory`."""
    labels = [f"<={b * 1000:g}ms" for b in BOUNDS] + [f">{BOUNDS[-1] * 1000:g}ms"]
    out = []
    for path in sorted(directory.glob("gc-*.tsv")):
        figures = read(path, window)
        if not figures:
            continue
        out.append(path.name)
        for gen in range(GENERATIONS):
            n = figures["count"][gen]
            total = figures["total_s"][gen]
            mean = total / n * 1e6 if n else 0.0
            hist = ", ".join(f"{lab} {int(c)}" for lab, c in
                             zip(labels, figures[f"hist{gen}"], strict=True) if c)
            out.append(f"  gen{gen}: {int(n)} collections, {total * 1000:.1f} ms in all "
                       f"(mean {mean:.0f} us, longest {figures['longest_s'][gen] * 1000:.2f} ms"
                       f" over the run), {int(figures['collected'][gen])} objects freed; "
                       f"{hist}")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--window", help="START,END wall-clock seconds: only that time")
    parser.add_argument("--report-only", action="store_true",
                        help="print the report of OUT's files, run nothing")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args()
    window = tuple(float(v) for v in args.window.split(",")) if args.window else None
    args.out.mkdir(parents=True, exist_ok=True)
    rc = 0
    if not args.report_only:
        if not args.command:
            parser.error("a command to run (after --)")
        with startup_hook(args.out, SITECUSTOMIZE, VARIABLE, str(args.out.resolve())):
            rc = subprocess.call(args.command)
    sys.stdout.write(report(args.out, window))  # type: ignore[arg-type]
    return rc


if __name__ == "__main__":
    sys.exit(main())

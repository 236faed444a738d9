"""Where the daemon's resident memory goes with many idle connections: a profile, not a benchmark.

Run as ``python -m nodeproxy_dev.bench.rssprofile [--idle N] [--splice] [--out DIR]`` (root;
hold the machine's bench lock).  The cluster of ``connprofile`` (two nodes, mTLS, the
bench's limits; ``--splice`` turns fastPath.splice on), its daemons started with a
``sitecustomize`` of this module's that, on SIGUSR2, writes a report of the daemon's own
memory (no tracemalloc, whose traces would be most of what it measures):

- ``/proc/self/smaps`` summed by mapping: the brk heap (glibc's main arena), anonymous
  mappings (pymalloc's 1 MiB arenas, glibc's large allocations and thread arenas: the
  kernel merges neighbouring ones, so they are one group), the interpreter and each
  library;
- glibc's ``mallinfo2()``: bytes in use and free in its arenas, in mmapped chunks, and
  what the top of the heap could give back;
- pymalloc's own figures (``sys._debugmallocstats()``): arenas, bytes in allocated
  blocks, free blocks and pools;
- optionally the RSS before and after a full ``gc.collect()`` (``collect``) or
  ``malloc_trim(0)`` (``trim``), and its CPU time.

Reports are taken before the connections, with N idle same-node connections open, then
after a collection and after a trim with them open, and the same three after they
closed.  Printed as JSON.  Bounded: every tool has a timeout; the cluster is torn down at
the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeproxy_dev.bench import procstat
from nodeproxy_dev.bench.connprofile import build, idle_connections
from nodeproxy_dev.bench.daemon_hook import DAEMON_CHECK, startup_hook
from nodeproxy_dev.testbed.cluster import Cluster

SITECUSTOMIZE = DAEMON_CHECK + r'''
if os.environ.get("NODEPROXY_RSS_DIR") and _nodeproxy_daemon():
    def _report(signum, frame):
        import ctypes, json, sys, time
        out = os.environ["NODEPROXY_RSS_DIR"]
        with open(os.path.join(out, "command")) as f:
            name, _, action = f.read().strip().partition(" ")
        report = {}
        from nodeproxy.capture.libc import libc as _shared_libc
        libc = _shared_libc()
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        if action == "collect":
            import gc
            from collections import Counter
            gc.set_debug(gc.DEBUG_SAVEALL)  # what the garbage was, by type
            gc.collect()
            kinds = Counter(type(o).__qualname__ for o in gc.garbage).most_common(12)
            gc.garbage.clear()
            gc.set_debug(0)
            before, t0 = rss(), time.thread_time()
            found = gc.collect()
            report["collect"] = {"rss_before_kib": before, "rss_after_kib": rss(),
                                 "cpu_ms": (time.thread_time() - t0) * 1000,
                                 "unreachable": found, "objects": len(gc.get_objects()),
                                 "garbage_kinds": kinds}
        if action == "trim":
            before, t0 = rss(), time.thread_time()
            libc.malloc_trim(0)
            report["trim"] = {"rss_before_kib": before, "rss_after_kib": rss(),
                              "cpu_ms": (time.thread_time() - t0) * 1000}
        with open("/proc/self/smaps") as f:
            report["smaps"] = f.read()
        class _Mallinfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        report["mallinfo2"] = {n: getattr(info, n) for n, _ in _Mallinfo2._fields_}
        path = os.path.join(out, f"{os.getpid()}.{name}")
        saved = os.dup(2)
        with open(path + ".pymalloc", "w") as f:
            os.dup2(f.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        with open(path + ".pymalloc") as f:
            report["pymalloc"] = f.read()
        with open(path + ".part", "w") as f:
            json.dump(report, f)
        os.replace(path + ".part", path)
    signal.signal(signal.SIGUSR2, _report)
'''

_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
ONE_MIB = 1024 * 1024


def smaps_groups(text: str) -> dict[str, int]:
    """RSS in KiB by kind of mapping from /proc/PID/smaps: ``[heap]``, ``anon`` (every
    anonymous mapping), ``[stack]`` and the like, and each file by its base name."""
    groups: dict[str, int] = {}
    name = ""
    for line in text.splitlines():
        if _HEADER.match(line):
            fields = line.split(None, 5)
            path = fields[5].strip() if len(fields) > 5 else ""
            if path.startswith("["):
                name = path
            elif path:
                name = os.path.basename(path)
            else:
                name = "anon"
        elif line.startswith("Rss:"):
            groups[name] = groups.get(name, 0) + int(line.split()[1])
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def pymalloc_summary(text: str) -> dict[str, int]:
    """The totals of ``sys._debugmallocstats()`` as numbers (arenas, bytes in allocated
    and available blocks, free pools, the losses), keyed as printed."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.rpartition("=")
        if not sep:
            continue
        key, value = key.strip().lstrip("# ").strip(), value.strip().replace(",", "")
        if not value.isdigit():
            continue
        if not key[:1].isdigit():
            out.setdefault(key, int(value))
        elif " unused pools " in key:
            out["unused pools"] = int(key.split()[0])
    return out


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    groups = smaps_groups(report["smaps"])
    total = sum(groups.values())
    kinds = ("[heap]", "anon")
    libraries = total - sum(groups.get(k, 0) for k in (*kinds, "[stack]"))
    info = report["mallinfo2"]
    pym = pymalloc_summary(report["pymalloc"])
    return {
        "rss_mib": round(total / 1024, 1),
        "heap_mib": round(groups.get("[heap]", 0) / 1024, 1),
        "anon_mib": round(groups.get("anon", 0) / 1024, 1),
        "files_mib": round(libraries / 1024, 1),
        "largest_files": [(k, round(v / 1024, 1)) for k, v in groups.items()
                          if k not in kinds and k != "[stack]"][:8],
        "glibc_in_use_mib": round(info["uordblks"] / ONE_MIB, 1),
        "glibc_free_mib": round(info["fordblks"] / ONE_MIB, 1),
        "glibc_top_releasable_mib": round(info["keepcost"] / ONE_MIB, 2),
        "glibc_mmapped_mib": round(info["hblkhd"] / ONE_MIB, 1),
        "glibc_arena_mib": round(info["arena"] / ONE_MIB, 1),
        "pymalloc_arenas_mib": pym.get("arenas allocated current"),
        "pymalloc_allocated_mib": round(pym.get("bytes in allocated blocks", 0) / ONE_MIB, 1),
        "pymalloc_available_mib": round(pym.get("bytes in available blocks", 0) / ONE_MIB, 1),
        "pymalloc_unused_pools": pym.get("unused pools"),
        **{k: report[k] for k in ("trim", "collect") if k in report},
    }


def take(pid: int, out: Path, name: str, action: str = "") -> dict[str, Any]:
    path = out / f"{pid}.{name}"
    (out / "command").write_text(f"{name} {action}".strip())
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon wrote no memory report")
        time.sleep(0.2)
    result = summarize(json.loads(path.read_text()))
    result["vmrss_mib"] = round(procstat.rss_kib(pid) / 1024, 1)
    return result


# The daemon's series that say whether the idle flows slept (spliced or relayed) and
# whether any connection was refused while they opened.
SLEEP_SERIES = ("nodeproxy_relay_sleeps_total", "nodeproxy_relay_wakes_total",
                "nodeproxy_relays_asleep", "nodeproxy_splice_sleeps_total",
                "nodeproxy_splice_wakes_total", "nodeproxy_outbound_refused_total",
                "nodeproxy_inbound_refused_total")


def sleep_metrics(cluster: Cluster) -> dict[str, float]:
    sums = dict.fromkeys(SLEEP_SERIES, 0.0)
    for family in text_string_to_metric_families(cluster.metrics("node0")):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums


def profile(cluster: Cluster, count: int, out: Path, settle: float) -> dict[str, Any]:
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    report: dict[str, Any] = {"before": take(pid, out, "before")}
    with idle_connections(cluster, pid, count) as ready:
        report["ready"] = ready
        time.sleep(settle)
        report["idle"] = take(pid, out, "idle")
        report["idle_metrics"] = sleep_metrics(cluster)
        report["idle_collected"] = take(pid, out, "collected", "collect")
        report["idle_trimmed"] = take(pid, out, "trimmed", "trim")
    time.sleep(settle)
    report["closed"] = take(pid, out, "closed")
    report["closed_collected"] = take(pid, out, "closed-collected", "collect")
    report["closed_trimmed"] = take(pid, out, "closed-trimmed", "trim")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.rssprofile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=8988)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the connections opened and the report")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--splice", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.idle <= 9500 or not 0 <= args.settle <= 120:
        parser.error("--idle 1..9500, --settle 0..120")
    procstat.lift_own_nofile(4 * args.idle + 4000)
    out = args.out or Path(tempfile.mkdtemp(prefix="nodeproxy-rssprofile-"))
    out.mkdir(parents=True, exist_ok=True)
    with startup_hook(out, SITECUSTOMIZE, "NODEPROXY_RSS_DIR", str(out)), \
            Cluster(2, mtls=True) as cluster:
        build(cluster, "tcp", args.splice)
        cluster.start_daemons()
        report = profile(cluster, args.idle, out, args.settle)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"reports in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

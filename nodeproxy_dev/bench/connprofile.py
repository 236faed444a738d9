"""Where a proxied connection's CPU and memory go in the daemon: a profile, not a benchmark.

Run as ``python -m nodeproxy_dev.bench.connprofile [--seconds S] [--idle N] [--out DIR]
[--app-protocol tcp|detect] [--splice] [--only same-node|cross-node] [--strace] [--perf]
[--burst N] [--calls]`` (root; ``--idle 0`` skips the memory part).  One testbed cluster (two
nodes, a meshed client on node0, a server pod on each node, a service for each, its port
declared ``appProtocol: tcp`` as the bench's L4 servers are, so same-node flows are
spliced; ``detect`` leaves it undeclared: the first bytes are sniffed and the flow relayed
on the sk_msg fast path; ``--splice`` turns fastPath.splice on, as the bench's
nodeproxy-splice does), then:

- CPU: the connect scenario's load (short connections back to back, 16 in flight) to the
  same-node and to the cross-node service for S seconds each, with py-spy sampling every
  daemon on the way at 200 Hz (``py-spy record --format raw``: folded stacks).  Printed:
  the connections made, each daemon's CPU time (user + system) per connection over the
  load, the share of samples in which the daemon was busy, and the
  functions with the largest inclusive share of the busy samples.
- System calls (``--strace``): the same-node load once more under ``strace -c -f`` on
  node0's daemon; its system calls per connection, by name.
- Where the CPU goes below Python (``--perf``): the same-node load once more under
  ``perf record -g`` on node0's daemon (999 Hz); the samples' shares by shared object
  (kernel, the interpreter, uvloop, libuv, ctypes' libffi ...) and the leading symbols.
- The opening burst (``--burst N``): N idle connections opened same node 64 at a time, as
  the bench's idle scenario does, with py-spy on node0's daemon (``--burst-tool``: strace,
  perf or strace -k instead); the opening's time, the daemon's CPU per connection opened,
  its busy share of the opening, the client's and node0's TCP counters (nstat) and the
  functions' shares.  With the cross-node load (``--only cross-node`` or neither) also N
  opened cross node (to web-z1 over HBONE) with py-spy on both daemons.
- Python calls per connection (``--calls``): the daemons restarted with a hook that runs
  cProfile between two SIGUSR1s; the same-node load under it (node0), and with
  ``--only cross-node`` (or neither) the cross-node load (node0 and node1, each its own
  figures), and each function's calls per connection made (exact counts; cProfile's own
  times are not the daemon's).
- Memory: the daemons restarted with tracemalloc on (a ``sitecustomize`` of this module's
  own, active only in ``nodeproxy run``, dumps a snapshot on SIGUSR2); N idle connections
  opened same node (``nodeproxy_dev.bench.idle``), and the snapshot difference after
  against before, per allocating line, divided by N.  RSS before and after too.

Bounded: every tool has a timeout; the cluster is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodeproxy_dev.bench import procstat
from nodeproxy_dev.bench.daemon_hook import DAEMON_CHECK, startup_hook
from nodeproxy_dev.bench.profile_reading import (
    SAMPLE_RATE,
    folded_shares,
    perf_shares,
    py_spy,
    strace_counts,
)
from nodeproxy_dev.bench.topology import BENCH_LIMITS
from nodeproxy_dev.testbed.cluster import Cluster

PORT = 7000
TOP = 18

SITECUSTOMIZE = DAEMON_CHECK + '''
if os.environ.get("NODEPROXY_PROFILE_DIR") and _nodeproxy_daemon():
    import tracemalloc
    tracemalloc.start(1)
    def _dump(signum, frame):
        path = os.path.join(os.environ["NODEPROXY_PROFILE_DIR"], f"{os.getpid()}.snapshot")
        tracemalloc.take_snapshot().dump(path + ".part")
        os.replace(path + ".part", path)
    signal.signal(signal.SIGUSR2, _dump)
'''


CALLS_SITECUSTOMIZE = DAEMON_CHECK + '''
if os.environ.get("NODEPROXY_CALLS_DIR") and _nodeproxy_daemon():
    import cProfile
    _profile = [None]
    def _toggle(signum, frame):
        if _profile[0] is None:
            _profile[0] = cProfile.Profile()
            _profile[0].enable()
            return
        _profile[0].disable()
        path = os.path.join(os.environ["NODEPROXY_CALLS_DIR"], f"{os.getpid()}.pstats")
        _profile[0].dump_stats(path + ".part")
        os.replace(path + ".part", path)
        _profile[0] = None
    signal.signal(signal.SIGUSR1, _toggle)
'''


def cpu_profile(cluster: Cluster, service: str, nodes: list[str], seconds: float,
                out: Path) -> dict[str, Any]:
    vip = cluster.services[f"default/{service}"].address(4)
    daemons = {node: cluster.nodes[node].daemon.pid for node in nodes}  # type: ignore[union-attr]
    cpu_before = {node: procstat.cpu_seconds(pid) for node, pid in daemons.items()}
    load = _connect_load(cluster, vip, seconds)
    time.sleep(1.0)  # past the first connections' warm-up
    spies = {}
    for node in nodes:
        path = out / f"{service}-{node}.folded"
        pid = cluster.nodes[node].daemon.pid  # type: ignore[union-attr]
        spies[node] = (path, subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--duration",
             str(int(seconds)), "--format", "raw", "--output", str(path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    result: dict[str, Any] = {"service": service}
    for node, (path, spy) in spies.items():
        spy.wait(timeout=seconds + 60)
        result[node] = folded_shares(path.read_text() if path.exists() else "",
                                     SAMPLE_RATE * int(seconds))
    summary = _load_summary(load, seconds)
    # The daemons' own CPU (user + system, all threads) over the whole load, per
    # connection made: less moved by other processes on the cores than a rate is.
    made = max(summary.get("succeeded", 0), 1)
    for node, pid in daemons.items():
        result[node]["cpu_ms_per_connection"] = round(
            (procstat.cpu_seconds(pid) - cpu_before[node]) * 1000 / made, 4)
    result["connections_per_s"] = summary.get("succeeded", 0) / max(
        summary.get("elapsed_s", 1.0), 1e-9)
    result["failed"] = summary.get("failed")
    result["errors"] = summary.get("errors")
    return result


def _connect_load(cluster: Cluster, vip: str, seconds: float) -> subprocess.Popen[str]:
    """The connect scenario's load (short connections back to back, 16 in flight)."""
    return cluster.spawn_in_pod("client", cluster.peer_argv(
        "load", "--to", vip, "--mode", "transfer", "--send", "0", "--receive", "0",
        "--rate", "0", "--concurrency", "16", "--duration", str(seconds + 2),
        "--max-requests", "200000", "--timeout", "5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _load_summary(load: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    stdout, _ = load.communicate(timeout=seconds + 60)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def syscall_profile(cluster: Cluster, service: str, seconds: float,
                    out: Path) -> dict[str, Any]:
    """System calls of node0's daemon per connection of the connect load: ``strace -c -f``
    around the whole load (strace slows the daemon, so every connection counted was
    traced)."""
    # hboneprofile imports this module (its py-spy helpers): its strace reader is taken here.

    vip = cluster.services[f"default/{service}"].address(4)
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    path = out / f"{service}-node0.strace"
    tracer = subprocess.Popen(
        ["timeout", "-s", "INT", str(int(seconds) + 30), "strace", "-c", "-f", "-p", str(pid),
         "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached before the first connection
        summary = _load_summary(_connect_load(cluster, vip, seconds), seconds)
    finally:
        tracer.send_signal(signal.SIGINT)  # strace prints its table on SIGINT
        tracer.wait(timeout=30)
    made = max(int(summary.get("succeeded", 0)), 1)
    counts = strace_counts(path.read_text() if path.exists() else "")
    return {"service": service, "connections": made,
            "total_per_connection": round(sum(counts.values()) / made, 2),
            "per_connection": {name: round(count / made, 2) for name, count in
                               sorted(counts.items(), key=lambda kv: -kv[1])
                               if count / made >= 0.05}}


def perf_profile(cluster: Cluster, service: str, seconds: float, out: Path
                 ) -> dict[str, Any]:
    """Where node0's daemon spends the same-node load below Python: ``perf record -g`` around
    it, then the samples' shares by shared object and by symbol (self time)."""
    vip = cluster.services[f"default/{service}"].address(4)
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    data = out / f"{service}-node0.perf.data"
    load = _connect_load(cluster, vip, seconds)
    time.sleep(1.0)
    subprocess.run(["timeout", str(int(seconds) + 30), "perf", "record", "-F", "999", "-g",
                    "-p", str(pid), "-o", str(data), "--", "sleep", str(int(seconds))],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    summary = _load_summary(load, seconds)

    def report(sort: str) -> list[tuple[str, float]]:
        return perf_shares(data, sort, 0.7, TOP * 2)

    (out / "perf-dso.txt").write_text(json.dumps(report("dso")))
    return {"service": service, "connections_per_s": summary.get("succeeded", 0) / max(
        summary.get("elapsed_s", 1.0), 1e-9), "by_dso": report("dso"),
        "by_symbol": report("dso,sym")}


_BURST_SUFFIX = {"py-spy": "folded", "strace": "strace", "perf": "perf.data",
                 "strace-stacks": "stacks"}
# The system calls whose callers strace-stacks shows (strace -k: a stack per call).
_STACKED_CALLS = "getsockname,getsockopt,getpeername,fcntl,ioctl,close,setsockopt"


def cross_node_burst_profile(cluster: Cluster, count: int, out: Path) -> dict[str, Any]:
    """Opening `count` idle connections cross node (the client on node0 to web-z1 over
    HBONE, 64 in flight): how long, and py-spy on both daemons (each one's CPU per
    connection, busy share of the opening and the functions' shares)."""
    pids = {node: cluster.nodes[node].daemon.pid  # type: ignore[union-attr]
            for node in ("node0", "node1")}
    cpu_before = {node: procstat.cpu_seconds(pid) for node, pid in pids.items()}
    spies = {node: subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--duration",
         "60", "--format", "raw", "--output", str(out / f"burst-cross-{node}.folded"),
         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for node, pid in pids.items()}
    time.sleep(1.0)
    started = time.monotonic()
    with idle_connections(cluster, pids["node0"], count, "web-z1",
                          also=(pids["node1"],)) as ready:
        opened_s = time.monotonic() - started
        cpu = {node: procstat.cpu_seconds(pid) - cpu_before[node]
               for node, pid in pids.items()}
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in spies.values():
            spy.wait(timeout=120)
    wall = max(float(ready.get("setup_s") or opened_s), 1e-9)
    result: dict[str, Any] = {"connections": ready.get("open"), "failed": ready.get("failed"),
                              "client_setup_s": ready.get("setup_s"),
                              "opened_s": round(opened_s, 3)}
    for node in pids:
        path = out / f"burst-cross-{node}.folded"
        result[node] = {
            "cpu_ms_per_connection": round(cpu[node] * 1000 / max(count, 1), 4),
            "daemon_busy_share": round(cpu[node] / wall, 3),
            "py_spy": folded_shares(path.read_text() if path.exists() else "",
                                    SAMPLE_RATE * opened_s)}
    return result


def burst_profile(cluster: Cluster, count: int, out: Path, tool: str = "py-spy"
                  ) -> dict[str, Any]:
    """Opening `count` idle connections same node (64 in flight, as the bench's idle
    scenario): how long, node0's daemon CPU per connection and its busy share of the
    opening's wall time, the TCP counters of the client's and the node's netns that show a
    full backlog or a retransmitted SYN (nstat: ListenOverflows, ListenDrops, TCPTimeouts,
    ...; a SYN retransmitted after 1 s shows as a cliff in the opening time), and what
    `tool` says: py-spy's shares, strace -c's system calls per connection (strace slows
    the daemon: the opening's time is then not the daemon's), or perf's shares by shared
    object and symbol."""
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    netns_of = {"client": cluster.pods["client"].netns, "node0": cluster.nodes["node0"].netns}
    counters_before = {name: _nstat(ns) for name, ns in netns_of.items()}
    cpu_before = procstat.cpu_seconds(pid)
    path = out / ("burst-node0." + _BURST_SUFFIX[tool])
    if tool == "py-spy":
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE),
                "--duration", "60", "--format", "raw", "--output", str(path), "--nonblocking"]
    elif tool == "strace":
        argv = ["timeout", "-s", "INT", "120", "strace", "-c", "-f", "-p", str(pid), "-o",
                str(path)]
    elif tool == "strace-stacks":
        argv = ["timeout", "-s", "INT", "120", "strace", "-f", "-k", "-e",
                f"trace={_STACKED_CALLS}", "-p", str(pid), "-o", str(path)]
    else:
        argv = ["timeout", "-s", "INT", "120", "perf", "record", "-F", "999", "-g", "-p",
                str(pid), "-o", str(path)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    started = time.monotonic()
    with idle_connections(cluster, pid, count) as ready:
        opened_s = time.monotonic() - started
        cpu = procstat.cpu_seconds(pid) - cpu_before
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=120)
    counters = {name: _nstat_delta(counters_before[name], _nstat(ns))
                for name, ns in netns_of.items()}
    result: dict[str, Any] = {
        "tool": tool, "connections": ready.get("open"), "failed": ready.get("failed"),
        "client_setup_s": ready.get("setup_s"), "opened_s": round(opened_s, 3),
        "cpu_ms_per_connection": round(cpu * 1000 / max(count, 1), 4),
        "daemon_busy_share": round(cpu / max(float(ready.get("setup_s") or opened_s), 1e-9),
                                   3),
        "nstat": counters}
    if tool == "py-spy":
        result["py_spy"] = folded_shares(path.read_text() if path.exists() else "",
                                         SAMPLE_RATE * opened_s)
    elif tool == "strace-stacks":
        result["stacks"] = str(path)
    elif tool == "strace":
        calls = strace_counts(path.read_text() if path.exists() else "")
        result["syscalls_per_connection"] = {
            name: round(n / max(count, 1), 2) for name, n in
            sorted(calls.items(), key=lambda kv: -kv[1]) if n / max(count, 1) >= 0.05}
        result["syscalls_total_per_connection"] = round(sum(calls.values()) / max(count, 1), 2)
    else:
        result["by_dso"] = perf_shares(path, "dso", 0.7, TOP * 2)
        result["by_symbol"] = perf_shares(path, "dso,sym", 0.7, TOP * 2)
    return result


# The TCP counters that tell a full accept queue, a dropped SYN or a retransmission.
_NSTAT_KEYS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPTimeouts",
               "TcpRetransSegs", "TcpExtTCPReqQFullDrop", "TcpExtTCPReqQFullDoCookies",
               "TcpExtSyncookiesSent", "TcpExtTCPSynRetrans", "TcpActiveOpens",
               "TcpPassiveOpens", "TcpExtTCPBacklogDrop", "TcpExtTCPAbortOnData")


def _nstat(netns_name: str) -> dict[str, int]:
    """The netns's absolute TCP counters (nstat -a -z, without touching nstat's history)."""
    return parse_nstat(subprocess.run(
        ["ip", "netns", "exec", netns_name, "nstat", "-a", "-z", "-s"],
        capture_output=True, text=True, timeout=30, check=False).stdout)


def parse_nstat(text: str) -> dict[str, int]:
    """The counters of _NSTAT_KEYS from nstat's output (``name value rate`` per line)."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in _NSTAT_KEYS and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _nstat_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in _NSTAT_KEYS}


def calls_profile(cluster: Cluster, service: str, seconds: float, out: Path,
                  nodes: tuple[str, ...] = ("node0",)) -> dict[str, Any]:
    """Each Python function's calls per connection of the connect load to `service` in the
    daemons of `nodes` (started with CALLS_SITECUSTOMIZE): cProfile on for the load, off
    after it.  Same node: node0 alone; cross node: node0 and node1 (the per-node figures
    under the node's name)."""
    import pstats

    vip = cluster.services[f"default/{service}"].address(4)
    pids = {node: cluster.nodes[node].daemon.pid for node in nodes}  # type: ignore[union-attr]
    for pid in pids.values():
        (out / f"{pid}.pstats").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    summary = _load_summary(_connect_load(cluster, vip, seconds), seconds)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    made = max(int(summary.get("succeeded", 0)), 1)
    result: dict[str, Any] = {"service": service, "connections": made}
    for node, pid in pids.items():
        path = out / f"{pid}.pstats"
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node}'s daemon wrote no cProfile dump")
            time.sleep(0.2)
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        rows = sorted(((calls, f"{func[2]} "
                        f"({func[0].rsplit('site-packages/', 1)[-1]}:{func[1]})")
                       for func, (_, calls, *_rest) in stats.items()), reverse=True)
        figures = {"calls_per_connection": round(sum(c for c, _ in rows) / made, 1),
                   "top": [(name, round(calls / made, 2)) for calls, name in rows[:TOP * 4]]}
        if len(nodes) == 1:
            result.update(figures)
        else:
            result[node] = figures
    return result


def memory_profile(cluster: Cluster, count: int, out: Path, settle: float = 1.0
                   ) -> dict[str, Any]:
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    snapshot_path = out / f"{pid}.snapshot"

    def snapshot() -> tracemalloc.Snapshot:
        snapshot_path.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not snapshot_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon wrote no tracemalloc snapshot")
            time.sleep(0.2)
        return tracemalloc.Snapshot.load(str(snapshot_path))

    rss_before = procstat.rss_kib(pid)
    before = snapshot()
    with idle_connections(cluster, pid, count) as ready:
        time.sleep(settle)
        rss_after = procstat.rss_kib(pid)
        after = snapshot()
    diff = after.compare_to(before, "lineno")
    grown = sum(s.size_diff for s in diff)
    return {"connections": ready.get("open"), "rss_kib_per_conn": (rss_after - rss_before) /
            count, "traced_kib_per_conn": grown / 1024 / count,
            "top": [(str(s.traceback[0]), s.size_diff / count, s.count_diff / count)
                    for s in diff[:TOP]]}


@contextlib.contextmanager
def idle_connections(cluster: Cluster, pid: int, count: int, service: str = "web-z0",
                     also: tuple[int, ...] = ()) -> Iterator[dict[str, Any]]:
    """``count`` idle connections from the client pod to `service` (web-z0: same node,
    web-z1: cross node) through node0's daemon (``pid``; ``also``: the other daemons on
    the way; their open-file limits raised to fit), held for the block; yields the idle
    client's ready line.  The client closes them and exits at the block's end."""
    for daemon in (pid, *also):
        procstat.raise_nofile(daemon, 2 * count + 2000)
    vip = cluster.services[f"default/{service}"].address(4)
    idle = cluster.spawn_in_pod("client", [cluster.python, "-m", "nodeproxy_dev.bench.idle",
                                           "--to", vip, "--count", str(count), "--timeout",
                                           "60", "--hold", "300"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout is not None and idle.stdin is not None
        yield json.loads(idle.stdout.readline())
    finally:
        if idle.stdin is not None:
            idle.stdin.close()
        idle.wait(timeout=60)


def build(cluster: Cluster, app_protocol: str | None = "tcp", splice: bool = False) -> None:
    cluster.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
    cluster.add_pod("node0", "web-0", labels={"app": "web", "zone": "z0"},
                    service_account="web")
    cluster.add_pod("node1", "web-1", labels={"app": "web", "zone": "z1"},
                    service_account="web")
    cluster.add_service("web-z0", port=80, target_port=PORT, selector={"zone": "z0"},
                        app_protocol=app_protocol)
    cluster.add_service("web-z1", port=80, target_port=PORT, selector={"zone": "z1"},
                        app_protocol=app_protocol)
    for name in ("web-0", "web-1"):
        cluster.serve_peer(name, PORT)
    # The per-pod caps lifted, as in the bench.
    overrides = {**BENCH_LIMITS, "fastPath": {"splice": True}} if splice else BENCH_LIMITS
    cluster.write_configs(overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.connprofile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--app-protocol", choices=("tcp", "detect"), default="tcp")
    parser.add_argument("--splice", action="store_true")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the idle connections opened and the snapshot "
                             "(a relayed flow sleeps after 1-2 s quiet)")
    parser.add_argument("--only", choices=("same-node", "cross-node"), default=None,
                        help="profile only this connect load (default: both)")
    parser.add_argument("--strace", action="store_true",
                        help="also count node0's system calls per connection (strace -c "
                             "-f, a second same-node load of --seconds)")
    parser.add_argument("--perf", action="store_true",
                        help="also perf record node0's daemon under a second same-node load "
                             "(shares by shared object and symbol)")
    parser.add_argument("--burst", type=int, default=0,
                        help="also open this many idle connections, 64 at a time, with "
                             "py-spy on node0's daemon (the opening burst; with --only "
                             "cross-node, or neither, cross node too: py-spy on both)")
    parser.add_argument("--burst-tool", choices=tuple(_BURST_SUFFIX),
                        default="py-spy",
                        help="what watches node0's daemon during the opening burst")
    parser.add_argument("--calls", action="store_true",
                        help="also count the daemons' Python calls per connection "
                             "(cProfile, daemons restarted with a hook; one more load of "
                             "each kind --only allows: node0 same node, both cross node)")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 0 <= args.idle <= 9000:
        parser.error("--seconds 1..120, --idle 0..9000 (0: no memory profile)")
    procstat.lift_own_nofile(4 * args.idle + 4000)
    out = args.out or Path(tempfile.mkdtemp(prefix="nodeproxy-connprofile-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    with Cluster(2, mtls=True) as cluster:
        build(cluster, None if args.app_protocol == "detect" else args.app_protocol,
              args.splice)
        cluster.start_daemons()
        report["cpu"] = []
        if args.only in (None, "same-node"):
            report["cpu"].append(cpu_profile(cluster, "web-z0", ["node0"], args.seconds, out))
            if args.strace:
                report["syscalls"] = syscall_profile(cluster, "web-z0", args.seconds, out)
            if args.perf:
                report["perf"] = perf_profile(cluster, "web-z0", args.seconds, out)
            if args.burst:
                report["burst"] = burst_profile(cluster, min(args.burst, 9000), out,
                                                args.burst_tool)
        if args.only in (None, "cross-node"):
            report["cpu"].append(cpu_profile(cluster, "web-z1", ["node0", "node1"],
                                             args.seconds, out))
            if args.burst:
                report["burst_cross_node"] = cross_node_burst_profile(
                    cluster, min(args.burst, 9000), out)
        if args.calls:
            cluster.stop_daemons()
            with startup_hook(out, CALLS_SITECUSTOMIZE, "NODEPROXY_CALLS_DIR", str(out)):
                cluster.start_daemons()
                if args.only in (None, "same-node"):
                    report["calls"] = calls_profile(cluster, "web-z0", args.seconds, out)
                if args.only in (None, "cross-node"):
                    report["calls_cross_node"] = calls_profile(
                        cluster, "web-z1", args.seconds, out, nodes=("node0", "node1"))
        if not args.idle:
            cluster.stop_daemons()
            (out / "profile.json").write_text(json.dumps(report, indent=1))
            print(json.dumps(report, indent=1))
            print(f"folded stacks in {out}", file=sys.stderr)
            return 0
        cluster.stop_daemons()
        with startup_hook(out, SITECUSTOMIZE, "NODEPROXY_PROFILE_DIR", str(out)):
            cluster.start_daemons()
            report["memory"] = memory_profile(cluster, args.idle, out, args.settle)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"folded stacks and snapshots in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

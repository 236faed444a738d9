"""What a woken daemon pays under the bench's paced HTTP load (issues 17 and 18's p99 rows).

Run as ``python -m nodeproxy_dev.bench.pacedprofile [--seconds S] [--out DIR] [--perf]
[--strace-seconds S] [--only direct,splice,l7]`` (root; hold /work/bench.lock or the
machine's equivalent).  One testbed cluster (two nodes, mTLS): nginx serving 1 KiB on a
meshed pod of node1, reached from a meshed client pod on node0 through two services (one
``appProtocol: tcp``, relayed as bytes over HBONE as the bench's ``nodeproxy-splice`` does
cross node; one ``appProtocol: http``, parsed by both daemons as ``nodeproxy-l7``), and
directly from an unenrolled pod to an unenrolled nginx (the baseline).  For each of the
three, the bench's fixed-rate load (wrk -t1 -c10, 10 ms ``delay()`` per connection, about
1000 requests/s) and:

- wrk's latency percentiles (p50 … p99.9, max): the tail's shape (a stall shows as a
  p99.9/max far past the p99; burst queueing as p50 and p99 both multiples of one request);
- each daemon's CPU µs per request (user, system), context switches per request (all its
  threads), and every thread's CPU (does anything but the event loop wake?);
- a window of ``strace -f -tt -T`` on both daemons (``--strace-seconds``): system calls per
  request by name and thread, the event loop's ``epoll_pwait`` wake-ups per request and how
  many of them returned no event (a timer's wake-up, not a request's), and the timeouts
  the loop passed (a timer armed: the loop's next ``call_later``);
- with ``--perf``: ``perf record -g`` on both daemons over one more paced run (self shares
  by shared object and symbol), and the same for a saturated run (wrk -c10, no pause), so
  the paced and the hot per-request profiles sit side by side.

Bounded: every tool has a timeout; the cluster is torn down at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nodeproxy_dev.bench.procstat import user_system
from nodeproxy_dev.bench.profile_reading import perf_around
from nodeproxy_dev.bench.topology import BENCH_LIMITS
from nodeproxy_dev.testbed import nginx
from nodeproxy_dev.testbed.cluster import Cluster

HTTP_PORT = 8080
L7_PORT = 8081
HTTP_BODY = 1024
CONNECTIONS = 10
PACE_MS = 10
PERCENTILES = (50, 75, 90, 95, 99, 99.5, 99.9)
TOP = 40

PACED_LUA = """\
delay = function() return %d end
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({%s}) do
    table.insert(out, string.format('"p%%s": %%.1f', p, latency:percentile(p)))
  end
  io.write(string.format('{"requests": %%d, "errors": %%d, "max": %%.1f, "mean": %%.1f, %%s}\\n',
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout, latency.max, latency.mean,
    table.concat(out, ", ")))
end
"""


def build(cluster: Cluster) -> None:
    cluster.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
    cluster.add_pod("node1", "server", labels={"app": "server"}, service_account="server")
    cluster.add_service("web", port=HTTP_PORT, target_port=HTTP_PORT,
                        selector={"app": "server"}, app_protocol="tcp")
    cluster.add_service("webl7", port=L7_PORT, target_port=HTTP_PORT,
                        selector={"app": "server"}, app_protocol="http")
    cluster.add_unenrolled_pod("node0", "client-direct", labels={"app": "client-direct"})
    cluster.add_unenrolled_pod("node1", "plain", labels={"app": "plain"})
    cluster.write_configs(overrides=BENCH_LIMITS)


def _tasks(pid: int) -> dict[int, tuple[str, float, int, int]]:
    """Each thread of the process: name, CPU seconds, voluntary and involuntary context
    switches."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        vol = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        invol = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        out[int(task.name)] = (comm, cpu, vol, invol)
    return out


def _wrk_argv(script: Path, url: str, seconds: int, paced: bool = True) -> list[str]:
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s"]
    if paced:
        argv += ["-s", str(script)]
    return [*argv, url]


def _wrk(cluster: Cluster, pod: str, script: Path, url: str, seconds: int,
         paced: bool = True) -> dict[str, Any]:
    result = cluster.run_in_pod(pod, _wrk_argv(script, url, seconds, paced),
                                timeout=seconds + 60)
    if not paced:
        found = re.search(r"(\d+) requests in", result.stdout or "")
        return {"requests": int(found.group(1)) if found else 0}
    lines = [line for line in (result.stdout or "").splitlines() if line.startswith("{")]
    if not lines:
        return {"requests": 0, "error": (result.stdout + result.stderr)[-2000:]}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def _paced_run(cluster: Cluster, pods: dict[str, int], client: str, script: Path, url: str,
               seconds: int) -> dict[str, Any]:
    """One paced wrk run: latency percentiles (ms), each daemon's CPU, switches and threads
    per request."""
    before = {node: (user_system(pid), _tasks(pid)) for node, pid in pods.items()}
    wrk = _wrk(cluster, client, script, url, seconds)
    n = max(wrk.get("requests", 0), 1)
    run: dict[str, Any] = {"wrk_ms": {k: round(v / 1000, 3) if isinstance(v, float) else v
                                      for k, v in wrk.items()},
                           "requests_per_s": round(n / seconds)}
    for node, pid in pods.items():
        (u0, s0), tasks0 = before[node]
        u1, s1 = user_system(pid)
        tasks1 = _tasks(pid)
        vol = sum(t[2] for t in tasks1.values()) - sum(t[2] for t in tasks0.values())
        invol = sum(t[3] for t in tasks1.values()) - sum(t[3] for t in tasks0.values())
        threads = collections.Counter[str]()
        for tid, (comm, cpu, _, _) in tasks1.items():
            threads[comm] += cpu - tasks0.get(tid, (comm, 0.0, 0, 0))[1]
        run[node] = {
            "cpu_us_per_request": {"user": round((u1 - u0) / n * 1e6, 1),
                                   "system": round((s1 - s0) / n * 1e6, 1)},
            "switches_per_request": {"voluntary": round(vol / n, 2),
                                     "involuntary": round(invol / n, 2)},
            "threads": len(tasks1),
            "thread_cpu_ms": {k: round(v * 1e3) for k, v in threads.items() if v > 0},
        }
    return run


_SYSCALL = re.compile(
    r"^(\d+)\s+[\d:.]+\s+(?:<\.\.\. )?(\w+)(?:\(| resumed>)(.*)\s=\s(-?\d+|\?)(?:\s.*)?$")


def read_strace(text: str, loop_tid: int) -> dict[str, Any]:
    """strace -f -tt -T output: calls by name (all threads), calls by thread, the loop's
    epoll_pwait returns with no event (timer wake-ups) and the timeouts it passed."""
    by_name: collections.Counter[str] = collections.Counter()
    by_tid: collections.Counter[int] = collections.Counter()
    loop_by_name: collections.Counter[str] = collections.Counter()
    timeouts: collections.Counter[str] = collections.Counter()
    empty = 0
    for line in text.splitlines():
        if "unfinished ..." in line:
            continue
        found = _SYSCALL.match(line)
        if not found:
            continue
        tid, name, args, ret = int(found.group(1)), found.group(2), found.group(3), found.group(4)
        by_name[name] += 1
        by_tid[tid] += 1
        if tid == loop_tid:
            loop_by_name[name] += 1
            if name in ("epoll_pwait", "epoll_wait"):
                # epoll_pwait(fd, events, max, TIMEOUT, sigmask, size); epoll_wait ends
                # with it.  The events array holds commas: count from the end.
                parts = [p.strip(" )") for p in args.rsplit(",", 3)]
                timeout = parts[1] if name == "epoll_pwait" else parts[-1]
                timeouts[timeout if timeout != "-1" else "-1 (none)"] += 1
                if ret == "0":
                    empty += 1
    return {"by_name": dict(by_name), "by_thread": {str(k): v for k, v in by_tid.items()},
            "loop_by_name": dict(loop_by_name), "loop_epoll_empty_returns": empty,
            "loop_epoll_timeouts": dict(timeouts.most_common(12))}


def _strace_window(cluster: Cluster, pods: dict[str, int], client: str, script: Path,
                   url: str, seconds: int, window: int, out: Path, tag: str
                   ) -> dict[str, Any]:
    """strace -f -tt -T on both daemons for ``window`` seconds in the middle of a paced
    run; the calls per request of that window (requests: wrk's rate over the run)."""
    load = cluster.spawn_in_pod(client, _wrk_argv(script, url, seconds), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.5)
    tracers = {node: subprocess.Popen(
        ["timeout", "-s", "INT", str(window), "strace", "-f", "-tt", "-T", "-p", str(pid),
         "-o", str(out / f"{tag}.{node}.strace.txt")], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for node, pid in pods.items()}
    for tracer in tracers.values():
        tracer.wait(timeout=window + 30)
    stdout, _ = load.communicate(timeout=seconds + 60)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    rate = json.loads(lines[-1])["requests"] / seconds if lines else 0.0
    requests = max(rate * window, 1.0)
    result: dict[str, Any] = {"window_s": window, "requests_estimated": round(requests)}
    for node, pid in pods.items():
        path = out / f"{tag}.{node}.strace.txt"
        read = read_strace(path.read_text() if path.exists() else "", pid)
        result[node] = {
            "per_request": {k: round(v / requests, 2) for k, v in
                            sorted(read["by_name"].items(), key=lambda kv: -kv[1])
                            if v / requests >= 0.02},
            "loop_per_request": {k: round(v / requests, 2) for k, v in
                                 sorted(read["loop_by_name"].items(), key=lambda kv: -kv[1])
                                 if v / requests >= 0.02},
            "threads_calls": read["by_thread"],
            "loop_epoll_empty_per_s": round(read["loop_epoll_empty_returns"] / window, 1),
            "loop_epoll_timeouts": read["loop_epoll_timeouts"],
        }
    return result


def profile(cluster: Cluster, seconds: int, out: Path, only: tuple[str, ...], perf: bool,
            strace_seconds: int, runs: int) -> dict[str, Any]:
    directory = out / "www"
    (directory / "www").mkdir(parents=True, exist_ok=True)
    (directory / "www" / "small.bin").write_bytes(os.urandom(HTTP_BODY))
    (directory / "nginx.conf").write_text(nginx.nginx_config(
        str(directory), HTTP_PORT, f"root {directory}/www;",
        http="    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
             "    default_type application/octet-stream;\n"))
    for pod in ("server", "plain"):
        cluster.serve(pod, nginx.nginx_argv(str(directory)), HTTP_PORT)
    script = out / "paced.lua"
    script.write_text(PACED_LUA % (PACE_MS, ", ".join(f"{p:g}" for p in PERCENTILES)))
    targets = {
        "direct": ("client-direct", f"http://{cluster.pods['plain'].ip4}:{HTTP_PORT}/small.bin"),
        "splice": ("client", f"http://{cluster.services['default/web'].vip4}:{HTTP_PORT}/small.bin"),
        "l7": ("client", f"http://{cluster.services['default/webl7'].vip4}:{L7_PORT}/small.bin"),
    }
    pods = {node: cluster.nodes[node].daemon.pid for node in ("node0", "node1")}  # type: ignore[union-attr]
    result: dict[str, Any] = {"seconds": seconds, "connections": CONNECTIONS,
                              "pace_ms": PACE_MS}
    idle = {node: _tasks(pid) for node, pid in pods.items()}
    time.sleep(3)
    result["idle_cpu_ms_per_s"] = {
        node: round((sum(t[1] for t in _tasks(pid).values())
                     - sum(t[1] for t in idle[node].values())) / 3 * 1e3, 2)
        for node, pid in pods.items()}
    for name in only:
        client, url = targets[name]
        _wrk(cluster, client, script, url, 1, paced=False)  # warm-up: pooled connections
        entry: dict[str, Any] = {"runs": [_paced_run(cluster, pods, client, script, url, seconds)
                                          for _ in range(runs)]}
        if name != "direct":
            entry["saturated"] = _paced_run_saturated(cluster, pods, client, script, url, 3)
            if strace_seconds:
                entry["strace"] = _strace_window(cluster, pods, client, script, url,
                                                 strace_seconds + 4, strace_seconds, out, name)
            if perf:
                for paced in (True, False):
                    entry["perf_paced" if paced else "perf_saturated"] = perf_around(
                        pods, out, seconds,
                        lambda c=client, u=url, p=paced:
                            _wrk(cluster, c, script, u, seconds, paced=p)["requests"],
                        tag=f"{name}.{'paced' if paced else 'saturated'}", hertz=999,
                        percent_limit=0.7, top=TOP)
        result[name] = entry
    return result


def _paced_run_saturated(cluster: Cluster, pods: dict[str, int], client: str, script: Path,
                         url: str, seconds: int) -> dict[str, Any]:
    """The same ten connections without the pause: CPU per request when hot."""
    before = {node: user_system(pid) for node, pid in pods.items()}
    n = max(_wrk(cluster, client, script, url, seconds, paced=False)["requests"], 1)
    run: dict[str, Any] = {"requests_per_s": round(n / seconds)}
    for node, pid in pods.items():
        u1, s1 = user_system(pid)
        run[node] = {"user": round((u1 - before[node][0]) / n * 1e6, 1),
                     "system": round((s1 - before[node][1]) / n * 1e6, 1)}
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.pacedprofile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default="direct,splice,l7")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--strace-seconds", type=int, default=3)
    args = parser.parse_args(argv)
    only = tuple(x for x in args.only.split(",") if x)
    if not 1 <= args.seconds <= 60 or not set(only) <= {"direct", "splice", "l7"}:
        parser.error("--seconds 1..60, --only of direct,splice,l7")
    out = args.out or Path(tempfile.mkdtemp(prefix="nodeproxy-pacedprofile-"))
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(2, mtls=True) as cluster:
        build(cluster)
        cluster.start_daemons()
        report = profile(cluster, args.seconds, out, only, args.perf, args.strace_seconds,
                         args.runs)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"raw files in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())

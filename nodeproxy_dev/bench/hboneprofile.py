"""Where the HBONE data path's CPU goes: a profile of both daemons under one iperf3 stream,
or per round trip of a small-message ping-pong.

Run as ``python -m nodeproxy_dev.bench.hboneprofile [--seconds S] [--streams N] [--out DIR]
[--load bulk|pingpong|http]`` (root; hold /work/bench.lock or the machine's equivalent, it loads
both cores).  One testbed cluster (two nodes, mTLS), a meshed client on node0 and a server
pod on node1 behind a service: every byte goes client -> node0's daemon -> HBONE -> node1's
daemon -> server.

- ``bulk`` (default): while iperf3 runs, py-spy (``--native``, folded stacks) samples both
  daemons; printed: the throughput iperf3 measured and each daemon's busy share and
  functions with the largest inclusive share of its busy samples (connprofile's format).
- ``pingpong``: sockperf ping-pong (64-byte messages, one connection) three times: once
  plain (round-trip percentiles and each daemon's CPU µs per round trip), once under py-spy
  (as above), once under ``strace -c -f`` on both daemons (system calls per round trip,
  by name: ``epoll_wait`` calls are event-loop turns that waited, ``write``/``sendto`` the
  sends, a TLS record per send on the tunnel side).
- ``http``: wrk (one thread, 32 keep-alive connections, the bench's saturated run) against
  nginx serving a 1 KiB file, relayed through L4 over HBONE: each daemon's CPU µs per
  request (user, system) unprofiled (``--runs N`` times), then (unless ``--cpu-only``)
  py-spy on both daemons, then ``strace -c -f`` (system calls per request); ``--perf``
  adds one wrk run under ``perf record -g`` on both daemons (self shares by shared object
  and symbol: how much is the interpreter, the compiled group, uvloop, OpenSSL, the kernel).

Bounded: iperf3 and py-spy have timeouts; the cluster is torn down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeproxy_dev.bench import sockperf
from nodeproxy_dev.bench.procstat import user_system
from nodeproxy_dev.bench.profile_reading import (
    SAMPLE_RATE,
    folded_shares,
    perf_around,
    py_spy,
    strace_counts,
)
from nodeproxy_dev.bench.topology import BENCH_LIMITS
from nodeproxy_dev.testbed import nginx
from nodeproxy_dev.testbed.cluster import Cluster

PORT = 5201
PINGPONG_PORT = 11111
MESSAGE = 64
PACED_RATE = 1000
HTTP_PORT = 8080
HTTP_BODY = 1024
HTTP_CONNECTIONS = 32
IDLE_SECONDS = 4
TOP = 30
_OBSERVATIONS = re.compile(r"Total\s+(\d+)\s+observations")


def build(cluster: Cluster) -> None:
    cluster.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
    cluster.add_pod("node1", "server", labels={"app": "server"}, service_account="server")
    cluster.add_service("iperf", port=PORT, target_port=PORT, selector={"app": "server"})
    cluster.add_service("sockperf", port=PINGPONG_PORT, target_port=PINGPONG_PORT,
                        selector={"app": "server"})
    # appProtocol tcp: relayed as bytes, as the bench's nodeproxy-splice (not parsed).
    cluster.add_service("web", port=HTTP_PORT, target_port=HTTP_PORT,
                        selector={"app": "server"}, app_protocol="tcp")
    # The direct baseline of the ping-pong: the same tools in two pods outside the mesh.
    cluster.add_unenrolled_pod("node0", "client-direct", labels={"app": "client-direct"})
    cluster.add_unenrolled_pod("node1", "plain", labels={"app": "plain"})
    cluster.write_configs(overrides=BENCH_LIMITS)


def _pingpong(cluster: Cluster, vip: str, seconds: int, mps: int | None = None,
              client: str = "client") -> subprocess.Popen[str]:
    paced = [] if mps is None else ["--mps", str(mps)]
    return cluster.spawn_in_pod(client, [
        "sockperf", "ping-pong", "--tcp", "-i", vip, "-p", str(PINGPONG_PORT), "-m",
        str(MESSAGE), "-t", str(seconds), "--full-rtt", *paced], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _observations(output: str) -> int:
    found = _OBSERVATIONS.search(re.sub(r"\x1b\[[0-9;]*m", "", output))
    return int(found.group(1)) if found else 0


def profile_pingpong(cluster: Cluster, seconds: int, out: Path) -> dict[str, Any]:
    """Per round trip of a small-message ping-pong: CPU, py-spy shares, system calls."""
    for pod in ("server", "plain"):
        cluster.serve(pod, ["sockperf", "server", "--tcp", "-p", str(PINGPONG_PORT)],
                      PINGPONG_PORT)
    vip = cluster.services["default/sockperf"].vip4
    assert vip is not None
    cluster.run_in_pod("client", ["sockperf", "ping-pong", "--tcp", "-i", vip, "-p",
                                  str(PINGPONG_PORT), "-t", "1"], timeout=30)  # warm-up
    pids = {node: cluster.nodes[node].daemon.pid for node in ("node0", "node1")}  # type: ignore[union-attr]
    result: dict[str, Any] = {"load": "pingpong", "message": MESSAGE, "seconds": seconds}
    # 0. idle: what the daemons spend with no traffic (it counts in the paced run's CPU per
    # round trip).
    idle = {node: user_system(pid) for node, pid in pids.items()}
    time.sleep(IDLE_SECONDS)
    for node, pid in pids.items():
        after = user_system(pid)
        result[f"{node}_idle_cpu_ms_per_s"] = round(
            (sum(after) - sum(idle[node])) / IDLE_SECONDS * 1e3, 2)
    # 1. plain: latency and CPU per round trip.
    cpu = {node: user_system(pid) for node, pid in pids.items()}
    load = _pingpong(cluster, vip, seconds)
    output, _ = load.communicate(timeout=seconds + 60)
    n = _observations(output)
    result["round_trips"] = n
    result["sockperf"] = sockperf.parse(output) if n else output[-2000:]
    for node, pid in pids.items():
        (user_before, system_before), (user_after, system_after) = cpu[node], user_system(pid)
        user, system = user_after - user_before, system_after - system_before
        result[f"{node}_cpu_us_per_round_trip"] = {
            "user": round(user / max(n, 1) * 1e6, 1),
            "system": round(system / max(n, 1) * 1e6, 1)}
    # 1b. paced at PACED_RATE round trips a second (the processes sleep between them, as
    # at the bench's ~1000 req/s): latency and CPU per round trip.
    cpu = {node: user_system(pid) for node, pid in pids.items()}
    output, _ = _pingpong(cluster, vip, seconds, PACED_RATE).communicate(timeout=seconds + 60)
    paced = _observations(output)
    result["paced"] = {"rate": PACED_RATE, "round_trips": paced,
                       "sockperf": sockperf.parse(output) if paced else output[-2000:]}
    for node, pid in pids.items():
        (user_before, system_before), (user_after, system_after) = cpu[node], user_system(pid)
        result["paced"][f"{node}_cpu_us_per_round_trip"] = {
            "user": round((user_after - user_before) / max(paced, 1) * 1e6, 1),
            "system": round((system_after - system_before) / max(paced, 1) * 1e6, 1)}
    # The same two runs direct (outside the mesh), for the added latency.
    direct = cluster.pods["plain"].ip4
    for key, mps in (("direct_sockperf", None), ("paced_direct_sockperf", PACED_RATE)):
        output, _ = _pingpong(cluster, direct, seconds, mps, "client-direct").communicate(
            timeout=seconds + 60)
        result[key] = sockperf.parse(output) if _observations(output) else output[-2000:]
    # 2. py-spy on both daemons.
    load = _pingpong(cluster, vip, seconds + 2)
    time.sleep(1.0)
    _spy_all(pids, out, seconds, result)
    load.communicate(timeout=seconds + 60)
    # 3. strace -c -f on both daemons around a whole sockperf run (strace slows them; the
    # counts are per round trip sockperf made, all of them while traced).
    result["traced_round_trips"] = _syscalls_all(
        pids, out, seconds, "round_trip", result,
        lambda: _observations(_pingpong(cluster, vip, seconds).communicate(
            timeout=seconds + 60)[0]))
    return result


def _wrk(cluster: Cluster, url: str, seconds: int) -> int:
    """Requests wrk made in one saturated run (0 if it failed)."""
    result = cluster.run_in_pod("client", [
        "wrk", "-t1", f"-c{HTTP_CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", url],
        timeout=seconds + 60, check=False)
    found = re.search(r"(\d+) requests in", result.stdout or "")
    return int(found.group(1)) if found else 0


def profile_http(cluster: Cluster, seconds: int, out: Path, runs: int = 1,
                 cpu_only: bool = False, perf: bool = False) -> dict[str, Any]:
    """Per request of keep-alive HTTP relayed through L4 over HBONE: CPU (``runs`` wrk runs,
    each's figures), then unless ``cpu_only`` py-spy shares and system calls."""
    directory = out / "www"
    (directory / "www").mkdir(parents=True, exist_ok=True)
    (directory / "www" / "small.bin").write_bytes(os.urandom(HTTP_BODY))
    (directory / "nginx.conf").write_text(nginx.nginx_config(
        str(directory), HTTP_PORT, f"root {directory}/www;",
        http="    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
             "    default_type application/octet-stream;\n"))
    cluster.serve("server", nginx.nginx_argv(str(directory)), HTTP_PORT)
    vip = cluster.services["default/web"].vip4
    url = f"http://{vip}:{HTTP_PORT}/small.bin"
    _wrk(cluster, url, 1)  # warm-up: the pooled HBONE connection exists
    pids = {node: cluster.nodes[node].daemon.pid for node in ("node0", "node1")}  # type: ignore[union-attr]
    result: dict[str, Any] = {"load": "http", "connections": HTTP_CONNECTIONS,
                              "seconds": seconds}
    # 1. plain: requests/s and CPU per request (both daemons summed: "total").
    result["runs"] = []
    for _ in range(runs):
        cpu = {node: user_system(pid) for node, pid in pids.items()}
        n = _wrk(cluster, url, seconds)
        run: dict[str, Any] = {"requests": n, "requests_per_s": round(n / seconds)}
        total = 0.0
        for node, pid in pids.items():
            (user_before, system_before), (user_after, system_after) = \
                cpu[node], user_system(pid)
            user, system = user_after - user_before, system_after - system_before
            total += user + system
            run[f"{node}_cpu_us_per_request"] = {
                "user": round(user / max(n, 1) * 1e6, 1),
                "system": round(system / max(n, 1) * 1e6, 1)}
        run["cpu_s_per_1000_requests"] = round(total / max(n, 1) * 1e3, 4)
        result["runs"].append(run)
    if perf:
        result["perf"] = perf_around(pids, out, seconds, lambda: _wrk(cluster, url, seconds),
                                     top=TOP * 2)
    if cpu_only:
        return result
    # 2. py-spy on both daemons.
    load = cluster.spawn_in_pod("client", [
        "wrk", "-t1", f"-c{HTTP_CONNECTIONS}", f"-d{seconds + 2}s", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    _spy_all(pids, out, seconds, result)
    load.wait(timeout=seconds + 60)
    # 3. strace -c -f on both daemons around a whole wrk run.
    result["traced_requests"] = _syscalls_all(pids, out, seconds, "request", result,
                                              lambda: _wrk(cluster, url, seconds))
    return result


def _spy_all(pids: dict[str, int], out: Path, seconds: int, result: dict[str, Any]) -> None:
    """py-spy on every daemon for ``seconds`` while a load runs: each one's shares of its
    samples in result[node] (py-spy's error in result[node + "_py_spy"])."""
    spies = {node: _spy(pid, out / f"{node}.folded", seconds) for node, pid in pids.items()}
    for node, spy in spies.items():
        _, err = spy.communicate(timeout=seconds + 60)
        path = out / f"{node}.folded"
        if spy.returncode:
            result[f"{node}_py_spy"] = err[-2000:]
        result[node] = folded_shares(path.read_text() if path.exists() else "",
                                     SAMPLE_RATE * seconds, top=TOP)


def _syscalls_all(pids: dict[str, int], out: Path, seconds: int, unit: str,
                  result: dict[str, Any], run: Callable[[], int]) -> int:
    """strace -c -f on every daemon around ``run`` (a whole load, returning how many units
    it made; strace slows the daemons, so every unit counted was traced): each daemon's
    system calls per unit in result[node + "_syscalls_per_" + unit].  Returns run's
    count."""
    tracers = {node: subprocess.Popen(
        ["timeout", "-s", "INT", str(seconds + 6), "strace", "-c", "-f", "-p", str(pid),
         "-o", str(out / f"{node}.strace")], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for node, pid in pids.items()}
    time.sleep(1.0)
    done = run()
    for tracer in tracers.values():
        tracer.send_signal(signal.SIGINT)  # strace prints its table on SIGINT
    for tracer in tracers.values():
        tracer.wait(timeout=30)
    per = max(done, 1)
    for node in pids:
        path = out / f"{node}.strace"
        counts = strace_counts(path.read_text() if path.exists() else "")
        result[f"{node}_syscalls_per_{unit}"] = {
            name: round(count / per, 2) for name, count in
            sorted(counts.items(), key=lambda kv: -kv[1]) if count / per >= 0.05}
    return done


def _spy(pid: int, path: Path, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE),
         "--duration", str(seconds), "--native", "--format", "raw", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def profile(cluster: Cluster, seconds: int, streams: int, out: Path) -> dict[str, Any]:
    cluster.serve("server", ["iperf3", "-s", "-p", str(PORT)], PORT)
    vip = cluster.services["default/iperf"].vip4
    assert vip is not None
    # A short warm-up run: the pooled HBONE connection exists before the profile starts.
    cluster.run_in_pod("client", ["iperf3", "-c", vip, "-p", str(PORT), "-t", "1"],
                       timeout=30)
    time.sleep(0.5)
    load = cluster.spawn_in_pod("client", [
        "iperf3", "-c", vip, "-p", str(PORT), "-t", str(seconds + 2), "-P", str(streams),
        "-J", "--connect-timeout", "5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    time.sleep(1.0)
    spies = {}
    for node in ("node0", "node1"):
        path = out / f"{node}.folded"
        pid = cluster.nodes[node].daemon.pid  # type: ignore[union-attr]
        spies[node] = (path, subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE),
             "--duration", str(seconds), "--native", "--format", "raw", "--output",
             str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    result: dict[str, Any] = {"streams": streams, "seconds": seconds}
    for node, (path, spy) in spies.items():
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode:
            result[f"{node}_py_spy"] = err[-2000:]
        result[node] = folded_shares(path.read_text() if path.exists() else "",
                                     SAMPLE_RATE * seconds, top=TOP)
    stdout, _ = load.communicate(timeout=seconds + 60)
    try:
        end = json.loads(stdout)["end"]
        result["gbps"] = end["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        result["iperf3"] = stdout[-2000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.hboneprofile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--load", choices=("bulk", "pingpong", "http"), default="bulk")
    parser.add_argument("--runs", type=int, default=1,
                        help="http: unprofiled wrk runs for the CPU per request")
    parser.add_argument("--cpu-only", action="store_true",
                        help="http: only the CPU per request (no py-spy, no strace)")
    parser.add_argument("--perf", action="store_true",
                        help="http: also perf record -g both daemons under one more wrk run "
                             "(self shares by shared object and symbol)")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 1 <= args.streams <= 64:
        parser.error("--seconds 1..120, --streams 1..64")
    out = args.out or Path(tempfile.mkdtemp(prefix="nodeproxy-hboneprofile-"))
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(2, mtls=True) as cluster:
        build(cluster)
        cluster.start_daemons()
        if args.load == "pingpong":
            report = profile_pingpong(cluster, args.seconds, out)
        elif args.load == "http":
            report = profile_http(cluster, args.seconds, out, args.runs, args.cpu_only,
                                  args.perf)
        else:
            report = profile(cluster, args.seconds, args.streams, out)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"folded stacks in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What sleeping relays cost in CPU when pods keep waking them: a profile, not a benchmark.

Run as ``python -m nodeproxy_dev.bench.trickle [--connections N] [--period P]
[--seconds S] [--splice]`` (root; hold ``/work/bench.lock``).  Builds connprofile's
cluster (its two nodes, the bench's limits), opens N connections from the client pod to
the same-node echo server through node0's daemon, then for S seconds each connection
sends one byte every P seconds (the connections' phases spread evenly) and reads its
echo: a pod that keeps its idle connections just awake enough, or wakes them just after
they fell asleep.  Prints node0's daemon CPU time (user + system) over the S seconds,
per connection-second, the bytes echoed, and the daemon's sleep and wake counts
(relayed, spliced) over the same time.  Run it against two trees to compare.

Bounded: N ≤ 5000, S ≤ 300, every socket has a timeout; the cluster is torn down at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from nodeproxy_dev.bench import procstat
from nodeproxy_dev.bench.connprofile import build
from nodeproxy_dev.bench.rssprofile import sleep_metrics
from nodeproxy_dev.testbed.cluster import Cluster

# The in-pod client: N connections, each greeted once (the peer's ping-pong protocol),
# then one byte per period each, in phases spread over the period.
CLIENT = r"""
import json, selectors, socket, sys, time
host, port, count, period, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), float(sys.argv[5])
socks = []
for _ in range(count):
    s = socket.create_connection((host, port), 10); s.settimeout(10)
    s.sendall(b"Px"); assert s.recv(1) == b"x"
    socks.append(s)
print(json.dumps({"open": len(socks)}), flush=True)
sys.stdin.readline()                      # the profiler has read the counters
start = time.monotonic(); sent = echoed = 0
due = [start + period * i / count for i in range(count)]
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    s.setblocking(False); sel.register(s, selectors.EVENT_READ, i)
while time.monotonic() - start < seconds:
    now = time.monotonic()
    for i, s in enumerate(socks):
        if due[i] <= now:
            s.send(b"t"); sent += 1; due[i] += period
    wait = max(0.0, min(min(due) - time.monotonic(), 0.05))
    for key, _ in sel.select(wait):
        echoed += len(key.fileobj.recv(4096))
deadline = time.monotonic() + 10
while echoed < sent and time.monotonic() < deadline:
    for key, _ in sel.select(0.1):
        echoed += len(key.fileobj.recv(4096))
print(json.dumps({"sent": sent, "echoed": echoed}), flush=True)
"""


def profile(cluster: Cluster, count: int, period: float, seconds: float) -> dict[str, Any]:
    pid = cluster.nodes["node0"].daemon.pid  # type: ignore[union-attr]
    procstat.raise_nofile(pid, 2 * count + 2000)
    vip = cluster.services["default/web-z0"].vip4
    client = cluster.spawn_in_pod("client", [cluster.python, "-c", CLIENT, str(vip), "80",
                                             str(count), str(period), str(seconds)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        opened = json.loads(client.stdout.readline())
        time.sleep(3.0)  # the greetings' relays are quiet (and asleep) when it starts
        before, cpu0 = sleep_metrics(cluster), procstat.cpu_seconds(pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        cpu = procstat.cpu_seconds(pid) - cpu0
        after = sleep_metrics(cluster)
    finally:
        client.kill()
    return {"connections": opened["open"], "period_s": period, "seconds": seconds,
            **result, "daemon_cpu_s": round(cpu, 3),
            "cpu_us_per_byte_echoed": round(cpu / max(result["echoed"], 1) * 1e6, 1),
            "counts": {k: after[k] - before[k] for k in after}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.bench.trickle",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--period", type=float, action="append",
                        help="seconds between a connection's bytes (repeatable: one "
                             "measurement each, in the same cluster)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--splice", action="store_true")
    args = parser.parse_args(argv)
    periods = args.period or [3.05]
    if not 1 <= args.connections <= 5000 or not 1 <= args.seconds <= 300 or any(
            not 0.05 <= p <= 120 for p in periods):
        parser.error("--connections 1..5000, --seconds 1..300, --period 0.05..120")
    procstat.lift_own_nofile(4 * args.connections + 4000)
    with Cluster(2, mtls=True) as cluster:
        build(cluster, "tcp", args.splice)
        cluster.start_daemons()
        reports = [profile(cluster, args.connections, period, args.seconds)
                   for period in periods]
    print(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the HBONE data path's CPU goes: a profile of both daemons under one iperf3 stream.

Run as ``python -m nodeproxy_dev.bench.hboneprofile [--seconds S] [--streams N] [--out DIR]``
(root; hold /work/bench.lock or the machine's equivalent, it loads both cores).  One
testbed cluster (two nodes, mTLS), a meshed client on node0 and an iperf3 server pod on
node1 behind a service: every byte goes client -> node0's daemon -> HBONE -> node1's
daemon -> server.  While iperf3 runs, py-spy (``--native``, folded stacks) samples both
daemons; printed: the throughput iperf3 measured and each daemon's busy share and
functions with the largest inclusive share of its busy samples (connprofile's format).

Bounded: iperf3 and py-spy have timeouts; the cluster is torn down at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nodeproxy_dev.bench.connprofile import SAMPLE_RATE, _py_spy, folded_shares
from nodeproxy_dev.bench.topology import BENCH_LIMITS
from nodeproxy_dev.testbed.cluster import Cluster

PORT = 5201
TOP = 30


def build(cluster: Cluster) -> None:
    cluster.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
    cluster.add_pod("node1", "server", labels={"app": "server"}, service_account="server")
    cluster.add_service("iperf", port=PORT, target_port=PORT, selector={"app": "server"})
    cluster.write_configs(overrides=BENCH_LIMITS)


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
            [_py_spy(), "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE),
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
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 1 <= args.streams <= 64:
        parser.error("--seconds 1..120, --streams 1..64")
    out = args.out or Path(tempfile.mkdtemp(prefix="nodeproxy-hboneprofile-"))
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(2, mtls=True) as cluster:
        build(cluster)
        cluster.start_daemons()
        report = profile(cluster, args.seconds, args.streams, out)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"folded stacks in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

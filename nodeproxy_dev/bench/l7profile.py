"""Profile the node proxy's L7 request path: one simulated node, a meshed client pod, an
nginx backend behind an ``appProtocol: http`` service with nodeproxy-l7's HTTPRoute
(configurations.http_routes), wrk for a bounded time, py-spy sampling the daemon.

``python -m nodeproxy_dev.bench.l7profile OUT [--seconds S] [--config l7|full|authz]``
writes OUT.raw (py-spy's collapsed stacks), OUT.txt (the top functions, self and
inclusive) and prints wrk's summary with the daemon's CPU seconds per 1000 requests.
A development aid, not a benchmark: py-spy's sampling costs the daemon a little.
Needs root and py-spy (``pip install py-spy``).  Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from nodeproxy_dev.bench import configurations, haproxy
from nodeproxy_dev.bench.procstat import cpu_seconds
from nodeproxy_dev.testbed.cluster import Cluster

PORT = 80
APP = 8080


def _overrides(kind: str) -> dict[str, Any]:
    routes = configurations.http_routes()
    for route in routes:
        route["service"] = "web"
        route["name"] = "web-bench"
    routes = routes[:1]
    out: dict[str, Any] = {"fastPath": {"splice": False}, "httpRoutes": routes}
    if kind in ("full", "authz"):
        out["authorizationPolicies"] = [{
            "name": "bench-l7", "namespace": "default", "action": "ALLOW",
            "selector": {"app": "web"},
            "rules": [{"from": [{"source": {"principals": [
                "cluster.local/ns/default/sa/client"]}}],
                "to": [{"operation": {"methods": ["GET"],
                                      "paths": [f"{haproxy.ROUTE_PATH_PREFIX}/*"]}}]}]}]
    if kind == "full":
        rule = routes[0]["rules"][1]
        rule["rateLimit"] = {"requestsPerSecond": 1_000_000, "burst": 1_000_000}
        rule["fault"] = {"headers": [{"name": configurations.FAULT_HEADER, "value": "on"}],
                         "abort": {"httpStatus": 503, "percentage": 100}}
    return out


def summarize(raw: str, top: int = 40) -> str:
    """Self and inclusive share of each function in py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(raw):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [re.sub(r" \((?:.*/)?([^/]+?)(?::\d+)?\)$", r" (\1)", f)
                  for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"samples: {total}", "", "self:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--config", choices=("l7", "full", "authz"), default="l7")
    parser.add_argument("--client", choices=("wrk", "h2load"), default="wrk",
                        help="h2load: HTTP/2 (prior knowledge) from the client, 10 streams "
                             "per connection, for --seconds")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native: C frames (uvloop, llhttp, compiled modules) "
                             "under the Python ones")
    parser.add_argument("--perf", action="store_true",
                        help="also sample the daemon with perf (kernel and native frames): "
                             "OUT.perf")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds must be in [1, 60]")
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web", labels={"app": "web"}, service_account="web")
        c.serve_guarded("web", APP)
        c.add_service("web", port=PORT, target_port=APP, app_protocol="http")
        c.write_configs(overrides=_overrides(args.config))
        c.start_daemons()
        daemon = c.nodes["node0"].daemon
        assert daemon is not None
        url = f"http://{c.services['default/web'].vip4}:{PORT}{haproxy.ROUTE_PATH_PREFIX}/x"
        c.run_in_pod("client", ["curl", "-sf", "-o", "/dev/null", url], timeout=10)
        c.run_in_pod("client", ["wrk", "-t1", "-c", str(args.connections), "-d", "2", url],
                     timeout=30)  # warm-up: pools, caches
        spy = None if args.no_profile else subprocess.Popen(
            [pyspy, "record", "--pid", str(daemon.pid), "--rate", "200",
             "--format", "raw", "-o", args.out + ".raw", "--duration",
             str(int(args.seconds))] + (["--native"] if args.native else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        perf = subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-p", str(daemon.pid), "-o",
             args.out + ".perf", "--", "sleep", str(args.seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if args.perf else None
        cpu0 = cpu_seconds(daemon.pid)
        load = (["h2load", "-t1", "-c", str(args.connections), "-m", "10", "-D",
                 str(int(args.seconds)), url] if args.client == "h2load" else
                ["wrk", "-t1", "-c", str(args.connections), "-d", f"{int(args.seconds)}s", url])
        result = c.run_in_pod("client", load, timeout=args.seconds + 30)
        cpu = cpu_seconds(daemon.pid) - cpu0
        for sampler in (spy, perf):
            if sampler is not None:
                sampler.wait(timeout=30)
    text = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    print(text)
    match = re.search(r"(\d+) requests in", text) or re.search(r"(\d+) succeeded", text)
    if match:
        requests = int(match.group(1))
        print(f"daemon CPU: {cpu:.2f} s for {requests} requests = "
              f"{1000 * cpu / requests:.4f} CPU s per 1000 requests")
    if spy is not None and os.path.exists(args.out + ".raw"):
        summary = summarize(args.out + ".raw")
        with open(args.out + ".txt", "w") as f:
            f.write(summary)
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

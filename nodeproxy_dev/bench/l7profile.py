"""Profile the node proxy's L7 request path: one simulated node, a meshed client pod, an
nginx backend behind an ``appProtocol: http`` service, the daemon set up as the bench's
L7 configuration of that name (configurations.py: its node YAML overrides, the bench's
limits, the service's trafficPolicy, an OTLP receiver where it traces), wrk for a
bounded time, py-spy sampling the daemon.

``python -m nodeproxy_dev.bench.l7profile OUT [--seconds S] [--config l7|full|authz]
[--client wrk|h2load|grpc] [--sampling PERCENT] [--threads] [--paced] [--timeline] [--calls]
[--perf]`` writes OUT.raw
(py-spy's collapsed stacks), OUT.txt (the top functions, self and inclusive) and prints
wrk's summary with the daemon's CPU seconds per 1000 requests.  ``--sampling`` traces
that percentage of requests to the node's OTLP receiver (tracing's cost at 1 % against
0 %); ``--threads`` samples every thread (idle too), each stack under its thread's name,
so the span exporter's share shows beside the event loop's.  ``--paced`` runs the bench's
fixed-rate load instead (wrk -c10, 10 ms between a response and the next request, about
1000 requests/s; ``--connections N`` keeps the rate over N connections) with wrk's
latency percentiles; ``--timeline`` times each request's phases inside the daemon
(l7timeline.py); ``--calls`` counts the event loop's Python function calls per request
under cProfile (OUT.calls.txt), a figure the machine's load does not move.
``--client h2load`` loads the same service with HTTP/2 (prior knowledge, 10 streams per
connection); ``--client grpc`` runs the bench's gRPC unary client (grpcunary.py, 16 calls
in flight, every answer checked) against the grpcio server behind an ``appProtocol:
grpc`` service, ``--calls`` calls (the load is counted, not timed).  ``--perf`` also
prints perf's shares by DSO and by symbol.
A development aid, not a benchmark: py-spy's sampling costs the daemon a little.
Needs root and py-spy (``pip install py-spy``).  Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodeproxy_dev.bench import configurations, grpcload, haproxy, l7timeline, wrk
from nodeproxy_dev.bench.daemon_hook import startup_hook
from nodeproxy_dev.bench.procstat import cpu_seconds
from nodeproxy_dev.bench.profile_reading import SAMPLE_RATE, perf_shares, py_spy
from nodeproxy_dev.bench.topology import (
    BENCH_LIMITS,
    HTTP_VIP_PORT,
    MESH_CLIENT,
    MESH_CLIENT_ACCOUNT,
    OTLP_PORT,
    server_pod,
    service_name,
    wait_listening,
)
from nodeproxy_dev.bench.vocabulary import ServerKind
from nodeproxy_dev.testbed.cluster import Cluster, deep_merge

# The bench's names (configurations.py's routes and policies refer to them): node0's
# meshed server pod and its HTTP service, and the meshed client.
SERVICE = service_name("node0", ServerKind.HTTP)
SERVER = server_pod("node0", meshed=True)
PORT = HTTP_VIP_PORT
APP = ServerKind.HTTP.port
# --client grpc: the bench's gRPC service (always appProtocol grpc) and its server's port.
GRPC_SERVICE = service_name("node0", ServerKind.GRPC)
GRPC_PORT = ServerKind.GRPC.port
GRPC_WARMUP_CALLS = 2000
# --paced: the bench's fixed-rate load (wrk.py: FIXED_RATE requests/s, by default over
# FIXED_RATE_CONNECTIONS connections, each pausing connections * 1000 / FIXED_RATE ms).
PACED_CONNECTIONS = wrk.FIXED_RATE_CONNECTIONS
# --config NAME: the bench configuration of that name, set up as the bench does.
PROFILED: dict[str, configurations.NodeProxyL7] = {
    "l7": configurations.NodeProxyL7(), "full": configurations.NodeProxyL7Full(),
    "authz": configurations.NodeProxyL7Authz()}


def overrides(config: configurations.NodeProxyL7) -> dict[str, Any]:
    """The node YAML overrides of the bench configuration (the bench's limits, then the
    configuration's own), its routes cut to the one service this harness builds."""
    out = deep_merge(BENCH_LIMITS, config.daemon_overrides())
    out["httpRoutes"] = [r for r in out.get("httpRoutes", []) if r["service"] == SERVICE]
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
    parser.add_argument("--connections", type=int,
                        help="wrk's connections (default 32; with --paced 10)")
    parser.add_argument("--config", choices=tuple(PROFILED), default="l7",
                        help="l7: nodeproxy-l7, full: nodeproxy-l7-full (its tracing "
                             "exported to an OTLP receiver in the node), authz: "
                             "nodeproxy-l7-authz; as the bench sets them up")
    parser.add_argument("--client", choices=("wrk", "h2load", "grpc"), default="wrk",
                        help="h2load: HTTP/2 (prior knowledge) from the client, 10 streams "
                             "per connection, for --seconds; grpc: the bench's gRPC unary "
                             "client, --grpc-calls calls, 16 in flight")
    parser.add_argument("--grpc-calls", type=int, default=20000,
                        help="with --client grpc: calls in the measured run")
    parser.add_argument("--sampling", type=float, metavar="PERCENT",
                        help="trace this percentage of requests instead of the "
                             "configuration's (turns tracing on, to the node's OTLP "
                             "receiver, where the configuration has none)")
    parser.add_argument("--threads", action="store_true",
                        help="py-spy --threads --idle: every thread's samples (the span "
                             "exporter's too, waiting or not), each stack under its thread")
    parser.add_argument("--paced", action="store_true",
                        help="the bench's fixed-rate load instead of saturation: wrk -c10, "
                             "each connection pausing 10 ms between a response and its next "
                             "request (about 1000 requests/s); prints wrk's latency "
                             "percentiles")
    parser.add_argument("--timeline", action="store_true",
                        help="time each request's phases inside the daemon (l7timeline.py: "
                             "its own part, the upstream's, the pause between requests) "
                             "and print their percentiles")
    parser.add_argument("--calls", action="store_true",
                        help="the event loop under cProfile during the run: Python function "
                             "calls per request, exact whatever the machine's load "
                             "(OUT.calls.txt)")
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
    connections = args.connections or (PACED_CONNECTIONS if args.paced else 32)
    pyspy = None if args.no_profile else py_spy()  # said before the cluster is built
    config = PROFILED[args.config]
    settings = overrides(config)
    if args.sampling is not None:
        if not 0 <= args.sampling <= 100:
            parser.error("--sampling must be in [0, 100]")
        settings["tracing"] = {**settings.get("tracing", {}), "enabled": True,
                               "samplingPercent": args.sampling,
                               "endpoint": f"http://127.0.0.1:{OTLP_PORT}/v1/traces"}
    hooks = contextlib.ExitStack()
    timeline_dir = Path(args.out + ".timeline")
    if args.timeline and args.calls:
        parser.error("--timeline and --calls both use SIGUSR2: one at a time")
    if args.calls:
        timeline_dir.mkdir(parents=True, exist_ok=True)
        hooks.enter_context(startup_hook(timeline_dir, l7timeline.CALLS_SITECUSTOMIZE,
                                         l7timeline.CALLS_VARIABLE,
                                         str(timeline_dir.resolve())))
    if args.timeline:
        timeline_dir.mkdir(parents=True, exist_ok=True)
        hooks.enter_context(startup_hook(timeline_dir, l7timeline.SITECUSTOMIZE,
                                         l7timeline.VARIABLE, str(timeline_dir.resolve())))
    with hooks, Cluster(1) as c:
        c.add_pod("node0", MESH_CLIENT, labels={"app": "client"},
                  service_account=MESH_CLIENT_ACCOUNT)
        c.add_pod("node0", SERVER, labels={"app": "srv0"}, service_account="server")
        c.serve_guarded(SERVER, APP)
        if args.client == "grpc":
            c.spawn_in_pod(SERVER, [c.python, "-m", grpcload.MODULE, "serve", "--port",
                                    str(GRPC_PORT)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            c.add_service(GRPC_SERVICE, port=GRPC_PORT, target_port=GRPC_PORT,
                          selector={"app": "srv0"}, app_protocol="grpc")
        c.add_service(SERVICE, port=PORT, target_port=APP, selector={"app": "srv0"},
                      app_protocol=config.http_app_protocol,
                      traffic_policy=config.http_traffic_policy)
        if settings.get("tracing", {}).get("enabled"):  # where the bench's receiver is
            c.spawn_in_node("node0", c.tool_argv("otlp_receiver", "--port", str(OTLP_PORT),
                                                 "--out", "/dev/null"),
                            stdout=subprocess.DEVNULL)
            wait_listening(c.nodes["node0"].netns_path, OTLP_PORT)
        c.write_configs(overrides=settings)
        c.start_daemons()
        daemon = c.nodes["node0"].daemon
        assert daemon is not None
        url = (f"http://{c.services[f'default/{SERVICE}'].vip4}:{PORT}"
               f"{haproxy.ROUTE_PATH_PREFIX}/x")
        c.run_in_pod(MESH_CLIENT, ["curl", "-sf", "-o", "/dev/null", url], timeout=10,
                     check=True)
        grpc_target = f"{c.services[f'default/{GRPC_SERVICE}'].vip4}:{GRPC_PORT}" \
            if args.client == "grpc" else ""

        def grpc_call(calls: int) -> list[str]:
            return [c.python, "-m", grpcload.MODULE, "call", grpc_target, "--calls",
                    str(calls), "--concurrency", "16"]

        if args.client == "grpc":
            wait_listening(c.pods[SERVER].netns_path, GRPC_PORT)
            c.run_in_pod(MESH_CLIENT, grpc_call(GRPC_WARMUP_CALLS), timeout=120, check=True)
        else:
            c.run_in_pod(MESH_CLIENT, ["wrk", "-t1", "-c", str(connections), "-d", "2", url],
                         timeout=30)  # warm-up: pools, caches
        spy = None if pyspy is None else subprocess.Popen(
            [pyspy, "record", "--pid", str(daemon.pid), "--rate", str(SAMPLE_RATE),
             "--format", "raw", "-o", args.out + ".raw", "--duration",
             str(int(args.seconds))] + (["--native"] if args.native else [])
            + (["--threads", "--idle"] if args.threads else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        perf = subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-p", str(daemon.pid), "-o",
             args.out + ".perf", "--", "sleep", str(args.seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if args.perf else None
        cpu0 = cpu_seconds(daemon.pid)
        paced = []
        if args.paced:
            script = Path(args.out + ".paced.lua")
            pace_ms = connections * 1000 / wrk.FIXED_RATE
            script.write_text(f"delay = function() return {pace_ms:g} end\n")
            paced = ["--latency", "-s", str(script.resolve())]
        if args.timeline or args.calls:  # the warm-up's figures are not the run's
            os.kill(daemon.pid, signal.SIGUSR2)
        load = (["h2load", "-t1", "-c", str(connections), "-m", "10", "-D",
                 str(int(args.seconds)), url] if args.client == "h2load" else
                grpc_call(args.grpc_calls) if args.client == "grpc" else
                ["wrk", "-t1", "-c", str(connections),
                 "-d", f"{int(args.seconds)}s", *paced, url])
        result = c.run_in_pod(MESH_CLIENT, load, timeout=args.seconds + 120)
        cpu = cpu_seconds(daemon.pid) - cpu0
        for sampler in (spy, perf):
            if sampler is not None:
                sampler.wait(timeout=30)
        if args.calls:
            os.kill(daemon.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not list(timeline_dir.glob("calls-*.prof")) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # written whole by now
        if args.timeline:
            for dump in timeline_dir.glob("timeline-*.json"):
                dump.unlink()
            os.kill(daemon.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not list(timeline_dir.glob("timeline-*.json")) and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
    text = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    print(text)
    requests = 0
    if args.client == "grpc":
        report = json.loads(text.strip().splitlines()[-1])
        why = grpcload.problem(report, args.grpc_calls)
        if why:
            print(why, file=sys.stderr)
            return 1
        requests = int(report["ok"])
    else:
        match = re.search(r"(\d+) requests in", text) or re.search(r"(\d+) succeeded", text)
        requests = int(match.group(1)) if match else 0
    if requests:
        print(f"daemon CPU: {cpu:.2f} s for {requests} requests = "
              f"{1000 * cpu / requests:.4f} CPU s per 1000 requests")
        for dump in timeline_dir.glob("calls-*.prof") if args.calls else ():
            summary = l7timeline.calls_summary(dump, requests)
            Path(args.out + ".calls.txt").write_text(summary)
            print(summary)
    for dump in timeline_dir.glob("timeline-*.json") if args.timeline else ():
        time.sleep(0.2)  # written whole by now
        print(l7timeline.summarize(dump))
    if perf is not None and os.path.exists(args.out + ".perf"):
        for sort in ("dso", "dso,sym"):
            rows = perf_shares(Path(args.out + ".perf"), sort, 0.5, 40)
            text = "\n".join(f"{share:5.1f}%  {name}" for name, share in rows)
            Path(f"{args.out}.perf-{sort.replace(',', '-')}.txt").write_text(text + "\n")
            print(f"perf, self by {sort}:\n{text}\n")
    if spy is not None and os.path.exists(args.out + ".raw"):
        summary = summarize(args.out + ".raw")
        with open(args.out + ".txt", "w") as f:
            f.write(summary)
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

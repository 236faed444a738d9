"""Benchmark nodeproxy against a direct connection and HAProxy on a simulated two-node cluster.

Builds the cluster once (mTLS on), then alternates the configurations (direct,
nodeproxy at L4, haproxy in tcp mode, and for HTTP nodeproxy-l7 and haproxy in http
mode) over the rounds for L4 latency (sockperf), L4 throughput (iperf3), HTTP at
saturation and at ~1000 req/s (wrk + nginx, with proxy CPU per request, requests
per proxy core, memory and the latency added) and connection set-up rate, then
measures memory with idle connections, enrollment of many pods and a noisy
neighbour (a quiet pod's HTTP while another pod attacks the same proxy).  Prints a
markdown table; --json writes every figure, the configurations, the rounds and the
machine.  Exits 1 if any figure that should have been measured was not (each
missing one is listed with the reason).
Needs root.  --quick is the CI profile (about 2 minutes); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="short runs, 1 round, 300 idle connections, 20 pods (CI)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the alternated configurations (default: 1 quick, 5 full)")
    parser.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the markdown table")
    parser.add_argument("--only", metavar="TEXT",
                        help="run only the scenario named TEXT, or if none is, those whose name "
                             "contains TEXT; several comma-separated (e.g. latency, "
                             "'throughput same-node', 'http2,grpc', 'connect same-node'); for "
                             "investigating, not for the README")
    parser.add_argument("--configuration", action="append", metavar="NAME",
                        help="measure only this configuration (repeatable; also the optional "
                             "ones, e.g. nodeproxy-l7-authz-trusted)")
    parser.add_argument("--startup-timeout", type=float, default=120.0,
                        help="seconds to wait for each daemon's /ready (default 120)")


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    Path(path).write_text(text)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("nodeproxy bench: needs root (network namespaces, cgroups, eBPF)",
              file=sys.stderr)
        return 2
    from nodeproxy_dev.bench import report, settings
    from nodeproxy_dev.bench.suite import Suite

    try:
        chosen = settings.choose(args.quick, args.rounds)
    except ValueError as e:
        print(f"nodeproxy bench: {e}", file=sys.stderr)
        return 2
    configurations = None
    if args.configuration:
        from nodeproxy_dev.bench.configurations import by_names
        try:
            configurations = by_names(args.configuration)
        except ValueError as e:
            print(f"nodeproxy bench: --configuration: {e}", file=sys.stderr)
            return 2
    doc = Suite(chosen, configurations, startup_timeout=args.startup_timeout,
                only=args.only).run()
    table = report.markdown(doc)
    if args.json:
        _write(args.json, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    if args.markdown:
        _write(args.markdown, table)
    sys.stdout.write(table)
    sys.stdout.flush()
    shown = 10
    for item in doc["missing"][:shown]:
        print(f"nodeproxy bench: no figure for {item['metric']} / {item['configuration']}: "
              f"{item['reason']}", file=sys.stderr)
    if len(doc["missing"]) > shown:
        print(f"nodeproxy bench: ... and {len(doc['missing']) - shown} more figures missing "
              "(all are listed in the JSON)", file=sys.stderr)
    for error in doc["errors"]:
        print(f"nodeproxy bench: {error}", file=sys.stderr)
    return 0 if doc["ok"] else 1

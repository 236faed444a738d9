"""Print a running daemon's live figures once: per workload and per HTTP route, success
rate, requests per second, p50/p95/p99 latency, TCP connections and bytes.

Reads GET /stats/live on the daemon's admin API (run it where that address is
reachable: the node's network namespace).  Exits 1 with a message naming the address
if the daemon does not answer.  See `nodeproxy top` for a refreshing view.
"""

from __future__ import annotations

import argparse
import json
import sys

from nodeproxy.cli.live_view import AdminUnreachable, add_common_arguments, fetch, render, select


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        document = select(fetch(args.admin, args.window, args.namespace), args.by)
    except AdminUnreachable as e:
        print(f"nodeproxy stat: {e}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2) if args.json else render(document, args.by))
    return 0

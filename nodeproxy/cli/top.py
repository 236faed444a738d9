"""Show a running daemon's live figures, refreshed every few seconds (like `linkerd viz
top`/`stat -w`): per workload and per HTTP route, success rate, requests per second,
p50/p95/p99 latency, TCP connections and bytes.

On a terminal it redraws in place on the alternate screen until Ctrl-C; otherwise (or
with --json, one JSON document per line) it prints one view per refresh.  --count N
stops after N views.  Exits 1 with a message naming the address if the daemon's admin
API does not answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nodeproxy.cli.live_view import AdminUnreachable, add_common_arguments, fetch, render, select

ENTER, LEAVE, HOME = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between refreshes (default %(default)s)")
    parser.add_argument("--count", type=int, default=0,
                        help="stop after this many refreshes (default 0: until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("nodeproxy top: --interval must be positive", file=sys.stderr)
        return 2
    screen = sys.stdout.isatty() and not args.json
    out = sys.stdout
    if screen:
        out.write(ENTER)
    shown = 0
    try:
        while True:
            document = select(fetch(args.admin, args.window, args.namespace), args.by)
            if args.json:
                out.write(json.dumps(document, separators=(",", ":")) + "\n")
            else:
                stamp = time.strftime("%H:%M:%S")
                view = f"nodeproxy top - {stamp}, every {args.interval:g}s " \
                       f"(Ctrl-C quits)\n\n{render(document, args.by)}\n"
                out.write(HOME + view if screen else view + "\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except AdminUnreachable as e:
        if screen:
            out.write(LEAVE)
            screen = False
        print(f"nodeproxy top: {e}", file=sys.stderr)
        return 1
    finally:
        if screen:
            out.write(LEAVE)
            out.flush()

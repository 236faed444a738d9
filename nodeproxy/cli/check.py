"""Check that this node's kernel and tools can run nodeproxy (tries each eBPF feature and
the iptables capture rules).

Prints one PASS/FAIL line per check and a summary naming the capture modes this node
supports; exits 1 if it supports none. `nodeproxy run` performs the checks its
capture mode needs before it starts and refuses to start with the same FAIL lines.
"""

from __future__ import annotations

import argparse
import sys

from nodeproxy.capture import preflight
from nodeproxy.ports import OUTBOUND_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the results as a JSON list instead of text lines")
    parser.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT,
                        help="outbound listener port the capture program is compiled with "
                             "(default %(default)s)")


def run(args: argparse.Namespace) -> int:
    results = preflight.run_checks(outbound_port=args.outbound_port)
    if args.json:
        print(preflight.to_json(results))
    else:
        for line in preflight.report_lines(results):
            print(line)
    sys.stdout.flush()
    return 1 if preflight.essential_failures(results) else 0

"""Unenroll a pod from a running daemon (what the CNI plugin does on DEL)."""

from __future__ import annotations

import argparse
import json
import sys

from nodeproxy.admin.control_client import DEFAULT_SOCKET, request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="daemon control socket")
    parser.add_argument("--name", required=True)
    parser.add_argument("--namespace", default="default")


def run(args: argparse.Namespace) -> int:
    try:
        status, data = request(args.socket, "DELETE", f"/v1/pods/{args.namespace}/{args.name}")
    except OSError as e:
        print(f"nodeproxy unenroll: cannot reach the daemon at {args.socket}: {e}",
              file=sys.stderr)
        return 1
    print(json.dumps(data))
    return 0 if status in (200, 404) else 1

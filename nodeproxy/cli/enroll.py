"""Enroll a pod in a running daemon (what the CNI plugin does on ADD)."""

from __future__ import annotations

import argparse
import json
import sys

from nodeproxy.admin.control_client import DEFAULT_SOCKET, request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="daemon control socket")
    parser.add_argument("--name", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--service-account", default="default")
    parser.add_argument("--netns", required=True, help="path of the pod's network namespace")
    parser.add_argument("--cgroup", required=True, help="the pod's cgroup v2 directory")
    parser.add_argument("--ip", action="append", required=True, dest="ips",
                        help="pod IP (repeat for each)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"nodeproxy enroll: --label {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        labels[key] = value
    body = {
        "name": args.name, "namespace": args.namespace,
        "serviceAccount": args.service_account, "netns": args.netns,
        "cgroup": args.cgroup, "ips": args.ips, "labels": labels,
    }
    try:
        status, data = request(args.socket, "POST", "/v1/pods", body)
    except OSError as e:
        print(f"nodeproxy enroll: cannot reach the daemon at {args.socket}: {e}",
              file=sys.stderr)
        return 1
    print(json.dumps(data))
    return 0 if status == 200 else 1

"""Run the node daemon: capture enrolled pods' traffic and proxy it.

Refuses to start, with the same lines `nodeproxy check` prints, when this
machine lacks what the daemon needs; refuses a config that does not validate,
naming file, line and field.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="node policy YAML file")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from nodeproxy.capture import preflight

    # The checks that need no compiling; the daemon compiles and loads the real
    # programs next, and a kernel that refuses them fails there with bcc's reason.
    quick = [
        preflight.check_privileges(),
        preflight.check_kernel_version(),
        preflight.check_bcc()[0],
        preflight.check_kernel_headers(),
        preflight.check_cgroup2(),
        preflight.check_bpffs(),
    ]
    failures = preflight.essential_failures(quick)
    if failures:
        print("nodeproxy run: this machine cannot run the daemon:", file=sys.stderr)
        for result in failures:
            print(preflight.format_result(result), file=sys.stderr)
        return 1

    from nodeproxy.config.loader import ConfigError, load_config

    try:
        loaded = load_config(args.config, check_environment=True)
    except ConfigError as e:
        print(f"nodeproxy run: refusing configuration {args.config}:", file=sys.stderr)
        print(str(e), file=sys.stderr)
        return 1

    import uvloop

    from nodeproxy.daemon import Daemon

    uvloop.run(Daemon(loaded).serve())
    return 0

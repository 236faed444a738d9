"""Run the node daemon: capture enrolled pods' traffic and proxy it.

Refuses to start, with the same lines `nodeproxy check` prints, when this machine
lacks what every capture mode needs (privileges); refuses a config that does not
validate, naming file, line and field; then refuses, the same way, when the machine
lacks what the configured capture mode (capture.mode) needs.
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
    from nodeproxy.config.loader import ConfigError, load_config

    privileges = preflight.check_privileges()
    if not privileges.ok:
        print("nodeproxy run: this machine cannot run the daemon:", file=sys.stderr)
        print(preflight.format_result(privileges), file=sys.stderr)
        return 1
    try:
        loaded = load_config(args.config, check_environment=True)
    except ConfigError as e:
        print(f"nodeproxy run: refusing configuration {args.config}:", file=sys.stderr)
        print(str(e), file=sys.stderr)
        return 1

    failures = preflight_failures(loaded.config.capture.mode)
    if failures:
        print(f"nodeproxy run: this machine cannot run the daemon in capture mode "
              f"{loaded.config.capture.mode}:", file=sys.stderr)
        for line in failures:
            print(line, file=sys.stderr)
        return 1

    import uvloop

    from nodeproxy.daemon import Daemon

    uvloop.run(Daemon(loaded).serve())
    return 0


def preflight_failures(mode: str) -> list[str]:
    """The FAIL lines of the other checks this capture mode needs, among those that need no
    compiling (ebpf: the daemon's loading child compiles and loads the real programs next,
    and a kernel that refuses them fails there with bcc's reason)."""
    from nodeproxy.capture import preflight

    if mode == "ebpf":
        quick = [
            preflight.check_kernel_version(),
            preflight.check_netns_cookie_sockopt(),
            preflight.check_bcc_findable(),  # never imported here: no LLVM in the daemon
            preflight.check_kernel_headers(),
            preflight.check_cgroup2(),
            preflight.check_bpffs(),
        ]
    else:
        quick = [preflight.check_cgroup2(), preflight.check_iptables()]
    return [preflight.format_result(r) for r in preflight.essential_failures(quick, mode)]

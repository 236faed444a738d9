"""Check a node policy file and report every problem with file:line.

Exit status: 0 valid, 1 invalid (each problem on stderr, one per line),
2 usage error or a file that cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from nodeproxy.config.loader import ConfigError, ConfigReadError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="node policy YAML file")
    parser.add_argument(
        "--environment",
        action="store_true",
        help="also check this machine: local workloads' netns and cgroup paths, node.podCgroup",
    )


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.file, check_environment=args.environment)
    except ConfigReadError as e:
        _print_problems(e)
        return 2
    except ConfigError as e:
        _print_problems(e)
        return 1
    config = loaded.config
    print(
        f"{args.file}: valid ({len(config.workloads)} workloads, "
        f"{len(config.services)} services)"
    )
    return 0


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(problem, file=sys.stderr)

"""`nodeproxy` entry point: builds the argument parser from the subcommand modules."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `add_arguments(parser)` and `run(args) -> int`; its
# docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "run": "nodeproxy.cli.run",
    "ca": "nodeproxy.cli.ca",
    "check": "nodeproxy.cli.check",
    "validate": "nodeproxy.cli.validate",
    "demo": "nodeproxy.cli.demo",
    "enroll": "nodeproxy.cli.enroll",
    "unenroll": "nodeproxy.cli.unenroll",
    "uninstall": "nodeproxy.cli.uninstall",
    "bench": "nodeproxy.cli.bench",
    "stat": "nodeproxy.cli.stat",
    "top": "nodeproxy.cli.top",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeproxy", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        help_line = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=help_line, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`nodeproxy` entry point: builds the argument parser from the subcommand modules."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Each module defines `add_arguments(parser)` and `run(args) -> int`; its
# docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "run": "nodeproxy.cli.run",
    "ca": "nodeproxy.cli.ca",
    "check": "nodeproxy.cli.check",
    "validate": "nodeproxy.cli.validate",
    "enroll": "nodeproxy.cli.enroll",
    "unenroll": "nodeproxy.cli.unenroll",
    "uninstall": "nodeproxy.cli.uninstall",
    "stat": "nodeproxy.cli.stat",
    "top": "nodeproxy.cli.top",
}


# The development checkout adds `demo` and `bench` (package nodeproxy_dev, which the
# image and an installed daemon do not carry); this is the runtime's only reference to it.
DEV_SUBCOMMANDS_PACKAGE = "nodeproxy_dev.cli"


def subcommands() -> dict[str, str]:
    """Subcommand name -> module: the runtime's, plus the development ones if present."""
    found = dict(SUBCOMMANDS)
    if importlib.util.find_spec(DEV_SUBCOMMANDS_PACKAGE.split(".")[0]) is not None:
        found.update(importlib.import_module(DEV_SUBCOMMANDS_PACKAGE).SUBCOMMANDS)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeproxy", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in subcommands().items():
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

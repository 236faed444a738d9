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


def subcommands(command: str | None = None) -> dict[str, str]:
    """Subcommand name -> module: the runtime's, plus the development ones if present
    (not looked for when `command` is one of the runtime's: `nodeproxy run` never imports
    nodeproxy_dev)."""
    found = dict(SUBCOMMANDS)
    if command in SUBCOMMANDS:
        return found
    if importlib.util.find_spec(DEV_SUBCOMMANDS_PACKAGE.split(".")[0]) is not None:
        found.update(importlib.import_module(DEV_SUBCOMMANDS_PACKAGE).SUBCOMMANDS)
    return found


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's module is imported (the others
    are names without options or help), so a daemon does not carry every other
    subcommand's imports (the CA's signing service, the CNI installer, ...) for its life.
    Without it (no subcommand, --help), every module is imported for its help line."""
    parser = argparse.ArgumentParser(prog="nodeproxy", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in subcommands(command).items():
        if command is not None and name != command:
            subparsers.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        help_line = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=help_line, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Install nodeproxy-cni on a node: the plugin binary and its entry in the chained config.

This is what the DaemonSet's init container runs (``python -m nodeproxy.cni.install``)
with the host's CNI directories mounted:

1. the plugin, packed as one zipapp (this package, the control-socket client
   and a ``__main__``) with a ``#!/usr/bin/env python3`` line, is written
   atomically to ``<bin-dir>/nodeproxy-cni``.  The node's own python3 runs it
   (3.9 or newer; no packages needed).  The archive carries a marker member
   (``nodeproxy-cni.json``), which is how ``nodeproxy uninstall`` knows a binary
   was installed here and may be removed;
2. an entry ``{"type": "nodeproxy-cni", ...}`` is chained at the end of the
   primary network configuration (see ``conflist``), waiting up to ``--wait``
   seconds for the primary CNI plugin to write one.

Both steps are idempotent.  ``nodeproxy uninstall --cni-conf-dir --cni-bin-dir``
undoes them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import nodeproxy
from nodeproxy.cni import conflist
from nodeproxy.cni.netconf import DEFAULT_CONTROL_SOCKET

BINARY_NAME = "nodeproxy-cni"
MARKER = "nodeproxy-cni.json"
DEFAULT_INTERPRETER = "/usr/bin/env python3"
_MAIN = "import sys\nfrom nodeproxy.cni.plugin import main\nsys.exit(main())\n"


def _sources() -> dict[str, Path]:
    """Archive name -> source file of every module the plugin imports."""
    root = Path(nodeproxy.__file__).resolve().parent
    files = {"nodeproxy/__init__.py": root / "__init__.py",
             "nodeproxy/cli/__init__.py": root / "cli" / "__init__.py",
             "nodeproxy/cli/control_client.py": root / "cli" / "control_client.py"}
    for path in sorted((root / "cni").glob("*.py")):
        files[f"nodeproxy/cni/{path.name}"] = path
    return files


def build_zipapp(interpreter: str = DEFAULT_INTERPRETER) -> bytes:
    """The plugin as one executable file: a shebang line, then a zip archive."""
    buffer = io.BytesIO()
    buffer.write(f"#!{interpreter}\n".encode())
    members = {"__main__.py": _MAIN.encode()}
    members.update((name, path.read_bytes()) for name, path in _sources().items())
    members[MARKER] = json.dumps({"installedBy": "nodeproxy.cni.install",
                                  "version": nodeproxy.__version__}).encode()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            # A fixed timestamp: the same sources give the same bytes, so a
            # re-install that changes nothing leaves the file alone.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def installed_by_us(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a plugin archive this installer wrote (it has the marker)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return MARKER in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def install_binary(bin_dir: str | os.PathLike[str],
                   interpreter: str = DEFAULT_INTERPRETER) -> tuple[Path, bool]:
    """Write <bin_dir>/nodeproxy-cni (mode 0755); (its path, whether it changed)."""
    target = Path(bin_dir) / BINARY_NAME
    content = build_zipapp(interpreter)
    try:
        if target.read_bytes() == content:
            return target, False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{BINARY_NAME}.tmp{os.getpid()}")
    tmp.write_bytes(content)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target, True


def plugin_entry(control_socket: str = DEFAULT_CONTROL_SOCKET, fail_open: bool = False,
                 exclude_namespaces: list[str] | None = None,
                 log_file: str | None = None) -> dict[str, Any]:
    """The nodeproxy-cni element of the conflist's ``plugins``."""
    entry: dict[str, Any] = {"type": conflist.PLUGIN_TYPE, "controlSocket": control_socket,
                             "failOpen": fail_open,
                             "excludeNamespaces": list(exclude_namespaces or [])}
    if log_file:
        entry["logFile"] = log_file
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bin-dir", required=True, help="the node's CNI bin dir (mounted)")
    parser.add_argument("--conf-dir", required=True, help="the node's CNI conf dir (mounted)")
    parser.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET,
                        help="the daemon's control socket, as the node sees it")
    parser.add_argument("--fail-open", action="store_true",
                        help="let pods start unmeshed while the daemon is unreachable")
    parser.add_argument("--exclude-namespace", action="append", default=[], metavar="NS",
                        help="never enroll pods of this namespace (repeat)")
    parser.add_argument("--log-file", help="the plugin also logs there (a node path)")
    parser.add_argument("--interpreter", default=DEFAULT_INTERPRETER,
                        help="the #! line of the installed plugin (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the primary CNI plugin's configuration")


def run(args: argparse.Namespace) -> int:
    binary, changed = install_binary(args.bin_dir, args.interpreter)
    print(f"{'installed' if changed else 'up to date'}: {binary}")
    entry = plugin_entry(args.control_socket, args.fail_open, args.exclude_namespace,
                         args.log_file)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            path, changed = conflist.insert(args.conf_dir, entry)
            break
        except conflist.ConfigDirError as e:
            if time.monotonic() >= deadline:
                print(f"nodeproxy-cni install: {e}", file=sys.stderr)
                return 1
            time.sleep(1.0)
    print(f"{'chained into' if changed else 'already chained in'}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy.cni.install",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

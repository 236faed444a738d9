"""Install nodeproxy-cni on a node: the plugin executable and its entry in the chained config.

This is what the DaemonSet's init container runs (``python -m nodeproxy.cni.install``)
with the host's CNI directories mounted:

1. the plugin is written atomically to ``<bin-dir>/nodeproxy-cni`` (mode 0755):
   by default the self-contained executable the image carries
   (``/usr/lib/nodeproxy/nodeproxy-cni``, built by ``make cni-plugin``: no
   python3 or shared library needed on the node); with ``--zipapp``, this
   package packed as one zipapp with a ``#!/usr/bin/env python3`` line, which
   the node's own python3 (3.9+) runs.  Either carries a marker (the ELF section
   ``.nodeproxy_cni``, the archive member ``nodeproxy-cni.json``), which is how
   ``nodeproxy uninstall`` knows a binary was installed here and may be removed;
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
import struct
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
ELF_MARKER_SECTION = ".nodeproxy_cni"
INSTALLED_BY = "nodeproxy.cni.install"
# Where the image keeps the executable (Containerfile); the installer's default.
DEFAULT_EXECUTABLE = "/usr/lib/nodeproxy/nodeproxy-cni"
_MAX_MARKER_BYTES = 4096
DEFAULT_INTERPRETER = "/usr/bin/env python3"


class InstallError(RuntimeError):
    """The plugin cannot be installed (say why, change nothing)."""


_MAIN = "import sys\nfrom nodeproxy.cni.plugin import main\nsys.exit(main())\n"


def _sources() -> dict[str, Path]:
    """Archive name -> source file of every module the plugin imports."""
    root = Path(nodeproxy.__file__).resolve().parent
    files = {"nodeproxy/__init__.py": root / "__init__.py",
             "nodeproxy/native.py": root / "native.py",  # the package root runs it
             "nodeproxy/admin/__init__.py": root / "admin" / "__init__.py",
             "nodeproxy/admin/control_client.py": root / "admin" / "control_client.py"}
    for path in sorted((root / "cni").glob("*.py")):
        files[f"nodeproxy/cni/{path.name}"] = path
    return files


def build_zipapp(interpreter: str = DEFAULT_INTERPRETER) -> bytes:
    """The plugin as one executable file: a shebang line, then a zip archive."""
    buffer = io.BytesIO()
    buffer.write(f"#!{interpreter}\n".encode())
    members = {"__main__.py": _MAIN.encode()}
    members.update((name, path.read_bytes()) for name, path in _sources().items())
    members[MARKER] = json.dumps({"installedBy": INSTALLED_BY,
                                  "version": nodeproxy.__version__}).encode()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            # A fixed timestamp: the same sources give the same bytes, so a
            # re-install that changes nothing leaves the file alone.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def elf_section(path: str | os.PathLike[str], name: str,
                max_bytes: int = _MAX_MARKER_BYTES) -> bytes | None:
    """The contents of section ``name`` of a 64-bit little-endian ELF file, or None
    (not such an ELF, no such section, or a section larger than ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01":
                return None
            (table_offset,) = struct.unpack_from("<Q", header, 0x28)
            entry_size, count, names_index = struct.unpack_from("<HHH", header, 0x3A)
            # ELF64 section headers are 64 bytes: the table is at most 4 MiB to read.
            if entry_size != 64 or names_index >= count:
                return None
            f.seek(table_offset)
            table = f.read(entry_size * count)
            # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
            sections = [struct.unpack_from("<IIQQQQ", table, i * entry_size)
                        for i in range(count)]
            names_at, names_size = sections[names_index][4], sections[names_index][5]
            f.seek(names_at)
            names = f.read(min(names_size, 1 << 20))
            wanted = name.encode()
            for name_at, _type, _flags, _addr, offset, size in sections:
                if names[name_at:names.find(b"\0", name_at)] == wanted:
                    if size > max_bytes:
                        return None
                    f.seek(offset)
                    return f.read(size)
    except (OSError, struct.error):
        return None
    return None


def _marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a plugin file this installer writes (ELF section or zip member)."""
    raw = elf_section(path, ELF_MARKER_SECTION)
    if raw is None:
        try:
            with zipfile.ZipFile(path) as archive:
                raw = archive.read(MARKER)
        except (OSError, KeyError, zipfile.BadZipFile):
            return None
    try:
        marker = json.loads(raw)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def installed_by_us(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a plugin this installer writes (it carries the marker)."""
    marker = _marker(path)
    return marker is not None and marker.get("installedBy") == INSTALLED_BY


def _write_plugin(bin_dir: str | os.PathLike[str], content: bytes) -> tuple[Path, bool]:
    """Write <bin_dir>/nodeproxy-cni (mode 0755) atomically unless it holds ``content``
    already; (its path, whether it changed)."""
    target = Path(bin_dir) / BINARY_NAME
    try:
        if target.read_bytes() == content:
            return target, False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{BINARY_NAME}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(content)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, True


def install_executable(bin_dir: str | os.PathLike[str],
                       source: str | os.PathLike[str] = DEFAULT_EXECUTABLE
                       ) -> tuple[Path, bool]:
    """Copy the self-contained plugin executable (``make cni-plugin``) into bin_dir."""
    if not installed_by_us(source):
        raise InstallError(f"{source} is not a nodeproxy-cni executable (no "
                           f"{ELF_MARKER_SECTION} marker): build it with `make cni-plugin`, "
                           "or install the python3 zipapp with --zipapp")
    return _write_plugin(bin_dir, Path(source).read_bytes())


def install_zipapp(bin_dir: str | os.PathLike[str],
                   interpreter: str = DEFAULT_INTERPRETER) -> tuple[Path, bool]:
    """Write the plugin as a zipapp the node's python3 runs into bin_dir."""
    return _write_plugin(bin_dir, build_zipapp(interpreter))


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
    parser.add_argument("--plugin", default=DEFAULT_EXECUTABLE, metavar="PATH",
                        help="the self-contained plugin executable to copy "
                             "(default: %(default)s, the image's)")
    parser.add_argument("--zipapp", action="store_true",
                        help="install the plugin as a python3 zipapp instead (the node "
                             "then needs python3 3.9+)")
    parser.add_argument("--interpreter", default=DEFAULT_INTERPRETER,
                        help="with --zipapp: its #! line (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the primary CNI plugin's configuration")


def run(args: argparse.Namespace) -> int:
    try:
        binary, changed = (install_zipapp(args.bin_dir, args.interpreter) if args.zipapp
                           else install_executable(args.bin_dir, args.plugin))
    except (InstallError, OSError) as e:
        print(f"nodeproxy-cni install: {e}", file=sys.stderr)
        return 1
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

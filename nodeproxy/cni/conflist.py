"""Edit the runtime's CNI configuration directory: chain nodeproxy-cni in, or take it out.

The runtime (containerd, CRI-O) uses the first file of its conf dir in lexical
order with a ``.conf``, ``.conflist`` or ``.json`` name.  ``insert`` appends (or
replaces) the nodeproxy-cni entry in that file's ``plugins`` list; a single-plugin
``.conf`` is turned into a ``.conflist`` of the same name first, as Istio's
installer does.  ``remove`` takes every nodeproxy-cni entry out of every list and
leaves the rest of each file as it was; files without one are not rewritten.
Writes are atomic (temporary file + rename) and keep the file's mode.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PLUGIN_TYPE = "nodeproxy-cni"
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")


class ConfigDirError(RuntimeError):
    """The conf dir holds no usable configuration, or one that cannot be read."""


def config_files(conf_dir: str | os.PathLike[str]) -> list[Path]:
    """The network configuration files, in the order the runtime considers them."""
    directory = Path(conf_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix in CONFIG_SUFFIXES and p.is_file())


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigDirError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigDirError(f"{path}: not a JSON object")
    return data


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace path's contents at once: a runtime never reads a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def insert(conf_dir: str | os.PathLike[str], entry: dict[str, Any]) -> tuple[Path, bool]:
    """Chain ``entry`` (type nodeproxy-cni) into the primary configuration.

    Returns (the file, whether it changed).  Idempotent: an identical entry is
    left alone; a different nodeproxy-cni entry is replaced in place.
    """
    files = config_files(conf_dir)
    if not files:
        raise ConfigDirError(f"{conf_dir}: no .conf/.conflist/.json file yet (is the "
                             "primary CNI plugin installed?)")
    path = files[0]
    data = _load(path)
    mode = path.stat().st_mode & 0o777
    if "plugins" not in data:
        if "type" not in data:
            raise ConfigDirError(f"{path}: neither a plugin list nor a single plugin")
        single = dict(data)
        data = {"cniVersion": single.pop("cniVersion", "1.0.0"),
                "name": single.pop("name", path.stem), "plugins": [single]}
        target = path.with_suffix(".conflist")
    else:
        target = path
    plugins = data.get("plugins")
    if not isinstance(plugins, list):
        raise ConfigDirError(f"{path}: 'plugins' is not a list")
    kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    new_plugins = [*kept, dict(entry, type=PLUGIN_TYPE)]
    if target == path and new_plugins == plugins:
        return path, False
    data["plugins"] = new_plugins
    write_atomic(target, _dump(data), mode)
    if target != path:
        path.unlink()
    return target, True


def remove(conf_dir: str | os.PathLike[str]) -> list[Path]:
    """Take nodeproxy-cni out of every plugin list in the directory; the files changed."""
    changed = []
    for path in config_files(conf_dir):
        try:
            data = _load(path)
        except ConfigDirError:
            continue  # not ours to judge; leave it untouched
        plugins = data.get("plugins")
        if not isinstance(plugins, list):
            continue
        kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
        if len(kept) == len(plugins):
            continue
        data["plugins"] = kept
        write_atomic(path, _dump(data), path.stat().st_mode & 0o777)
        changed.append(path)
    return changed

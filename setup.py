"""The build's one step beyond pyproject.toml: the hot paths compiled with mypyc.

The modules in nodeproxy/native.py's NATIVE_MODULES are compiled as one group when mypy
(a build requirement) and a C compiler with Python's headers (Debian: gcc, python3-dev;
scripts/setup.sh installs them) are there.  Nothing here is required: without a
compiler, or with NODEPROXY_NATIVE=0 at install time, the package installs as pure
Python.  After a complete build, ``nodeproxy/_native_build.json`` records each source's
hash; nodeproxy/native.py refuses a compiled form whose sources changed since.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE_PY = HERE / "nodeproxy" / "native.py"
# Its names (NATIVE_MODULES, manifest, ...); none where the tree has no native.py (the
# Containerfile installs the dependencies with a placeholder package).
native = runpy.run_path(str(NATIVE_PY)) if NATIVE_PY.exists() else {}


class BuildNative(build_ext):
    """build_ext whose extensions are optional, and which writes the manifest only when
    every one of them was built (a partial build is no build: see native.py)."""

    def run(self) -> None:
        self._remove_stale()
        if not self.extensions:
            return super().run()
        for ext in self.extensions:
            ext.optional = True
        super().run()
        outputs = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        target = Path(self.get_ext_fullpath("nodeproxy.x")).parent / native["MANIFEST"]
        if outputs and all(p.exists() for p in outputs):
            record = native["manifest"](native["NATIVE_MODULES"], HERE)
            target.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(f"nodeproxy: compiled {len(record['modules'])} modules with mypyc")
        else:
            target.unlink(missing_ok=True)
            print("nodeproxy: the compiled L7 path was not built; pure Python",
                  file=sys.stderr)


    def _remove_stale(self) -> None:
        """In place, the extension files of modules this build does not make (a module
        taken out of NATIVE_MODULES, or a pure build) are removed: Python would import
        such a file before the source beside it, whatever native.py decides."""
        if not self.inplace:
            return
        built = {ext.name for ext in self.extensions}
        for path in (HERE / "nodeproxy").rglob("*.cpython-*.so"):
            relative = path.relative_to(HERE)
            module = ".".join((*relative.parent.parts, relative.name.split(".")[0]))
            if module not in built:
                path.unlink()


# The commands that build extensions; setuptools also runs this file for metadata
# (egg_info, dist_info), where the C sources are not needed (mypyc takes ~1 min).
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def missing_dependencies() -> list[str]:
    """The runtime dependencies this environment lacks (mypyc must see their classes:
    build_backend.py puts them in pip's build environment)."""
    import re
    from importlib.metadata import PackageNotFoundError, version
    pyproject = (HERE / "pyproject.toml").read_text()
    block = pyproject.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    missing = []
    for name in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block, re.M):
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def native_extensions() -> list:
    if not native or os.environ.get(native["ENV"], "") == "0" \
            or not BUILDS & set(sys.argv[1:]):
        return []
    missing = missing_dependencies()
    if missing:
        print(f"nodeproxy: {', '.join(missing)} not installed here; pure Python",
              file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("nodeproxy: mypy is not installed; pure Python", file=sys.stderr)
        return []
    paths = [str(native["source_path"](m, Path("."))) for m in native["NATIVE_MODULES"]]
    try:
        # Packages without type information count as Any; only the compiled modules'
        # own type errors count (follow-imports=silent).
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *paths],
                        opt_level="3", group_name=native["GROUP"])
    except (Exception, SystemExit) as e:  # mypy refused the sources: no compiled path
        print(f"nodeproxy: mypyc failed ({e!r}); pure Python", file=sys.stderr)
        return []


setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildNative})

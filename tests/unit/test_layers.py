"""The package's import graph keeps its layers: read from the source (no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import nodeproxy

RUNTIME = Path(nodeproxy.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a source file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(RUNTIME.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def test_the_runtime_package_never_imports_the_development_tooling():
    """The image carries nodeproxy/ alone: an import of nodeproxy_dev there would break
    the installed daemon (the CLI finds the dev subcommands by name, not by import)."""
    offenders = {
        str(path.relative_to(RUNTIME.parent)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] == "nodeproxy_dev")
        for path in RUNTIME.rglob("*.py")
    }
    assert {p: m for p, m in offenders.items() if m} == {}

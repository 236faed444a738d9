"""The daemon package keeps to wiring and lifecycle: read from the source (no imports run).

- Every attribute a class of nodeproxy/daemon/ (or of the mesh snapshot and its holder,
  nodeproxy/mesh/snapshot.py and holder.py) sets is declared in its __init__ (or as a
  dataclass field), so a reader finds the whole state of an object in one place (no
  attribute that exists only after start, looked up with getattr).
- It never imports the CLI layer above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nodeproxy

RUNTIME = Path(nodeproxy.__file__).parent
PACKAGES = ("daemon",)
MESH_STATE = ("mesh/holder.py", "mesh/snapshot.py")


def _sources() -> list[Path]:
    return sorted([p for package in PACKAGES for p in (RUNTIME / package).glob("*.py")]
                  + [RUNTIME / path for path in MESH_STATE])


def _self_attributes(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names of `self.<name>` assigned in a method (plain, annotated, augmented, tuple)."""
    found: set[str] = set()
    for node in ast.walk(function):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            elements = target.elts if isinstance(target, ast.Tuple) else [target]
            for element in elements:
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == "self":
                    found.add(element.attr)
    return found


def test_attributes_are_declared_in_init() -> None:
    late: dict[str, list[str]] = {}
    for path in _sources():
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(cls, ast.ClassDef):
                continue
            methods = [m for m in cls.body
                       if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)]
            declared = set().union(*(_self_attributes(m) for m in methods
                                     if m.name == "__init__"))
            # A dataclass declares its fields in the class body.
            declared |= {f.target.id for f in cls.body
                         if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
            for method in methods:
                if method.name != "__init__":
                    for name in sorted(_self_attributes(method) - declared):
                        late.setdefault(f"{path.name}:{cls.name}", []).append(
                            f"{method.name} sets self.{name}")
    assert late == {}


def test_no_getattr_on_self() -> None:
    uses = [f"{path.name}:{node.lineno}" for path in _sources()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr") and node.args
            and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"]
    assert uses == []


def test_the_daemon_does_not_import_the_cli() -> None:
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names
                          if n == "nodeproxy.cli" or n.startswith("nodeproxy.cli.")]
    assert offenders == []
